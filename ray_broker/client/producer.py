"""The producer: per-topic column buffers, a per-partition accumulator and one sender thread.

Data path
- `send()` only appends to the topic's column buffers (python lists) and returns a `RecordFuture`
  pointing at (buffer state, row). The sender thread swaps the lists out, builds Arrow arrays,
  partitions them (explicit partition, vectorised murmur2 of the key, else sticky) and splits them
  into per-partition pieces.
- `send_batch()` validates and partitions in the caller's thread (so `SchemaMismatchError`,
  `RecordTooLargeError`, bad partitions raise immediately) and queues its pieces.
- Per partition, pieces accumulate until `batch_size` bytes or `linger_ms`; then ONE RecordBatch is
  built and sent with the leader's `produce.remote`. Up to `max_in_flight_requests_per_connection`
  full batches are in flight per partition (a batch that is not full waits for the call in flight
  and keeps growing, and the partitions led from one node take turns for
  `max_lingered_requests_per_node` such calls); the sender waits on all of them with `ray.wait`
  and completes futures in order per partition. Small batches travel as Arrow IPC bytes
  (`records.to_wire`).
- Ordering: Ray may run concurrent calls to an async actor out of submission order, so with
  `strict_ordering` (default) a partition has several calls in flight only when idempotence is on
  (the broker orders by sequence; a batch that overtook an earlier one gets OUT_OF_ORDER_SEQUENCE and
  is resent once it is at the head). Without idempotence it is one call at a time per partition.
- Retries: retriable errors put the batch back at the head of its partition's line with the same
  producer id / epoch / base sequence; nothing newer is sent for that partition until it is
  through. After `delivery_timeout_ms` the batch fails with `BrokerTimeoutError`, or
  `UnknownOutcomeError` if any attempt's outcome was ambiguous (actor died / timed out after send).

Errors raised by `send()` itself (nothing is queued): `UnknownTopicOrPartitionError` (unknown topic or
partition), `InvalidRequestError` (declared-schema topic, bad argument types, closed producer),
`RecordTooLargeError`, `BrokerTimeoutError` (buffer full for `max_block_ms`).

Transactions (`transactional_id` set; Kafka TV2 / KIP-890, see kafka-eos.md 2.12-2.13)
- Idempotence is on; the producer id comes from the transaction coordinator in
  `init_transactions()` (which also fences older instances with the same transactional id and
  waits until their open transaction is aborted), not at construction.
- `begin_transaction()` / `send*()` / `send_offsets_to_transaction()` / `commit_transaction()` or
  `abort_transaction()`; or `with producer.transaction(): ...`. `send*()` outside a transaction
  raises `InvalidTxnStateError` at once. The client state machine is `txn_manager.TransactionManager`.
- Batches carry `is_transactional=True` and the transactional id: the partition leader adds the
  partition to the transaction itself (no AddPartitionsToTxn from the client).
- Every commit/abort bumps the epoch (at exhaustion: a new producer id); the producer adopts the
  identity `end_txn` returns and restarts all partition sequences at 0.
- Abortable errors (the transaction must be aborted, the producer stays usable): any record of
  the transaction failing (`BrokerTimeoutError`, `UnknownOutcomeError`, `OutOfOrderSequenceError`,
  `UnknownProducerIdError`, `RecordTooLargeError`, ...) and errors of `send_offsets_to_transaction()`
  other than fencing. They surface as `TransactionAbortableError` from `commit_transaction()` and
  from every later call except `abort_transaction()`.
- Fatal errors (the producer can only be closed): `ProducerFencedError` /
  `InvalidProducerEpochError` (a newer instance called `init_transactions()`, or the coordinator
  aborted this transaction after `transaction_timeout_ms`) from `end_txn`, `add_offsets` or a
  produce of this transaction, and `InvalidTransactionTimeoutError` from `init_transactions()`.
  Every later transactional call and `send*()` raises the fatal error again (`ProducerFencedError`
  when fenced).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError

from ..config import ProducerConfig
from ..errors import (InvalidProducerEpochError, ProducerFencedError, UnknownProducerIdError, BrokerError, BrokerTimeoutError, InvalidRequestError, NotEnoughReplicasAfterAppendError,
                      OutOfOrderSequenceError, RecordTooLargeError, UnknownOutcomeError,
                      UnknownTopicOrPartitionError, CoordinatorNotAvailableError, InvalidTxnStateError,
                      InvalidTransactionTimeoutError, NotCoordinatorError, TransactionAbortableError)
from ..protocol import (OFFSETS_TOPIC, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE, TopicMetadata, group_coordinator_name,
                        txn_coordinator_name)
from ..records import HEADERS_TYPE, TIMESTAMP_TYPE, TopicPartition, schema_from_bytes, stored_schema, to_wire
from .batching import compute_partitions, encoded_size, normalize_batch, now_ms, plan_batch
from .futures import BatchFuture, BatchState, RecordFuture
from .metadata_cache import ACTOR_GONE, ClientContext, discard_ref, unwrap_error
from .partitioner import StickyPartitioner, murmur2, to_positive
from .txn_manager import ClientTxnState, TransactionManager, TxnOperation, is_fatal_error

log = logging.getLogger(__name__)

__all__ = ["Producer", "IdempotenceState"]

SEQUENCE_MODULUS = 2 ** 31
_RECORD_OVERHEAD = 24  # timestamp + offsets + validity, roughly what Arrow stores per row
# What a record queued by send() costs in heap beyond its bytes (five list slots, the key and value
# objects' headers, the timestamp int): buffer.memory counts it, so that the setting bounds what the
# producer holds, as Kafka documents it, and not only the bytes it will send.
_QUEUED_RECORD_HEAP = 144
LINGERED_SLOT_HOLD_S = 1.0  # see Producer._lingered_by_node


class IdempotenceState:
    """Producer id / epoch and per-partition sequence numbers, assigned when a batch is first drained.

    Disabled today (producer id -1, base_sequence -1 sent to the broker), but `next_sequence` is
    kept per partition so enabling idempotence is only: set `producer_id`/`producer_epoch` and
    `enabled = True`. Sequences wrap at 2**31 - 1 -> 0 like Kafka's `incrementSequence`.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.transactional = False
        self.producer_id = NO_PRODUCER_ID
        self.producer_epoch = NO_PRODUCER_EPOCH
        self.next_sequence: dict[tuple[str, int], int] = {}

    def assign(self, topic: str, partition: int, record_count: int) -> tuple[int, int, int]:
        """(producer_id, producer_epoch, base_sequence) for a newly drained batch."""
        key = (topic, partition)
        seq = self.next_sequence.get(key, 0)
        self.next_sequence[key] = (seq + record_count) % SEQUENCE_MODULUS
        if not self.enabled:
            return NO_PRODUCER_ID, NO_PRODUCER_EPOCH, NO_SEQUENCE
        return self.producer_id, self.producer_epoch, seq

    def reset(self, topic: str | None = None) -> None:
        if topic is None:
            self.next_sequence.clear()
        else:
            for key in [k for k in self.next_sequence if k[0] == topic]:
                del self.next_sequence[key]


class _Piece:
    __slots__ = ("batch", "state", "rows", "created", "size")

    def __init__(self, batch: pa.RecordBatch, state: BatchState, rows: np.ndarray, created: float):
        self.batch = batch
        self.state = state
        self.rows = rows
        self.created = created
        self.size = encoded_size(batch)    # what it weighs on the wire and in the log


_INFLIGHT, _RETRY, _DONE, _FAILED, _NEW = range(5)


class _ProduceBatch:
    __slots__ = ("topic", "partition", "batch", "pieces", "created", "deadline", "attempts", "ambiguous",
                 "status", "ref", "sent_at", "retry_at", "leader", "producer_id", "producer_epoch",
                 "base_sequence", "base_offset", "error", "last_error", "sent_behind", "resequence", "lingered",
                 "node")

    def __init__(self, topic, partition, batch, pieces, created, deadline):
        self.topic = topic
        self.partition = partition
        self.batch = batch
        self.pieces = pieces
        self.created = created
        self.deadline = deadline
        self.attempts = 0
        self.ambiguous = False
        self.status = _NEW
        self.ref = None
        self.sent_at = 0.0
        self.retry_at = 0.0
        self.leader = None
        self.producer_id = NO_PRODUCER_ID
        self.producer_epoch = NO_PRODUCER_EPOCH
        self.base_sequence = NO_SEQUENCE
        self.base_offset = -1
        self.error: BaseException | None = None
        self.last_error: BaseException | None = None
        self.lingered = False     # sent for its linger, not full: takes one of its node's lingered slots
        self.node: str | None = None
        self.sent_behind = False  # sent while an earlier batch of the partition was unacknowledged
        self.resequence = False   # refused for an unknown (expired) producer id: renumber before resending


class _PartitionAcc:
    __slots__ = ("topic", "partition", "pending", "pending_bytes", "first_time", "inflight")

    def __init__(self, topic: str, partition: int):
        self.topic = topic
        self.partition = partition
        self.pending: deque[_Piece] = deque()
        self.pending_bytes = 0
        self.first_time = 0.0
        self.inflight: deque[_ProduceBatch] = deque()


class _TopicBuffer:
    """Column lists of records sent with `send()` since the last drain."""
    __slots__ = ("topic", "keys", "values", "headers", "timestamps", "partitions", "state", "nbytes",
                 "first_time", "has_headers", "has_partition", "has_key", "threshold")

    def __init__(self, topic: str):
        self.topic = topic
        self._reset()

    def _reset(self):
        self.keys: list = []
        self.values: list = []
        self.headers: list = []
        self.timestamps: list = []
        self.partitions: list = []
        self.state: BatchState | None = None
        self.nbytes = 0
        self.first_time = 0.0
        self.has_headers = False
        self.has_partition = False
        self.has_key = False
        self.threshold = 0   # drain at this many bytes (batch_size x partitions the records spread over)

    def swap(self) -> tuple:
        snap = (self.keys, self.values, self.headers, self.timestamps, self.partitions, self.state,
                self.first_time, self.has_headers, self.has_partition, self.has_key)
        self._reset()
        return snap


class _TopicInfo:
    __slots__ = ("md", "user_schema", "schema", "max_bytes", "num_partitions")

    def __init__(self, md: TopicMetadata, max_bytes: int):
        self.md = md
        self.user_schema = schema_from_bytes(md.schema)
        self.schema = stored_schema(self.user_schema)
        self.num_partitions = md.num_partitions
        topic_max = (md.config or {}).get("max_message_bytes")
        self.max_bytes = min(max_bytes, int(topic_max)) if topic_max else max_bytes


def _to_bytes(v: Any, what: str) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    raise InvalidRequestError(f"{what} must be bytes, str or None, got {type(v).__name__}")


def _binary_array(items: list) -> pa.Array:
    """A binary Arrow array from a list of bytes (faster than pa.array when there are no nulls)."""
    n = len(items)
    if n == 0 or None in items:
        return pa.array(items, type=pa.binary())
    lens = np.fromiter(map(len, items), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    if offsets[-1] >= 2 ** 31:
        return pa.array(items, type=pa.binary())
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)),
                                                  pa.py_buffer(b"".join(items))])


def _group_fields(group_metadata: Any) -> tuple[str, int, str | None]:
    """(group id, generation, member id) from a group id str, a dict or a group-metadata object."""
    if isinstance(group_metadata, str):
        group_id, generation, member_id = group_metadata, -1, None
    else:
        if isinstance(group_metadata, Mapping):
            get = group_metadata.get
        else:
            def get(name, default=None):
                return getattr(group_metadata, name, default)
        group_id = get("group_id")
        generation = get("generation_id", get("generation", -1))
        member_id = get("member_id", None)
    if not isinstance(group_id, str) or not group_id:
        raise InvalidRequestError(f"group_metadata must be a group id or carry a group_id, got {group_metadata!r}")
    if isinstance(generation, bool) or not isinstance(generation, int):
        raise InvalidRequestError(f"group generation must be an int, got {generation!r}")
    if member_id is not None and not isinstance(member_id, str):
        raise InvalidRequestError(f"group member id must be a str, got {member_id!r}")
    return group_id, generation, member_id


def _is_ambiguous(err: BaseException) -> bool:
    return isinstance(err, (*ACTOR_GONE, GetTimeoutError, BrokerTimeoutError, NotEnoughReplicasAfterAppendError))


class Producer:
    """Thread-safe producer. See the module docstring for the data path and error behaviour."""

    def __init__(self, context: ClientContext, config: ProducerConfig | None = None,
                 strict_ordering: bool = True):
        self.context = context
        # Ray does not keep the order of concurrent calls to an async actor (measured: a few % of
        # pipelined calls arrive out of order), so several produce calls in flight per partition
        # keep send order only when the broker can put them back in order by sequence number.
        # strict_ordering: without idempotence (no sequence numbers) send one call at a time per
        # partition. False pipelines anyway (faster, order within a partition not guaranteed).
        self.strict_ordering = strict_ordering
        self.config = config or ProducerConfig()
        c = self.config
        self._acks = c.acks_value
        self._linger = c.linger_ms / 1000.0
        self._batch_size = c.batch_size
        self._buffer_memory = c.buffer_memory
        self._max_inflight = c.max_in_flight_requests_per_connection
        self._lingered_cap = c.max_lingered_requests_per_node
        self._delivery_timeout = c.delivery_timeout_ms / 1000.0
        self._request_timeout = c.request_timeout_ms / 1000.0
        self._backoff = c.retry_backoff_ms / 1000.0
        self._max_block = c.max_block_ms / 1000.0
        self.idempotence = IdempotenceState()
        self.transactional_id: str | None = c.transactional_id
        if self.transactional_id is not None:
            # idempotent + transactional; the producer id comes from init_transactions()
            self.idempotence.transactional = True
        elif c.idempotence_enabled:
            self._new_producer_id()
        elif c.enable_idempotence is None:
            warnings.warn(f"acks={c.acks!r} turns off the default enable.idempotence: retries may duplicate "
                          "records", stacklevel=3)
        self.sticky = StickyPartitioner()

        self._lock = threading.RLock()
        self._space = threading.Condition(self._lock)
        # transactions: state machine (shares the producer lock), one transactional call at a time
        self._txn: TransactionManager | None = (TransactionManager(self.transactional_id, self._lock)
                                                if self.transactional_id is not None else None)
        self._txn_call_lock = threading.Lock()
        self._txn_started = False          # something was queued / offsets added in the open transaction
        self._txn_added: set = set()       # partitions of the open transaction added ahead (see _add_ahead)
        self._txn_coordinators: int | None = None
        self._txn_coordinator = None
        self._drop_unsent: BaseException | None = None   # sender fails records not yet sent with this
        self._wakeup = threading.Event()
        self._topic_info: dict[str, _TopicInfo] = {}
        self._buffers: dict[str, _TopicBuffer] = {}
        self._accs: dict[tuple[str, int], _PartitionAcc] = {}
        self._refs: dict[Any, _ProduceBatch] = {}
        self._incomplete: set[BatchState] = set()
        self._used_bytes = 0
        self._flushing = 0
        self._closed = False
        self._stop = False       # sender exits once idle
        self._abort: BaseException | None = None  # sender fails everything left and exits
        self._thread = threading.Thread(target=self._run, name=f"ray_broker-producer-{c.client_id or id(self)}",
                                        daemon=True)
        self._thread.start()

    # ============================================================================== public API
    def send(self, topic: str, value: bytes | str | None = None, key: bytes | str | None = None,
             partition: int | None = None, headers: list[tuple[str, bytes]] | None = None,
             timestamp: int | None = None) -> RecordFuture:
        """Queue one record; the future's result is `RecordMetadata(topic, partition, offset)`.

        On a transactional producer only inside a transaction (else `InvalidTxnStateError`;
        `TransactionAbortableError` once the transaction failed; the fatal error once fenced).
        """
        if self._closed:
            raise InvalidRequestError("producer is closed")
        if self._txn is not None:
            self._txn.check_send()
        # per-record path: inlined fast cases (about 0.5 of 3 us per call were these calls)
        info = self._topic_info.get(topic)
        if info is None or self.context.cached_topics.get(topic) is not info.md:
            info = self._info(topic)
        if info.user_schema is not None:
            raise InvalidRequestError(
                f"topic {topic!r} has a declared schema; send() only writes key/value records: "
                f"use send_batch() with a pyarrow RecordBatch of columns {info.user_schema.names}")
        if key.__class__ is not bytes and key is not None:
            key = _to_bytes(key, "key")
        if value.__class__ is not bytes and value is not None:
            value = _to_bytes(value, "value")
        size = _RECORD_OVERHEAD + (len(key) if key is not None else 0) + (len(value) if value is not None else 0)
        if headers is not None:
            headers, hsize = self._normalize_headers(headers)
            size += hsize
        if partition is not None:
            if isinstance(partition, bool) or not isinstance(partition, int) \
                    or not 0 <= partition < info.num_partitions:
                info = self._info(topic, refresh=True)
                if isinstance(partition, bool) or not isinstance(partition, int) \
                        or not 0 <= partition < info.num_partitions:
                    raise UnknownTopicOrPartitionError(
                        f"topic {topic!r} has no partition {partition!r} (it has {info.num_partitions})")
        if timestamp is None:
            timestamp = time.time_ns() // 1_000_000
        elif not isinstance(timestamp, int) or isinstance(timestamp, bool):
            raise InvalidRequestError(f"timestamp must be int milliseconds, got {type(timestamp).__name__}")
        if size > info.max_bytes or size > self._buffer_memory:
            raise self._too_large(size, info)
        with self._lock:
            if self._closed:
                raise InvalidRequestError("producer is closed")
            held = size + _QUEUED_RECORD_HEAP
            self._reserve(held)
            if self._txn is not None:
                self._txn_record_queued(held)
            tb = self._buffers.get(topic)
            if tb is None:
                tb = self._buffers[topic] = _TopicBuffer(topic)
            st = tb.state
            if st is None:
                st = tb.state = BatchState(topic)
                st._on_complete = self._release
                self._incomplete.add(st)
                tb.first_time = time.monotonic()
                tb.threshold = self._batch_size
                wake = True   # the sender sets its linger deadline
            else:
                wake = False
            if (key is not None or partition is not None) and not (tb.has_key or tb.has_partition):
                # records spread over partitions: let the buffer hold about batch_size per partition
                tb.threshold = max(self._batch_size, min(self._batch_size * info.num_partitions,
                                                         self.config.buffer_memory // 4))
            st.nbytes += held
            index = len(tb.values)
            tb.keys.append(key)
            tb.values.append(value)
            tb.headers.append(headers)
            tb.timestamps.append(timestamp)
            tb.partitions.append(partition)
            if headers is not None:
                tb.has_headers = True
            if partition is not None:
                tb.has_partition = True
            if key is not None:
                tb.has_key = True
            tb.nbytes += size
            if tb.nbytes >= tb.threshold and tb.nbytes - size < tb.threshold:
                wake = True
        if wake:
            self._wakeup.set()
        return RecordFuture(st, index)

    def send_batch(self, topic: str, batch: pa.RecordBatch | pa.Table, partition: int | None = None,
                   key_column: str | None = None) -> BatchFuture:
        """Queue many rows; the future's result is `BatchMetadata` aligned with the input rows.

        Validation (schema, partition, sizes) happens here: errors raise before anything is sent.
        Transactional producers: as `send()`. A batch larger than buffer.memory is not refused (unlike
        one `send()` record): it waits until the buffer is empty and is then queued alone, over the bound.
        """
        if self._closed:
            raise InvalidRequestError("producer is closed")
        if self._txn is not None:
            self._txn.check(TxnOperation.SEND)
        info = self._info(topic)
        now = now_ms()
        rb = normalize_batch(batch, info.user_schema, now)
        if key_column is None and info.user_schema is None:
            kidx = rb.schema.get_field_index("key")
            if kidx >= 0 and rb.column(kidx).null_count < rb.num_rows:
                key_column = "key"
        if partition is not None and not (isinstance(partition, int) and 0 <= partition < info.num_partitions):
            info = self._info(topic, refresh=True)
        parts = compute_partitions(rb, info.num_partitions, topic, self.sticky, partition=partition,
                                   key_column=key_column, available=self._available(info))
        plan = plan_batch(rb, parts, self._chunk_limit(info))
        self._add_ahead(topic, plan)
        st = BatchState(topic, rb.num_rows)
        st.set_rows(parts)
        fut = BatchFuture(st)
        if not plan:
            st.seal()
            return fut
        st.nbytes = rb.nbytes
        st._on_complete = self._release
        created = time.monotonic()
        with self._lock:
            if self._closed:
                raise InvalidRequestError("producer is closed")
            self._reserve(st.nbytes)
            if self._txn is not None:
                self._txn_record_queued(st.nbytes)
            self._incomplete.add(st)
            st.add_pieces(len(plan))
            for p, sub, rows in plan:
                self._add_piece(topic, p, _Piece(sub, st, rows, created))
            st.seal()
        self._wakeup.set()
        return fut

    def flush(self, timeout: float | None = None) -> None:
        """Send everything queued so far and wait until it is acknowledged (or failed).

        Raises `BrokerTimeoutError` if that takes longer than `timeout` seconds; failures of
        individual records are reported through their futures, not here.
        """
        self._flush_states(timeout)

    def _flush_states(self, timeout: float | None) -> list[BatchState]:
        """`flush()`; returns the record states it waited for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            states = list(self._incomplete)
            self._flushing += 1
        self._wakeup.set()
        try:
            for st in states:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                st.wait(remaining)
        finally:
            with self._lock:
                self._flushing -= 1
        return states

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the sender. Records still unsent after `timeout` fail with BrokerTimeoutError."""
        with self._lock:
            if self._closed and not self._thread.is_alive():
                return
            self._closed = True
        if threading.current_thread() is self._thread:
            raise InvalidRequestError("close() called from a producer callback; it would deadlock")
        try:
            self.flush(timeout)
        except BrokerTimeoutError:
            self._abort = BrokerTimeoutError("producer closed before the record was delivered")
        with self._lock:
            self._stop = True
            if self._abort is None and self._incomplete:
                self._abort = BrokerTimeoutError("producer closed before the record was delivered")
        self._wakeup.set()
        self._thread.join(timeout=None if self._abort is None else 5.0)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def partitions_for(self, topic: str) -> list[int]:
        return list(range(self._info(topic).num_partitions))

    # ============================================================================== transactions
    @property
    def transaction_state(self) -> ClientTxnState | None:
        """The client transaction state (None for a non-transactional producer)."""
        return self._txn.state if self._txn is not None else None

    def init_transactions(self, timeout: float | None = None) -> None:
        """Get this transactional id's producer id and epoch from its transaction coordinator.

        Fences every older producer with the same `transactional_id` (their later writes and
        commits fail with `ProducerFencedError`) and returns once an open transaction of theirs is
        aborted. Call once, before the first `begin_transaction()`. Retriable coordinator errors
        (`ConcurrentTransactionsError` while the old transaction is being aborted, coordinator
        loading / moving) are retried with backoff for `timeout` seconds (default `max_block_ms`);
        then `BrokerTimeoutError`, and calling `init_transactions()` again resumes.
        `InvalidTransactionTimeoutError` (transaction_timeout_ms above the broker's
        transaction.max.timeout.ms) is fatal.
        """
        txn = self._require_txn()
        with self._txn_call_lock:
            self._check_not_closed()
            txn.start(TxnOperation.INIT)
            deadline = self._txn_deadline(timeout)
            try:
                pid, epoch = self._coordinator_call(
                    "init_producer_id", (self.transactional_id, int(self.config.transaction_timeout_ms)),
                    deadline, "init_transactions()")
            except BrokerError as err:
                if is_fatal_error(err) or isinstance(err, InvalidTransactionTimeoutError):
                    raise txn.fatal(err) from None
                raise
            with self._lock:
                self._adopt_identity(pid, epoch)
                txn.finish(TxnOperation.INIT)
            log.debug("transactional id %r: producer id %d epoch %d", self.transactional_id, pid, epoch)

    def begin_transaction(self) -> None:
        """Start a transaction (local only: nothing is sent to the broker until the first record)."""
        txn = self._require_txn()
        self._check_not_closed()
        with self._lock:
            txn.start(TxnOperation.BEGIN)
            self._txn_started = False
            self._txn_added = set()

    def commit_transaction(self, timeout: float | None = None) -> None:
        """Flush, then commit the open transaction.

        Returning means the commit decision is durable in the transaction log: the transaction
        will be completed even if this process or the coordinator dies now. read_committed
        consumers see its records once the commit markers land in every partition, moments later.

        If any record of the transaction failed, nothing is committed: the state becomes
        ABORTABLE_ERROR and `TransactionAbortableError` (naming the first failure) is raised; call
        `abort_transaction()`. `ProducerFencedError` (also for `InvalidProducerEpochError`) is fatal.
        `BrokerTimeoutError` after `timeout` seconds (default: records wait up to
        delivery_timeout_ms, the commit itself up to max_block_ms): call `commit_transaction()`
        again to resume (nothing else is allowed until it succeeds).
        """
        txn = self._require_txn()
        with self._txn_call_lock:
            self._check_not_closed()
            with self._lock:
                txn.start(TxnOperation.COMMIT)   # under the producer lock: no send() slips in after
            start = time.monotonic()
            states = self._flush_states(timeout)
            for st in states:                    # their completion hook may not have run yet
                err = st.first_error()
                if err is not None:
                    self._txn_record_failed(err)
                    break
            if txn.state is not ClientTxnState.COMMITTING:
                txn.check(TxnOperation.COMMIT)   # raises the abortable / fatal error
            if self._txn_started:
                remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
                self._end_txn(True, self._txn_deadline(remaining))
            with self._lock:
                txn.finish(TxnOperation.COMMIT)
                self._txn_started = False

    def abort_transaction(self, timeout: float | None = None) -> None:
        """Abort the open transaction (also the way out of ABORTABLE_ERROR).

        Records not sent yet fail with `TransactionAbortableError`; sends already in flight are
        waited for (their failures are ignored); then the coordinator writes the abort decision
        (returning means it is durable; the markers follow) and the producer continues under the
        bumped epoch. `ProducerFencedError` is fatal; `BrokerTimeoutError` after `timeout` seconds
        (default max_block_ms for the coordinator call): call `abort_transaction()` again.
        """
        txn = self._require_txn()
        with self._txn_call_lock:
            self._check_not_closed()
            with self._lock:
                txn.start(TxnOperation.ABORT)
                self._drop_unsent = TransactionAbortableError(
                    f"transaction of {self.transactional_id!r} aborted before the record was sent")
            start = time.monotonic()
            self._wakeup.set()
            self._flush_states(timeout)
            if txn.state is not ClientTxnState.ABORTING:
                txn.check(TxnOperation.ABORT)    # fatal meanwhile
            if self._txn_started:
                remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
                self._end_txn(False, self._txn_deadline(remaining))
            with self._lock:
                txn.finish(TxnOperation.ABORT)
                self._txn_started = False

    def send_offsets_to_transaction(self, offsets: Mapping[TopicPartition, int], group_metadata: Any,
                                    timeout: float | None = None) -> None:
        """Commit consumer offsets as part of the open transaction (read-process-write).

        `offsets`: {TopicPartition: next offset to consume}. `group_metadata`: the consumer group
        id (str) or an object / dict with `group_id` (and `generation_id`, `member_id` for KIP-447
        fencing). The offsets become visible to the group only if the transaction commits.
        Adds the group's offsets partition to the transaction (`add_offsets`), then hands the offsets
        to the group coordinator (`_commit_txn_offsets`). Errors other than fencing make the
        transaction abortable.
        """
        txn = self._require_txn()
        group_id, generation, member_id = _group_fields(group_metadata)
        norm: dict[TopicPartition, int] = {}
        if not isinstance(offsets, Mapping):
            raise InvalidRequestError("offsets must be a dict {TopicPartition: offset}")
        for tp, off in offsets.items():
            try:
                topic, partition = tp
            except (TypeError, ValueError):
                raise InvalidRequestError(f"offsets key {tp!r} is not a TopicPartition") from None
            if isinstance(off, bool) or not isinstance(off, int) or off < 0:
                raise InvalidRequestError(f"offset for {tp!r} must be a non-negative int, got {off!r}")
            norm[TopicPartition(str(topic), int(partition))] = int(off)
        with self._txn_call_lock:
            self._check_not_closed()
            txn.check(TxnOperation.SEND_OFFSETS)
            with self._lock:
                self._txn_started = True
                pid, epoch = self.idempotence.producer_id, self.idempotence.producer_epoch
            deadline = self._txn_deadline(timeout)
            try:
                index = self._group_coordinator_index(group_id)
                self._coordinator_call("add_offsets", (self.transactional_id, pid, epoch, group_id,
                                                       (OFFSETS_TOPIC, index)), deadline,
                                       "send_offsets_to_transaction()")
                self._commit_txn_offsets(norm, group_metadata, group_id=group_id, generation=generation,
                                         member_id=member_id, deadline=deadline)
            except BrokerError as err:
                if is_fatal_error(err):
                    raise self._txn_fatal(err) from None
                with self._lock:
                    txn.abortable(err)
                raise

    def _group_coordinator_index(self, group_id: str) -> int:
        info = ray.get(self.context.controller().cluster_info.remote(), timeout=self._request_timeout)
        return to_positive(murmur2(group_id.encode("utf-8"))) % int(info.get("group_coordinators", 1))

    def _commit_txn_offsets(self, offsets: dict[TopicPartition, int], group_metadata: Any, *, group_id: str,
                            generation: int, member_id: str | None, deadline: float) -> None:
        """Hand the transaction's offsets to the group coordinator (TxnOffsetCommit): they stay
        pending until the transaction's marker, then become visible (commit) or vanish (abort).
        Fenced by group generation and member id (KIP-447). Retried until the deadline."""
        name = group_coordinator_name(self._group_coordinator_index(group_id))
        pid, epoch = self.idempotence.producer_id, self.idempotence.producer_epoch
        backoff = self._backoff or 0.05
        while True:
            remaining = deadline - time.monotonic()
            try:
                handle = ray.get_actor(name, namespace=self.context.namespace)
                ray.get(handle.txn_offset_commit.remote(self.transactional_id, pid, epoch, group_id, generation,
                                                        member_id, dict(offsets)), timeout=max(0.001, remaining))
                return
            except Exception as exc:  # noqa: BLE001 - sorted below
                err = unwrap_error(exc)
                retriable = isinstance(err, (ValueError, *ACTOR_GONE, GetTimeoutError)) or (
                    isinstance(err, BrokerError) and err.retriable)
                if not retriable or time.monotonic() + backoff >= deadline:
                    if isinstance(err, BrokerError):
                        raise err from None
                    raise BrokerTimeoutError(f"committing offsets to {name} failed: {err}") from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    @contextlib.contextmanager
    def transaction(self, timeout: float | None = None) -> Iterator["Producer"]:
        """`with producer.transaction(): ...` begins a transaction, commits it when the block ends
        normally and aborts it when the block raises (the exception propagates). If the commit
        fails abortably, the transaction is aborted and `TransactionAbortableError` propagates."""
        self.begin_transaction()
        try:
            yield self
        except BaseException:
            if self._txn is not None and self._txn.state in (ClientTxnState.IN_TRANSACTION,
                                                             ClientTxnState.ABORTABLE_ERROR,
                                                             ClientTxnState.ABORTING):
                try:
                    self.abort_transaction(timeout)
                except Exception:  # noqa: BLE001 - keep the block's exception
                    log.exception("aborting transaction of %r failed", self.transactional_id)
            raise
        try:
            self.commit_transaction(timeout)
        except TransactionAbortableError:
            self.abort_transaction(timeout)
            raise

    # ------------------------------------------------------------------ transaction helpers
    def _require_txn(self) -> TransactionManager:
        if self._txn is None:
            raise InvalidTxnStateError("not a transactional producer: set transactional_id in ProducerConfig")
        return self._txn

    def _check_not_closed(self) -> None:
        if self._closed:
            raise InvalidRequestError("producer is closed")

    def _txn_deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self._max_block if timeout is None else max(0.0, timeout))

    def _txn_record_queued(self, size: int) -> None:
        """A record is being queued (lock held, `size` bytes reserved): the transaction must still
        be open; it now has data."""
        try:
            self._txn.check_send()
        except BaseException:
            self._used_bytes -= size
            self._space.notify_all()
            raise
        self._txn_started = True

    def _add_ahead(self, topic: str, plan: list) -> None:
        """Kafka's AddPartitionsToTxn: once the partitions of records of the open transaction are
        known, add the new ones in one coordinator call, without waiting for it. Otherwise each
        leader adds its partition when the first produce call reaches it, and calls held back in
        the buffer until commit (lingered call slots) each paid an add (a replicated coordinator
        append) at flush time. The leaders' adds remain the check; a lost or late add here is
        harmless (a late one carries an epoch the commit has since bumped, and is refused)."""
        if self._txn is None or not plan:
            return
        with self._lock:
            if self._txn.state not in (ClientTxnState.IN_TRANSACTION, ClientTxnState.COMMITTING) \
                    or self._txn_coordinator is None:
                return
            new = sorted({(topic, p) for p, _, _ in plan} - self._txn_added)
            if not new:
                return
            self._txn_added.update(new)
            args = (self.transactional_id, self.idempotence.producer_id, self.idempotence.producer_epoch, new)
            handle = self._txn_coordinator
        try:
            discard_ref(handle.add_partitions.remote(*args))
        except Exception:  # noqa: BLE001 - best effort: the leaders add their partitions anyway
            pass

    def _txn_record_failed(self, err: BaseException) -> None:
        """A record of the open transaction failed (sender thread or commit)."""
        with self._lock:
            if is_fatal_error(err):
                self._txn_fatal(err)
            elif self._txn.abortable(err):
                log.info("transaction of %r must be aborted: %r", self.transactional_id, err)

    def _txn_fatal(self, err: BaseException) -> BaseException:
        with self._lock:
            first = self._txn.state is not ClientTxnState.FATAL_ERROR
            fatal = self._txn.fatal(err)
            if first:
                log.warning("transactional producer %r: fatal error %r", self.transactional_id, err)
                self._drop_unsent = fatal
                self._wakeup.set()
            return fatal

    def _adopt_identity(self, producer_id: int, producer_epoch: int) -> None:
        """(lock held) Continue under this producer id / epoch; sequences restart at 0."""
        idem = self.idempotence
        idem.producer_id, idem.producer_epoch = int(producer_id), int(producer_epoch)
        idem.enabled = True
        idem.transactional = True
        idem.reset()

    def _end_txn(self, commit: bool, deadline: float) -> None:
        with self._lock:
            pid, epoch = self.idempotence.producer_id, self.idempotence.producer_epoch
        what = "commit_transaction()" if commit else "abort_transaction()"
        try:
            new_pid, new_epoch = self._coordinator_call(
                "end_txn", (self.transactional_id, pid, epoch, commit), deadline, what,
                retry_also=(InvalidTxnStateError,))
        except BrokerError as err:
            if is_fatal_error(err):
                raise self._txn_fatal(err) from None
            raise
        with self._lock:
            self._adopt_identity(new_pid, new_epoch)

    def _coordinator(self, refresh: bool = False):
        """Handle of this transactional id's coordinator (`txn-coordinator/<n>`)."""
        with self._lock:
            if self._txn_coordinator is not None and not refresh:
                return self._txn_coordinator
            count = self._txn_coordinators
        if count is None:
            info = ray.get(self.context.controller(refresh=refresh).cluster_info.remote(),
                           timeout=self._request_timeout)
            count = int(info["transaction_coordinators"])
        n = to_positive(murmur2(self.transactional_id.encode("utf-8"))) % count
        name = txn_coordinator_name(n)
        try:
            handle = ray.get_actor(name, namespace=self.context.namespace)
        except ValueError:
            raise CoordinatorNotAvailableError(f"transaction coordinator {name!r} not found") from None
        with self._lock:
            self._txn_coordinators = count
            self._txn_coordinator = handle
        return handle

    def _coordinator_call(self, method: str, args: tuple, deadline: float, what: str,
                          retry_also: tuple[type, ...] = ()) -> Any:
        """Call the coordinator, retrying retriable errors (same call: all are idempotent) and
        re-resolving the handle after actor errors, until `deadline` -> `BrokerTimeoutError`."""
        attempt = 0
        refresh = False
        last: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if attempt > 0 and remaining <= 0:
                raise BrokerTimeoutError(f"{what} for transactional id {self.transactional_id!r} did not complete "
                                         f"in time ({attempt} attempts); last error: {last!r}")
            try:
                handle = self._coordinator(refresh=refresh)
                ref = getattr(handle, method).remote(*args)
                return ray.get(ref, timeout=max(0.05, min(remaining, self._request_timeout)))
            except Exception as exc:  # noqa: BLE001 - sorted below
                err = unwrap_error(exc)
                if isinstance(err, (*ACTOR_GONE, GetTimeoutError)):
                    refresh = True
                elif isinstance(err, BrokerError) and (err.retriable or isinstance(err, retry_also)):
                    refresh = isinstance(err, (NotCoordinatorError, CoordinatorNotAvailableError))
                else:
                    raise err from None
                last = err
            attempt += 1
            log.debug("%s: retrying %s after %r", self.transactional_id, method, last)
            time.sleep(max(0.0, min(self._backoff * min(2 ** (attempt - 1), 10), 1.0,
                                    deadline - time.monotonic())))

    # ============================================================================== caller side helpers
    def _info(self, topic: str, refresh: bool = False) -> _TopicInfo:
        md = self.context.topic_metadata(topic, refresh=refresh)
        info = self._topic_info.get(topic)
        if info is None or info.md is not md:
            info = _TopicInfo(md, self.config.max_message_bytes)
            self._topic_info[topic] = info
        return info

    @staticmethod
    def _available(info: _TopicInfo) -> list[int]:
        return [ps.partition for ps in info.md.partitions if ps.leader is not None]

    @staticmethod
    def _chunk_limit(info: _TopicInfo) -> int:
        # leave room for IPC framing so a chunk the client accepts is not rejected by the broker
        return max(1024, info.max_bytes - min(64 * 1024, info.max_bytes // 16))

    @staticmethod
    def _normalize_headers(headers) -> tuple[list[tuple[str, bytes]], int]:
        if not isinstance(headers, (list, tuple)):
            raise InvalidRequestError("headers must be a list of (str, bytes) pairs")
        out = []
        size = 8
        for item in headers:
            try:
                hk, hv = item
            except (TypeError, ValueError):
                raise InvalidRequestError(f"header {item!r} is not a (str, bytes) pair") from None
            if not isinstance(hk, str):
                raise InvalidRequestError(f"header key {hk!r} must be str")
            hv = _to_bytes(hv, "header value")
            out.append((hk, hv))
            size += len(hk) + (len(hv) if hv is not None else 0) + 8
        return out, size

    def _too_large(self, size: int, info) -> RecordTooLargeError:
        if size > info.max_bytes:
            return RecordTooLargeError(
                f"record of about {size} bytes is larger than max.message.bytes = {info.max_bytes}")
        # as Kafka: one record must fit in the buffer, or it could never be queued beside others
        return RecordTooLargeError(f"record of about {size} bytes is larger than buffer.memory = "
                                   f"{self._buffer_memory}")

    def _reserve(self, size: int) -> None:
        """Reserve buffer memory (lock held); blocks up to max_block_ms when full."""
        limit = self.config.buffer_memory
        if self._used_bytes + size > limit and self._used_bytes > 0 \
                and threading.current_thread() is not self._thread:
            deadline = time.monotonic() + self._max_block
            self._wakeup.set()
            while self._used_bytes + size > limit and self._used_bytes > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerTimeoutError(
                        f"buffer.memory ({limit} bytes) full for max.block.ms = {self.config.max_block_ms}")
                self._space.wait(remaining)
                if self._closed:
                    raise InvalidRequestError("producer is closed")
        self._used_bytes += size

    def _release(self, st: BatchState) -> None:
        with self._lock:
            self._incomplete.discard(st)
            self._used_bytes -= st.nbytes
            self._space.notify_all()
            if self._txn is not None:
                err = st.first_error()
                if err is not None:
                    self._txn_record_failed(err)

    def _add_piece(self, topic: str, partition: int, piece: _Piece) -> None:
        """Queue a piece (lock held)."""
        key = (topic, partition)
        acc = self._accs.get(key)
        if acc is None:
            acc = self._accs[key] = _PartitionAcc(topic, partition)
        if not acc.pending:
            acc.first_time = piece.created
        acc.pending.append(piece)
        acc.pending_bytes += piece.size

    # ============================================================================== sender thread
    def _run(self) -> None:
        while True:
            try:
                if not self._run_once():
                    return
            except Exception as exc:  # a bug: fail what we hold rather than hang callers
                log.exception("producer sender loop failed")
                self._fail_everything(exc)
                time.sleep(0.01)

    def _run_once(self) -> bool:
        self._wakeup.clear()
        if self._abort is not None:
            self._fail_everything(self._abort)
            return False
        if self._drop_unsent is not None:
            self._fail_unsent()
        now = time.monotonic()
        next_wake = now + 0.1
        snaps = []
        lingered = self._lingered_by_node(now)
        with self._lock:
            flushing = self._flushing > 0 or self._closed
            for tb in self._buffers.values():
                if tb.state is None:
                    continue
                due = tb.first_time + self._linger   # linger of send() records happens here
                if flushing or tb.nbytes >= tb.threshold:
                    snaps.append(tb.swap())
                elif now >= due:
                    # Partitioning costs about a millisecond however few the records: when no
                    # lingered batch can go out before a call returns, do it later, in one pass.
                    if self._lingered_slot_free(tb.topic, lingered):
                        snaps.append(tb.swap())
                elif due < next_wake:
                    next_wake = due
        for snap in snaps:
            self._partition_records(snap)
        with self._lock:
            accs = [a for a in self._accs.values() if a.pending or a.inflight]
        accs.sort(key=lambda a: a.first_time if a.pending else now)   # lingered slots: oldest first
        for acc in accs:
            t = self._service(acc, now, flushing, lingered)
            if t is not None and t < next_wake:
                next_wake = t
        if not self._refs:
            with self._lock:
                idle = not accs and not any(tb.state is not None for tb in self._buffers.values())
                if self._stop and idle and not self._incomplete:
                    return False
            timeout = max(0.0, next_wake - time.monotonic())
            if accs or not idle:
                timeout = min(timeout, max(self._linger, 0.001))
            self._wakeup.wait(timeout)
            return True
        timeout = min(max(0.0, next_wake - time.monotonic()), 0.005)
        refs = list(self._refs)
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
            ready += more
        touched = {}
        for ref in ready:
            b = self._refs.pop(ref, None)
            if b is not None:
                self._on_result(b, ref)
                touched[(b.topic, b.partition)] = True
        for key in touched:
            acc = self._accs.get(key)
            if acc is not None:
                self._pop_completed(acc)
        return True

    # ------------------------------------------------------------------ records -> pieces
    def _partition_records(self, snap: tuple) -> None:
        keys, values, headers, timestamps, partitions, st, first_time, has_h, has_p, has_k = snap
        topic = st.topic
        try:
            info = self._info(topic)
            n = len(values)
            key_arr = _binary_array(keys) if has_k else pa.nulls(n, pa.binary())
            ts_arr = pa.array(np.fromiter(timestamps, dtype=np.int64, count=n)).cast(TIMESTAMP_TYPE)
            cols = [ts_arr, key_arr, _binary_array(values),
                    pa.array(headers, type=HEADERS_TYPE) if has_h else pa.nulls(n, HEADERS_TYPE)]
            rb = pa.RecordBatch.from_arrays(cols, schema=stored_schema(None))
            explicit = pa.array(partitions, type=pa.int64()).fill_null(-1).to_numpy() if has_p else None
            parts = compute_partitions(rb, info.num_partitions, topic, self.sticky, explicit=explicit,
                                       key_column="key" if has_k else None, available=self._available(info))
            st.set_rows(parts)
            plan = plan_batch(rb, parts, self._chunk_limit(info))
        except BaseException as exc:
            st.fail(exc)
            return
        self._add_ahead(topic, plan)
        with self._lock:
            st.add_pieces(len(plan))
            for p, sub, rows in plan:
                self._add_piece(topic, p, _Piece(sub, st, rows, first_time))
        st.seal()

    # ------------------------------------------------------------------ per-partition service
    def _lingered_by_node(self, now: float) -> dict:
        """Lingered (not full) produce calls in flight per leader node. A call out for longer than
        LINGERED_SLOT_HOLD_S gives its slot back: a hung leader (paused process, dying actor) must
        not hold up the other partitions of its node until request.timeout.ms."""
        out: dict = {}
        for b in self._refs.values():
            if b.lingered and now - b.sent_at < LINGERED_SLOT_HOLD_S:
                out[b.node] = out.get(b.node, 0) + 1
        return out

    def _leader_node(self, topic: str, partition: int) -> str | None:
        info = self._topic_info.get(topic)
        if info is None or not 0 <= partition < info.num_partitions:
            return None
        return info.md.partitions[partition].leader_node

    def _lingered_slot_free(self, topic: str, lingered: dict) -> bool:
        info = self._topic_info.get(topic)
        if info is None:
            return True
        cap = self._lingered_cap
        return any(lingered.get(ps.leader_node, 0) < cap for ps in info.md.partitions)

    def _service(self, acc: _PartitionAcc, now: float, flushing: bool, lingered: dict) -> float | None:
        """Expire, retry and send for one partition; returns when it next needs attention.

        Pipelining (several calls in flight) is for full batches. A batch sent because its linger
        ran out waits while a call to its partition is in flight, and keeps growing meanwhile:
        Kafka's in-flight limit is per broker connection, shared by all its partitions, while here
        each partition leader is its own actor, so five small calls per partition multiplied the
        calls (about 1 ms of CPU per side each) and the queueing: the W5 end-to-end latency
        (6 partitions at 10k records/s) was several times higher. For the same reason the
        lingered batches to one node share `max_lingered_requests_per_node` calls in flight, oldest
        first (the caller sorts): W5 p99 570-880 -> 340-400 ms with 2 instead of one per partition."""
        wake: float | None = None
        # request timeouts of calls in flight: outcome unknown, retry
        for b in acc.inflight:
            # the broker answers BrokerTimeoutError itself after timeout_ms; give it some grace first
            if b.status == _INFLIGHT and now - b.sent_at > self._request_timeout * 1.25 + 1.0:
                self._refs.pop(b.ref, None)
                discard_ref(b.ref)
                self._schedule_retry(b, BrokerTimeoutError(
                    f"produce to {b.topic}-{b.partition} got no answer within request.timeout.ms"), True, now)
        self._pop_completed(acc)
        if acc.inflight:
            head = acc.inflight[0]
            if head.status == _RETRY and head.resequence:
                self._resequence(acc)
            if head.status == _RETRY:
                if now >= head.deadline:
                    self._expire(head)
                    self._pop_completed(acc)
                elif now >= head.retry_at:
                    self._submit(head, now)
                else:
                    wake = head.retry_at
        blocked = any(b.status == _RETRY for b in acc.inflight)
        # expire pending pieces that waited longer than delivery.timeout.ms
        while acc.pending and now - acc.pending[0].created > self._delivery_timeout:
            with self._lock:
                piece = acc.pending.popleft()
                acc.pending_bytes -= piece.size
                if acc.pending:
                    acc.first_time = acc.pending[0].created
            piece.state.piece_failed(piece.rows, BrokerTimeoutError(
                f"record for {acc.topic}-{acc.partition} not sent within delivery.timeout.ms"))
        max_inflight = self._max_inflight
        if self.strict_ordering and not self.idempotence.enabled:
            max_inflight = 1
        if self.idempotence.enabled and any(o.producer_id != self.idempotence.producer_id
                                            and o.status not in (_DONE, _FAILED) for o in acc.inflight):
            blocked = True      # never two producer ids in flight on one partition (keeps order)
        while not blocked and acc.pending and len(acc.inflight) < max_inflight:
            due = acc.first_time + self._linger
            full = acc.pending_bytes >= self._batch_size
            if not (flushing or full or now >= due):
                wake = due if wake is None else min(wake, due)
                break
            node = None
            if not (full or flushing):
                if any(o.status == _INFLIGHT for o in acc.inflight):
                    break   # a lingered (not full) batch waits for the call in flight; see the docstring
                node = self._leader_node(acc.topic, acc.partition)
                if lingered.get(node, 0) >= self._lingered_cap:
                    break
            b = self._drain(acc, now)
            b.lingered = not (full or flushing)
            b.node = node
            acc.inflight.append(b)
            self._submit(b, now)
            if b.lingered and b.status == _INFLIGHT:
                lingered[node] = lingered.get(node, 0) + 1
            blocked = b.status == _RETRY
            if b.status in (_DONE, _FAILED):
                self._pop_completed(acc)
        if blocked and wake is None and acc.inflight:
            wake = min((b.retry_at for b in acc.inflight if b.status == _RETRY), default=None)
        return wake

    def _drain(self, acc: _PartitionAcc, now: float) -> _ProduceBatch:
        """Build ONE batch from the partition's pending pieces (up to batch_size / max bytes)."""
        info = self._topic_info.get(acc.topic)
        limit = self._chunk_limit(info) if info is not None else self.config.max_message_bytes
        with self._lock:
            pieces = [acc.pending.popleft()]
            total = pieces[0].size
            while acc.pending and total < self._batch_size:
                nb = acc.pending[0].size
                if total + nb > limit:
                    break
                pieces.append(acc.pending.popleft())
                total += nb
            acc.pending_bytes -= total
            if acc.pending:
                acc.first_time = acc.pending[0].created
        if len(pieces) == 1:
            batch = pieces[0].batch
            if batch.num_rows and batch.column(0).offset:  # a slice: compact it before shipping
                batch = pa.concat_batches([batch])
        else:
            batch = pa.concat_batches([p.batch for p in pieces])
        created = min(p.created for p in pieces)
        b = _ProduceBatch(acc.topic, acc.partition, batch, pieces, created, created + self._delivery_timeout)
        b.producer_id, b.producer_epoch, b.base_sequence = self.idempotence.assign(
            acc.topic, acc.partition, batch.num_rows)
        return b

    def _new_producer_id(self) -> None:
        """A fresh producer id (never handed out before, also across cluster restarts), epoch 0."""
        ctx = self.context
        for attempt in range(100):
            try:
                pid = ray.get(ctx.controller(refresh=attempt > 0).allocate_producer_ids.remote(1),
                              timeout=self._request_timeout)
                break
            except (*ACTOR_GONE, GetTimeoutError, BrokerError, ValueError) as exc:
                if attempt == 99:
                    raise BrokerTimeoutError(f"could not obtain a producer id: {exc}") from None
                time.sleep(min(1.0, self._backoff * (attempt + 1)))
        idem = self.idempotence
        idem.producer_id, idem.producer_epoch, idem.enabled = int(pid), 0, True
        idem.reset()

    def _resequence(self, acc: _PartitionAcc) -> None:
        """The broker forgot our producer id (expired): continue under a new id, renumbering every
        unacknowledged batch of this partition in order. They were all refused (unknown id and a
        sequence other than 0), so sending them again cannot duplicate."""
        head = acc.inflight[0]
        if head.producer_id == self.idempotence.producer_id:
            self._new_producer_id()
        for b in acc.inflight:
            if b.status == _DONE:
                continue
            if b.ref is not None:
                self._refs.pop(b.ref, None)
                discard_ref(b.ref)
                b.ref = None
            b.producer_id, b.producer_epoch, b.base_sequence = self.idempotence.assign(
                b.topic, b.partition, b.batch.num_rows)
            b.status = _RETRY
            b.resequence = False
            b.retry_at = 0.0

    def _submit(self, b: _ProduceBatch, now: float) -> None:
        ctx = self.context
        try:
            leader, handle = ctx.leader_handle(b.topic, b.partition)
            args = (to_wire(b.batch), self._acks, int(self._request_timeout * 1000), b.producer_id, b.producer_epoch,
                    b.base_sequence, self.idempotence.transactional)
            if self.transactional_id is not None:
                args += (self.transactional_id,)   # the leader adds the partition to the transaction
            ref = handle.produce.remote(*args)
        except BaseException as exc:
            err = unwrap_error(exc)
            if isinstance(err, BrokerError) and not err.retriable:
                self._finish(b, error=err)
            elif isinstance(err, (BrokerError, *ACTOR_GONE)):
                ctx.on_error(b.topic, b.partition)
                self._schedule_retry(b, err, False, now)
            else:
                self._finish(b, error=err)
            return
        b.leader = leader
        b.sent_at = now
        b.sent_behind = False
        acc = self._accs.get((b.topic, b.partition))
        if acc is not None:
            for other in acc.inflight:
                if other is b:
                    break
                if other.status not in (_DONE, _FAILED):
                    b.sent_behind = True
                    break
        b.attempts += 1
        b.status = _INFLIGHT
        info = self._topic_info.get(b.topic)
        if info is not None:
            self.sticky.on_batch_sent(b.topic, b.partition, info.num_partitions, self._available(info))
        if self._acks == 0:
            b.status = _DONE
            b.base_offset = -1
            return
        b.ref = ref
        self._refs[ref] = b

    def _on_result(self, b: _ProduceBatch, ref) -> None:
        now = time.monotonic()
        try:
            res = ray.get(ref, timeout=0)
        except BaseException as exc:
            err = unwrap_error(exc)
            if isinstance(err, OutOfOrderSequenceError) and b.sent_behind and b.base_sequence >= 0:
                # overtook an earlier batch in flight (Ray may reorder concurrent calls): resend it
                # once it is at the head of the line; a real gap fails it there.
                b.sent_behind = False
                self._schedule_retry(b, err, False, now, backoff=0.0)
                return
            if isinstance(err, UnknownProducerIdError) and b.base_sequence >= 0 and self._txn is None:
                b.resequence = True
                self._schedule_retry(b, err, False, now, backoff=0.0)
                return
            retriable = isinstance(err, ACTOR_GONE) or (isinstance(err, BrokerError) and err.retriable)
            if retriable:
                self.context.on_error(b.topic, b.partition, b.leader if isinstance(err, ACTOR_GONE) else None)
                self._schedule_retry(b, err, _is_ambiguous(err), now)
            else:
                self._finish(b, error=err)
            return
        b.base_offset = int(res.base_offset)
        b.status = _DONE

    def _schedule_retry(self, b: _ProduceBatch, err: BaseException, ambiguous: bool, now: float,
                        backoff: float | None = None) -> None:
        b.status = _RETRY
        b.ref = None
        b.ambiguous = b.ambiguous or ambiguous
        b.last_error = err
        b.retry_at = now + (self._backoff if backoff is None else backoff)
        log.debug("retrying produce to %s-%d after %r", b.topic, b.partition, err)

    def _expire(self, b: _ProduceBatch) -> None:
        msg = (f"produce to {b.topic}-{b.partition} not acknowledged within delivery.timeout.ms "
               f"({self.config.delivery_timeout_ms} ms, {b.attempts} attempts); last error: {b.last_error}")
        if b.ambiguous:
            self._finish(b, error=UnknownOutcomeError(msg + "; the records may or may not have been written"))
        else:
            self._finish(b, error=BrokerTimeoutError(msg))

    def _finish(self, b: _ProduceBatch, error: BaseException | None = None) -> None:
        b.status = _FAILED if error is not None else _DONE
        b.error = error
        b.ref = None
        if error is not None and b.base_sequence >= 0 and b.producer_id == self.idempotence.producer_id:
            self._repair_sequence(b, error)

    def _repair_sequence(self, b: _ProduceBatch, error: BaseException) -> None:
        """A batch that will never be appended leaves a hole in the partition's sequence.

        If it was the partition's last numbered batch, the next batch simply reuses its sequence.
        Otherwise (or if the outcome is unknown) continue under a new producer id, as Kafka's
        epoch bump does (KIP-360): calls still in flight under the old id can then never land
        behind renumbered ones, because the broker refuses them as a gap.
        """
        if isinstance(error, (InvalidProducerEpochError, ProducerFencedError)):
            return                                   # fatal: nothing to repair
        acc = self._accs.get((b.topic, b.partition))
        later = [o for o in (acc.inflight if acc else ()) if o is not b and o.status not in (_DONE, _FAILED)
                 and o.base_sequence >= 0]
        ambiguous = b.ambiguous or isinstance(error, (UnknownOutcomeError, OutOfOrderSequenceError))
        key = (b.topic, b.partition)
        if not ambiguous and not later and self.idempotence.next_sequence.get(key) == (
                b.base_sequence + b.batch.num_rows) % SEQUENCE_MODULUS:
            self.idempotence.next_sequence[key] = b.base_sequence
            return
        if self._txn is not None:
            # transactional: the failure makes the transaction abortable; its abort bumps the epoch
            # and restarts every sequence at 0 (the producer id belongs to the coordinator)
            return
        self._new_producer_id()
        for o in later:
            if o.ref is not None:
                self._refs.pop(o.ref, None)
                discard_ref(o.ref)
                o.ref = None
            o.producer_id, o.producer_epoch, o.base_sequence = self.idempotence.assign(
                o.topic, o.partition, o.batch.num_rows)
            o.status = _RETRY
            o.retry_at = 0.0

    def _pop_completed(self, acc: _PartitionAcc) -> None:
        """Complete finished batches at the head of the line, in order."""
        while acc.inflight and acc.inflight[0].status in (_DONE, _FAILED):
            b = acc.inflight.popleft()
            pos = 0
            for piece in b.pieces:
                n = len(piece.rows)
                if b.status == _DONE:
                    piece.state.piece_succeeded(piece.rows, b.base_offset + pos if b.base_offset >= 0 else -1)
                else:
                    piece.state.piece_failed(piece.rows, b.error)
                pos += n
            b.pieces = []
            b.batch = None

    def _fail_unsent(self) -> None:
        """(sender thread) Fail every record not sent yet: after a fatal error, or on abort."""
        with self._lock:
            exc, self._drop_unsent = self._drop_unsent, None
            if exc is None:
                return
            snaps = [tb.swap() for tb in self._buffers.values() if tb.state is not None]
            pieces: list[_Piece] = []
            for acc in self._accs.values():
                pieces.extend(acc.pending)
                acc.pending.clear()
                acc.pending_bytes = 0
        for snap in snaps:
            snap[5].fail(exc)
        for piece in pieces:
            piece.state.piece_failed(piece.rows, exc)

    def _fail_everything(self, exc: BaseException) -> None:
        with self._lock:
            snaps = [tb.swap() for tb in self._buffers.values() if tb.state is not None]
            accs = list(self._accs.values())
            self._accs.clear()
            for ref in self._refs:
                discard_ref(ref)
            self._refs.clear()
            states = list(self._incomplete)
        for snap in snaps:
            snap[5].fail(exc)
        for acc in accs:
            for piece in acc.pending:
                piece.state.piece_failed(piece.rows, exc)
            for b in acc.inflight:
                for piece in b.pieces:
                    piece.state.piece_failed(piece.rows, exc)
        for st in states:
            st.fail(exc)

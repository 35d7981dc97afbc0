"""Pure building blocks of the exactly-once processing helper (no Ray, no I/O; unit-tested alone).

- `CommitPolicy`: when the open read-process-write transaction is due for commit, and how long a
  worker may block in ``poll()`` meanwhile.
- `TxnTracker`: what the open transaction consumed: per input partition the first offset it read
  (where to rewind on abort) and the next offset to read (what `send_offsets_to_transaction` commits).
- `KeyValueState`: a worker's in-memory key-value state of one input partition, with an undo log
  (an aborted transaction's changes are rolled back) and the set of keys changed in the open
  transaction (written to the state topic, in the same transaction, at commit).
- `normalize_outputs`: what the user's function returned -> ``[Output(topic, batch, ...)]``.
- `classify_error`: what a worker does about an error (abort and retry, recreate its clients, fail).
- `restart_decision`: what the supervisor does when a worker ended.
"""
from __future__ import annotations

import enum
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import pyarrow as pa

from ..errors import (BrokerError, IllegalGenerationError, InvalidProducerEpochError, InvalidRequestError,
                      ProducerFencedError, RebalanceInProgressError, UnknownMemberIdError)
from ..records import TopicPartition

__all__ = [
    "CommitPolicy", "TxnTracker", "KeyValueState", "Output", "ProcessContext", "normalize_outputs",
    "ErrorAction", "classify_error", "RestartAction", "restart_decision", "transactional_id_for",
    "worker_actor_name", "wants_context", "IdentitySerde", "IntSerde", "JsonSerde",
]


# ------------------------------------------------------------------------------------------ identity
def transactional_id_for(group_id: str, index: int, prefix: str | None = None) -> str:
    """The transactional.id of worker `index`: stable across restarts of that worker, so a
    replacement fences the instance it replaces (and only that one)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"worker index must be an int >= 0, got {index!r}")
    return f"{prefix if prefix is not None else group_id}-worker-{index}"


def worker_actor_name(group_id: str, index: int) -> str:
    """Ray actor name of worker `index` (named, so two live instances of one index cannot exist)."""
    return f"processing/{group_id}/worker-{index}"


# ------------------------------------------------------------------------------------------ commits
@dataclass(frozen=True)
class CommitPolicy:
    """Commit the open transaction `commit_interval_ms` after it began (Kafka Streams'
    commit.interval.ms), or earlier once it holds `max_records_per_txn` input records.

    ``idle_poll_ms``: how long ``poll()`` may block while no transaction is open (bounds how fast
    a worker notices `stop()`)."""
    commit_interval_ms: int = 100
    max_records_per_txn: int | None = None
    idle_poll_ms: int = 200

    def __post_init__(self):
        if isinstance(self.commit_interval_ms, bool) or not isinstance(self.commit_interval_ms, int) \
                or self.commit_interval_ms < 0:
            raise ValueError(f"commit_interval_ms must be an int >= 0, got {self.commit_interval_ms!r}")
        if self.max_records_per_txn is not None and self.max_records_per_txn <= 0:
            raise ValueError(f"max_records_per_txn must be > 0 or None, got {self.max_records_per_txn!r}")
        if self.idle_poll_ms <= 0:
            raise ValueError(f"idle_poll_ms must be > 0, got {self.idle_poll_ms!r}")

    def commit_due(self, tracker: "TxnTracker", now: float) -> bool:
        if not tracker.open:
            return False
        if self.max_records_per_txn is not None and tracker.records >= self.max_records_per_txn:
            return True
        return (now - tracker.opened_at) * 1000.0 >= self.commit_interval_ms - 1e-6

    def poll_timeout(self, tracker: "TxnTracker", now: float) -> float:
        """Seconds ``poll()`` may block: until the open transaction is due, else `idle_poll_ms`."""
        if not tracker.open:
            return self.idle_poll_ms / 1000.0
        left = self.commit_interval_ms / 1000.0 - (now - tracker.opened_at)
        return max(0.0, min(left, self.idle_poll_ms / 1000.0))


class TxnTracker:
    """What the open transaction has consumed.

    ``start[tp]``: offset of the first record of `tp` read in this transaction (the committed
    position; where to rewind on abort). ``next[tp]``: next offset to read (committed with the
    transaction). `committed` remembers, per partition, the last offset this worker committed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.open = False
        self.opened_at = 0.0
        self.records = 0
        self.start: dict[TopicPartition, int] = {}
        self.next: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.outputs = 0

    def begin(self, now: float | None = None) -> None:
        if self.open:
            raise InvalidRequestError("a transaction is already open")
        self.open = True
        self.opened_at = self._clock() if now is None else now
        self.records = 0
        self.outputs = 0
        self.start.clear()
        self.next.clear()

    def consumed(self, tp: TopicPartition, first_offset: int, next_offset: int, records: int) -> None:
        """Records [first_offset, next_offset) of `tp` were read (and processed) in this transaction."""
        if not self.open:
            raise InvalidRequestError("no transaction is open")
        if next_offset < first_offset:
            raise ValueError(f"next offset {next_offset} < first offset {first_offset} for {tp}")
        prev = self.next.get(tp)
        if prev is not None and first_offset < prev:
            raise ValueError(f"{tp}: records from {first_offset} read again in one transaction (next was {prev})")
        self.start.setdefault(tp, first_offset)
        self.next[tp] = max(next_offset, prev or 0)
        self.records += records

    def advance(self, tp: TopicPartition, position: int) -> None:
        """The consumer's position of `tp` moved past records it will never return (control
        records, aborted data): commit that too, so the group's offset reaches the end."""
        if not self.open:
            raise InvalidRequestError("no transaction is open")
        if position > self.next.get(tp, self.committed.get(tp, -1)):
            self.start.setdefault(tp, self.committed.get(tp, position))
            self.next[tp] = position

    def offsets(self) -> dict[TopicPartition, int]:
        """{tp: next offset} to commit with the transaction."""
        return dict(self.next)

    def rewind_points(self) -> dict[TopicPartition, int]:
        """{tp: offset} to seek to after an abort (the first offset this transaction read)."""
        return dict(self.start)

    def committed_ok(self) -> dict[TopicPartition, int]:
        """The transaction committed: remember its offsets; close it. Returns the offsets."""
        offs = dict(self.next)
        self.committed.update(offs)
        self._close()
        return offs

    def aborted(self) -> dict[TopicPartition, int]:
        """The transaction aborted: close it; returns the rewind points."""
        points = dict(self.start)
        self._close()
        return points

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions no longer owned (revoked / lost): forget what was committed for them."""
        for tp in tps:
            self.committed.pop(tp, None)
            self.start.pop(tp, None)
            self.next.pop(tp, None)

    def _close(self) -> None:
        self.open = False
        self.records = 0
        self.outputs = 0
        self.start.clear()
        self.next.clear()

    def age(self, now: float | None = None) -> float:
        return ((self._clock() if now is None else now) - self.opened_at) if self.open else 0.0


# ------------------------------------------------------------------------------------------ state
_MISSING = object()


class KeyValueState:
    """Key-value state of ONE input partition (a Kafka Streams state store, in memory).

    Keys are ``bytes`` or ``str`` (stored as bytes); values are anything the pipeline's serde
    encodes. Changes made in the open transaction are remembered (old values in an undo log, the
    changed keys for the changelog): `dirty_items()` is what the worker writes to the state topic
    at commit, `commit()` / `rollback()` end the transaction. Vectorised helpers `get_many` /
    `put_many` take sequences (lists, Arrow arrays)."""

    def __init__(self, items: Mapping[bytes, Any] | None = None):
        self._data: dict[bytes, Any] = {}
        self._undo: dict[bytes, Any] = {}
        if items:
            for k, v in items.items():
                self._data[_key(k)] = v

    # reads
    def get(self, key, default=None):
        return self._data.get(_key(key), default)

    def get_many(self, keys, default=None) -> list:
        get = self._data.get
        return [get(_key(k), default) for k in _iter_keys(keys)]

    def __contains__(self, key) -> bool:
        return _key(key) in self._data

    def __len__(self) -> int:
        return len(self._data)

    def items(self):
        return self._data.items()

    def to_dict(self) -> dict[bytes, Any]:
        return dict(self._data)

    # writes
    def put(self, key, value) -> None:
        k = _key(key)
        if value is None:
            self.delete(k)
            return
        if k not in self._undo:
            self._undo[k] = self._data.get(k, _MISSING)
        self._data[k] = value

    def put_many(self, keys, values) -> None:
        keys = list(_iter_keys(keys))
        values = values.to_pylist() if hasattr(values, "to_pylist") else list(values)
        if len(keys) != len(values):
            raise ValueError(f"put_many: {len(keys)} keys but {len(values)} values")
        for k, v in zip(keys, values):
            self.put(k, v)

    def delete(self, key) -> None:
        k = _key(key)
        if k not in self._data and k not in self._undo:
            return
        if k not in self._undo:
            self._undo[k] = self._data.get(k, _MISSING)
        self._data.pop(k, None)

    # transactions
    @property
    def dirty(self) -> bool:
        return bool(self._undo)

    def dirty_items(self) -> list[tuple[bytes, Any]]:
        """(key, value or None for deleted) of every key changed in the open transaction whose
        value differs from before it, sorted by key."""
        out = []
        for k in sorted(self._undo):
            old = self._undo[k]
            new = self._data.get(k, _MISSING)
            if new is old or (new is not _MISSING and old is not _MISSING and new == old):
                continue
            out.append((k, None if new is _MISSING else new))
        return out

    def commit(self) -> None:
        self._undo.clear()

    def rollback(self) -> None:
        for k, old in self._undo.items():
            if old is _MISSING:
                self._data.pop(k, None)
            else:
                self._data[k] = old
        self._undo.clear()

    def restore(self, key: bytes, value) -> None:
        """Apply one changelog record (restoration; not part of a transaction)."""
        k = _key(key)
        if value is None:
            self._data.pop(k, None)
        else:
            self._data[k] = value


def _key(k) -> bytes:
    if isinstance(k, bytes):
        return k
    if isinstance(k, str):
        return k.encode()
    if isinstance(k, (bytearray, memoryview)):
        return bytes(k)
    if hasattr(k, "as_py"):
        return _key(k.as_py())
    raise TypeError(f"state keys are bytes or str, got {type(k).__name__}")


def _iter_keys(keys):
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        return keys.to_pylist()
    return keys


class IdentitySerde:
    """State values are bytes already."""

    @staticmethod
    def dumps(v) -> bytes:
        if not isinstance(v, (bytes, bytearray)):
            raise TypeError(f"state value must be bytes with the default serde, got {type(v).__name__}; "
                            "pass state_serde=IntSerde / JsonSerde / your own (dumps, loads)")
        return bytes(v)

    @staticmethod
    def loads(b: bytes):
        return b


class IntSerde:
    """Integer state values, stored as decimal text (readable by `ray-broker consume`)."""

    @staticmethod
    def dumps(v) -> bytes:
        return b"%d" % int(v)

    @staticmethod
    def loads(b: bytes) -> int:
        return int(b)


class JsonSerde:
    @staticmethod
    def dumps(v) -> bytes:
        import json

        return json.dumps(v, separators=(",", ":"), sort_keys=True).encode()

    @staticmethod
    def loads(b: bytes):
        import json

        return json.loads(b)


# ------------------------------------------------------------------------------------------ user function
@dataclass
class ProcessContext:
    """Second argument of a processing function declared as ``fn(batch, ctx)``."""
    partition: TopicPartition          # the input partition the batch comes from
    worker_index: int
    transactional_id: str
    state: KeyValueState | None = None  # this input partition's state (pipelines with a state_topic)
    extra: dict = field(default_factory=dict)


def wants_context(fn: Callable) -> bool:
    """True if `fn` takes two positional arguments (batch, ctx), False for ``fn(batch)``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
        return True
    return len(positional) >= 2


@dataclass(frozen=True)
class Output:
    """Records for one topic: `batch` (RecordBatch / Table / dict of columns / list of row dicts),
    optionally all to `partition`, or partitioned by murmur2 of `key_column` (default topics:
    the ``key`` column when present)."""
    topic: str
    batch: Any
    key_column: str | None = None
    partition: int | None = None


READ_ONLY_COLUMNS = ("offset",)


def _as_batch(data, what: str) -> pa.RecordBatch | pa.Table:
    if isinstance(data, (pa.RecordBatch, pa.Table)):
        return data
    if isinstance(data, Mapping):
        return pa.RecordBatch.from_pydict(dict(data))
    if isinstance(data, list):
        if not data:
            return pa.RecordBatch.from_pylist([])
        if all(isinstance(r, Mapping) for r in data):
            return pa.RecordBatch.from_pylist(data)
    raise TypeError(f"{what}: expected a pyarrow RecordBatch/Table, a dict of columns, a list of row dicts, "
                    f"a dict {{topic: batch}}, Output(...) or a list of Output, got {type(data).__name__}")


def _drop_read_only(b):
    names = b.schema.names
    drop = [n for n in READ_ONLY_COLUMNS if n in names]
    if not drop:
        return b
    keep = [i for i, n in enumerate(names) if n not in drop]
    if isinstance(b, pa.Table):
        return b.select(keep)
    return pa.RecordBatch.from_arrays([b.column(i) for i in keep], names=[names[i] for i in keep])


def normalize_outputs(result, output_topic: str | None) -> list[Output]:
    """What a processing function returned, as a list of `Output` with Arrow data.

    - ``None``: nothing;
    - a RecordBatch / Table / dict of columns / list of row dicts: records for `output_topic`;
    - ``Output(...)`` or a list of them;
    - ``{topic_name: batch}`` (keys are topic names when the values are batches / lists / Outputs).
    The consumer's read-only ``offset`` column is dropped (``timestamp`` is kept: a copier keeps
    the input's timestamps); empty batches are left out."""
    if result is None:
        return []
    outs: list[Output] = []
    if isinstance(result, Output):
        items = [result]
    elif isinstance(result, list) and result and all(isinstance(o, Output) for o in result):
        items = list(result)
    elif isinstance(result, Mapping) and result and all(
            isinstance(k, str) and (v is None or isinstance(v, (pa.RecordBatch, pa.Table, Output))
                                    or (isinstance(v, list) and bool(v) and all(isinstance(r, Mapping) for r in v)))
            for k, v in result.items()):
        items = []
        for topic, v in result.items():
            if v is None:
                continue
            if isinstance(v, Output):
                items.append(Output(topic, v.batch, v.key_column, v.partition))
            else:
                items.append(Output(topic, v))
    else:
        if output_topic is None:
            raise TypeError("the function returned records but the pipeline has no output_topic; "
                            "return {topic: batch} or Output(topic, batch)")
        items = [Output(output_topic, result)]
    for o in items:
        b = _drop_read_only(_as_batch(o.batch, f"output for topic {o.topic!r}"))
        if b.num_rows == 0:
            continue
        outs.append(Output(o.topic, b, o.key_column, o.partition))
    return outs


# ------------------------------------------------------------------------------------------ errors
class ErrorAction(enum.Enum):
    ABORT_AND_RETRY = "abort_and_retry"   # abort the transaction, rewind, carry on
    RECREATE = "recreate"                 # producer fenced / unusable: new producer + consumer
    FAIL = "fail"                         # give up: the worker ends with the error


def classify_error(err: BaseException, consecutive_failures: int, max_failures: int) -> ErrorAction:
    """What a worker does about `err`, raised while processing, committing or rebalancing.

    `consecutive_failures` counts this one. Fencing (`ProducerFencedError`,
    `InvalidProducerEpochError`, e.g. the coordinator aborted a transaction open longer than
    transaction.timeout.ms) -> RECREATE. Group fencing (`IllegalGenerationError`,
    `UnknownMemberIdError`, `RebalanceInProgressError`: KIP-447, the partitions may belong to
    someone else now) and anything else -> ABORT_AND_RETRY, until `max_failures` consecutive
    failures (then FAIL: a poison record or a bug must not loop forever). Interpreter-level errors
    (KeyboardInterrupt, SystemExit, MemoryError) -> FAIL."""
    if isinstance(err, (KeyboardInterrupt, SystemExit, MemoryError)):
        return ErrorAction.FAIL
    if consecutive_failures > max_failures:
        return ErrorAction.FAIL
    if isinstance(err, (ProducerFencedError, InvalidProducerEpochError)):
        return ErrorAction.RECREATE
    if isinstance(err, BrokerError) and err.fatal:
        return ErrorAction.RECREATE
    if isinstance(err, (IllegalGenerationError, UnknownMemberIdError, RebalanceInProgressError)):
        return ErrorAction.ABORT_AND_RETRY
    return ErrorAction.ABORT_AND_RETRY


# ------------------------------------------------------------------------------------------ supervisor
class RestartAction(enum.Enum):
    RESTART = "restart"    # start a replacement with the same index (same transactional.id)
    DONE = "done"          # the worker stopped as asked
    FAILED = "failed"      # the worker gave up (its error is the pipeline's error)
    IGNORE = "ignore"      # an old incarnation, already replaced


def restart_decision(*, stopping: bool, current: bool, outcome: str, restarts: int,
                     max_restarts: int | None) -> RestartAction:
    """The supervisor's decision when a worker's ``run()`` ended.

    `outcome`: "stopped" (returned after stop()), "failed" (returned with an error it could not
    handle), "died" (the actor died: killed, OOM, node lost) or "crashed" (``run()`` raised).
    `current`: the ended worker is the live incarnation of its index (not one already replaced).
    `restarts`: replacements made for this index so far."""
    if not current:
        return RestartAction.IGNORE
    if outcome == "stopped":
        return RestartAction.DONE
    if outcome == "failed":
        return RestartAction.FAILED
    if stopping:
        return RestartAction.DONE
    if outcome not in ("died", "crashed"):
        raise ValueError(f"unknown worker outcome {outcome!r}")
    if max_restarts is not None and restarts >= max_restarts:
        return RestartAction.FAILED
    return RestartAction.RESTART


def consumed_up_to(committed: Mapping[TopicPartition, int | None],
                   targets: Mapping[TopicPartition, int]) -> bool:
    """Every partition's committed offset reached its target (a target of 0 needs nothing)."""
    for tp, end in targets.items():
        if end <= 0:
            continue
        off = committed.get(tp)
        if off is None or off < end:
            return False
    return True


def lagging(committed: Mapping[TopicPartition, int | None],
            targets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
    """{tp: records still to commit} for partitions below their target."""
    out = {}
    for tp, end in targets.items():
        off = committed.get(tp) or 0
        if off < end:
            out[tp] = end - off
    return out

"""`TxnCoordinatorShard`: the pure transaction coordinator for one ``__transaction_state`` partition.

Transactions v2 (KIP-890) from the start: every EndTxn bumps the producer epoch, partitions are
added implicitly by the partition leader, a transaction is identified by (producer_id, epoch).
No I/O, no clock, no Ray: time arrives as ``now_ms``; the only injected effect is
``allocate_producer_ids(count) -> first_id`` (the controller's durable id reservation).

Append / apply contract (the actor that wraps this shard must follow it)
------------------------------------------------------------------------
Every mutating call (``handle_*``, ``complete_markers``, ``expire_*``, ``abort_transaction``) either

* raises a `BrokerError` - the request is refused, nothing changed, nothing to write; or
* returns a `CoordinatorResult` ``r``. The committed in-memory state has NOT changed yet; the ids
  it touches are only marked *pending* (other requests for them get CONCURRENT_TRANSACTIONS). Then:

  1. append ``r.records`` (in order; possibly none) to ``__transaction_state`` with acks=all;
  2. on success: ``shard.apply(r, coordinator_epoch)`` with the coordinator epoch the actor holds
     *now*. Only this changes the state. If the epoch is not the shard's (leadership moved while
     appending) it raises NOT_COORDINATOR, leaves the state untouched and the actor must rebuild a
     shard from the log;
     on failure (or any error before apply): ``shard.discard(r)``, then map the append error
     (reference 2.3: NOT_ENOUGH_REPLICAS*/timeouts -> COORDINATOR_NOT_AVAILABLE, ...);
  3. after apply: hand every ``r.markers`` (`MarkerPlan`) to the marker sender, then answer the
     client with ``r.reply()`` (returns ``r.response`` or raises ``r.error`` - e.g. the
     CONCURRENT_TRANSACTIONS an InitProducerId gets while it fences an ongoing transaction).
  4. when every partition of a `MarkerPlan` acknowledged its marker:
     ``complete_markers(plan.transactional_id, now_ms, plan=plan)`` and run steps 1-2 again.

Results with no records may be applied right away (apply is then a no-op). The producer-id cursor
advances at prepare time: an id handed to a result that is discarded is skipped, never reused.

Recovery: a new shard per coordinator epoch; ``replay(key, value)`` every record of the partition
(from the start or from a ``snapshot_records()`` image), then resend ``pending_markers()``.
Do not call ``replay`` on a shard that serves requests. ``snapshot_records()`` reflects applied
state only; take it when ``has_pending()`` is False (between operations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..errors import (BrokerError, ErrorCode, InvalidProducerEpochError, InvalidRequestError,
                      InvalidTxnStateError, ProducerFencedError, UnknownProducerIdError, UnknownServerError,
                      error_for)
from .metadata import (EXHAUSTED_PRODUCER_EPOCH, MAX_PRODUCER_EPOCH, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, TxnMetadata, TxnTransition,
                       concurrent_transactions, new_producer_transition, not_coordinator)
from .records import (ProducerIdBlockKey, ProducerIdBlockValue, Record, decode_record, producer_id_block_record,
                      txn_record)
from .state import IDLE_STATES, PREPARE_STATES, IllegalStateTransition, TxnState

Partition = tuple[str, int]
DEFAULT_PRODUCER_ID_BLOCK_SIZE = 1000


@dataclass(frozen=True)
class MarkerPlan:
    """Write a COMMIT/ABORT marker stamped (producer_id, producer_epoch, coordinator_epoch) to every
    partition; then call `complete_markers`. producer_epoch is the bumped epoch."""
    transactional_id: str
    producer_id: int
    producer_epoch: int
    coordinator_epoch: int
    commit: bool
    partitions: frozenset[Partition]


@dataclass(frozen=True)
class InitProducerIdResponse:
    producer_id: int
    producer_epoch: int


@dataclass(frozen=True)
class EndTxnResponse:
    """TV2: the (possibly new) producer id and the bumped epoch the client uses from now on."""
    producer_id: int
    producer_epoch: int


@dataclass(frozen=True)
class TxnDescription:
    transactional_id: str
    state: str
    producer_id: int
    producer_epoch: int
    txn_timeout_ms: int
    txn_start_ms: int
    last_update_ms: int
    partitions: tuple[Partition, ...]


@dataclass(frozen=True)
class CoordinatorResult:
    """What a handler decided: records to append, then (after `apply`) markers and the reply."""
    coordinator_epoch: int
    records: tuple[Record, ...] = ()
    transitions: tuple[TxnTransition, ...] = ()
    response: Any = None
    error: BrokerError | None = None
    markers: tuple[MarkerPlan, ...] = ()
    producer_id_block: ProducerIdBlockValue | None = None

    def reply(self) -> Any:
        """The client's answer: raises `error` if set, else returns `response`."""
        if self.error is not None:
            raise self.error
        return self.response


@dataclass
class _IdBlock:
    block: ProducerIdBlockValue
    next_id: int
    applied: bool = False


class TxnCoordinatorShard:
    def __init__(self, coordinator_epoch: int, max_txn_timeout_ms: int,
                 allocate_producer_ids: Callable[[int], int],
                 producer_id_block_size: int = DEFAULT_PRODUCER_ID_BLOCK_SIZE):
        if producer_id_block_size < 1:
            raise ValueError("producer_id_block_size must be >= 1")
        self._coordinator_epoch = coordinator_epoch
        self.max_txn_timeout_ms = max_txn_timeout_ms
        self._allocate_producer_ids = allocate_producer_ids
        self.producer_id_block_size = producer_id_block_size
        self._txns: dict[str, TxnMetadata] = {}
        self._pending_new: dict[str, TxnTransition] = {}
        self._block: _IdBlock | None = None
        self._reserved: ProducerIdBlockValue | None = None   # highest block durably recorded
        self._max_producer_id_seen = -1
        self._offered_start: int | None = None     # a block fetched ahead by the caller (async)

    @property
    def coordinator_epoch(self) -> int:
        return self._coordinator_epoch

    # ---- producer ids -----------------------------------------------------------------------
    def _id_floor(self) -> int:
        floor = self._max_producer_id_seen + 1
        if self._reserved is not None:
            floor = max(floor, self._reserved.block_end)
        if self._block is not None:
            floor = max(floor, self._block.block.block_end)
        return floor

    def needs_producer_id_block(self) -> bool:
        """The current block is used up and none was offered: an actor fetches one (without
        blocking its event loop) and hands it over with `offer_producer_id_block`."""
        b = self._block
        return (b is None or b.next_id >= b.block.block_end) and self._offered_start is None

    def offer_producer_id_block(self, start: int) -> None:
        """The first id of a block of `producer_id_block_size` ids reserved by the allocator."""
        self._offered_start = start

    def _next_producer_id(self) -> tuple[int, ProducerIdBlockValue | None]:
        """A never-used producer id, and the block record to log with it (None if already logged)."""
        b = self._block
        if b is None or b.next_id >= b.block.block_end:
            start, self._offered_start = self._offered_start, None
            if start is None:
                start = self._allocate_producer_ids(self.producer_id_block_size)
            floor = self._id_floor()
            if not isinstance(start, int) or isinstance(start, bool) or start < floor:
                raise UnknownServerError(f"producer-id allocator returned {start!r}, below ids already "
                                         f"reserved (< {floor}); refusing to reuse producer ids")
            b = self._block = _IdBlock(ProducerIdBlockValue(start, start + self.producer_id_block_size), start)
        pid = b.next_id
        b.next_id += 1
        return pid, (None if b.applied else b.block)

    def _result(self, transitions: Iterable[TxnTransition] = (), *, block: ProducerIdBlockValue | None = None,
                response: Any = None, error: BrokerError | None = None,
                markers: Iterable[MarkerPlan] = ()) -> CoordinatorResult:
        transitions = tuple(transitions)
        records: list[Record] = []
        if block is not None:
            records.append(producer_id_block_record(block))   # the block is logged before any id of it
        records.extend(t.record() for t in transitions)
        return CoordinatorResult(self._coordinator_epoch, tuple(records), transitions, response, error,
                                 tuple(markers), block)

    # ---- apply / discard --------------------------------------------------------------------
    def apply(self, result: CoordinatorResult, coordinator_epoch: int) -> None:
        """Make `result` effective after its records were durably appended (see module docstring)."""
        if coordinator_epoch != self._coordinator_epoch or result.coordinator_epoch != self._coordinator_epoch:
            self.discard(result)
            raise not_coordinator(f"coordinator epoch is {coordinator_epoch}; this shard serves epoch "
                                  f"{self._coordinator_epoch}, the result was prepared under "
                                  f"{result.coordinator_epoch}")
        for t in result.transitions:   # check everything first: apply all or nothing
            if t.source_state is None:
                if self._pending_new.get(t.transactional_id) is not t:
                    raise IllegalStateTransition(f"{t.transactional_id}: creation is not pending")
            else:
                meta = self._txns.get(t.transactional_id)
                if meta is None or meta.pending_state != t.pending_state or meta.state != t.source_state:
                    raise IllegalStateTransition(f"{t.transactional_id}: transition to {t.state.name} is not the "
                                                 f"pending one")
        for t in result.transitions:
            if t.source_state is None:
                del self._pending_new[t.transactional_id]
                self._txns[t.transactional_id] = TxnMetadata.from_transition(t)
            else:
                meta = self._txns[t.transactional_id]
                meta.complete_transition(t, coordinator_epoch)
                if t.state == TxnState.DEAD:
                    del self._txns[t.transactional_id]
            self._note_producer_ids(t.producer_id, t.next_producer_id)
        if result.producer_id_block is not None:
            self._note_block(result.producer_id_block)
            if self._block is not None and self._block.block == result.producer_id_block:
                self._block.applied = True

    def discard(self, result: CoordinatorResult) -> None:
        """The records of `result` were not (or not surely) appended: drop its pending states."""
        for t in result.transitions:
            if t.source_state is None:
                if self._pending_new.get(t.transactional_id) is t:
                    del self._pending_new[t.transactional_id]
            else:
                meta = self._txns.get(t.transactional_id)
                if meta is not None and meta.state == t.source_state:
                    meta.abort_transition(t)

    def has_pending(self) -> bool:
        return bool(self._pending_new) or any(m.pending_state is not None for m in self._txns.values())

    def _note_producer_ids(self, *pids: int) -> None:
        self._max_producer_id_seen = max(self._max_producer_id_seen, *pids)

    def _note_block(self, block: ProducerIdBlockValue) -> None:
        if self._reserved is None or block.block_end > self._reserved.block_end:
            self._reserved = block

    # ---- validation helpers -----------------------------------------------------------------
    def _busy(self, transactional_id: str) -> None:
        if transactional_id in self._pending_new:
            raise concurrent_transactions(f"{transactional_id}: initialisation still pending")
        meta = self._txns.get(transactional_id)
        if meta is not None and meta.pending_state is not None:
            raise concurrent_transactions(
                f"{transactional_id}: transition to {meta.pending_state.name} still pending")

    def _known(self, transactional_id: str) -> TxnMetadata:
        self._busy(transactional_id)
        meta = self._txns.get(transactional_id)
        if meta is None:
            raise UnknownProducerIdError(f"transactional id {transactional_id!r} is unknown to this coordinator")
        return meta

    @staticmethod
    def _check_id_args(transactional_id, producer_id, producer_epoch) -> None:
        if not isinstance(transactional_id, str) or not transactional_id:
            raise InvalidRequestError(f"transactional id must be a non-empty string, got {transactional_id!r}")
        for name, x in (("producer id", producer_id), ("producer epoch", producer_epoch)):
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise InvalidRequestError(f"{name} must be an integer >= 0, got {x!r}")

    @staticmethod
    def _check_producer(meta: TxnMetadata, producer_id: int, producer_epoch: int) -> None:
        if producer_id != meta.producer_id:
            if producer_id == meta.last_producer_id:
                raise ProducerFencedError(f"{meta.transactional_id}: producer id {producer_id} was replaced by "
                                          f"{meta.producer_id}")
            raise UnknownProducerIdError(f"{meta.transactional_id}: producer id {producer_id} does not match "
                                         f"{meta.producer_id}")
        if producer_epoch < meta.producer_epoch:
            raise ProducerFencedError(f"{meta.transactional_id}: epoch {producer_epoch} is fenced by epoch "
                                      f"{meta.producer_epoch}")
        if producer_epoch > meta.producer_epoch:
            raise InvalidProducerEpochError(f"{meta.transactional_id}: epoch {producer_epoch} is newer than the "
                                            f"coordinator's {meta.producer_epoch}")

    @staticmethod
    def _prepare_concurrent(meta: TxnMetadata, producer_id: int, producer_epoch: int) -> None:
        """During PREPARE_* with an epoch overflow, the client already holds (next_producer_id, 0)."""
        if (meta.state in PREPARE_STATES and meta.next_producer_id != NO_PRODUCER_ID
                and (producer_id, producer_epoch) == (meta.next_producer_id, 0)):
            raise concurrent_transactions(f"{meta.transactional_id}: previous transaction still completing")

    @staticmethod
    def _partitions_arg(partitions: Iterable[Partition]) -> frozenset[Partition]:
        parts = frozenset(tuple(p) for p in partitions)
        if not parts:
            raise InvalidRequestError("no partitions to add")
        for topic, partition in parts:
            if (not isinstance(topic, str) or not topic or not isinstance(partition, int)
                    or isinstance(partition, bool) or partition < 0):
                raise InvalidRequestError(f"bad partition ({topic!r}, {partition!r})")
        return parts

    def _completes_with(self, meta: TxnMetadata, plan: MarkerPlan | None, producer_id: int,
                        producer_epoch: int) -> bool:
        """`plan` is the written marker plan of `meta`'s PREPARE_*, and (producer_id,
        producer_epoch) is the identity the producer holds once it completes (next_producer_id at
        epoch 0 after an exhausted epoch)."""
        if plan is None or meta.state not in PREPARE_STATES or plan.coordinator_epoch != self._coordinator_epoch:
            return False
        if ((plan.producer_id, plan.producer_epoch) != (meta.producer_id, meta.producer_epoch)
                or plan.commit != (meta.state == TxnState.PREPARE_COMMIT)):
            return False
        after = ((meta.next_producer_id, 0) if meta.next_producer_id != NO_PRODUCER_ID
                 else (meta.producer_id, meta.producer_epoch))
        return (producer_id, producer_epoch) == after and after[1] < MAX_PRODUCER_EPOCH

    def _marker_plan(self, t: TxnTransition) -> MarkerPlan:
        return MarkerPlan(t.transactional_id, t.producer_id, t.producer_epoch, self._coordinator_epoch,
                          t.state == TxnState.PREPARE_COMMIT, t.partitions)

    # ---- InitProducerId ---------------------------------------------------------------------
    def handle_init_producer_id(self, transactional_id: str | None, txn_timeout_ms: int, now_ms: int,
                                expected_producer_id: int = NO_PRODUCER_ID,
                                expected_epoch: int = NO_PRODUCER_EPOCH) -> CoordinatorResult:
        """-> response `InitProducerIdResponse`; while fencing an ongoing transaction the reply is
        CONCURRENT_TRANSACTIONS (retry once its abort completes)."""
        if transactional_id is None:   # idempotent-only producer: an id, nothing else persisted
            pid, block = self._next_producer_id()
            return self._result(block=block, response=InitProducerIdResponse(pid, 0))
        if not isinstance(transactional_id, str) or not transactional_id:
            raise InvalidRequestError(f"transactional id must be a non-empty string, got {transactional_id!r}")
        if (not isinstance(txn_timeout_ms, int) or isinstance(txn_timeout_ms, bool) or txn_timeout_ms <= 0
                or txn_timeout_ms > self.max_txn_timeout_ms):
            raise error_for(ErrorCode.INVALID_TRANSACTION_TIMEOUT,
                            f"transaction timeout {txn_timeout_ms!r} ms not in [1, {self.max_txn_timeout_ms}]")
        has_expected = expected_producer_id != NO_PRODUCER_ID or expected_epoch != NO_PRODUCER_EPOCH
        if has_expected:
            self._check_id_args(transactional_id, expected_producer_id, expected_epoch)
        self._busy(transactional_id)
        meta = self._txns.get(transactional_id)
        if meta is None:   # a new id (any expected identity is accepted, as in Kafka)
            pid, block = self._next_producer_id()
            t = new_producer_transition(transactional_id, pid, txn_timeout_ms, now_ms, self._coordinator_epoch)
            self._pending_new[transactional_id] = t
            return self._result([t], block=block, response=InitProducerIdResponse(pid, 0))

        expected = (expected_producer_id, expected_epoch)
        is_current = expected == (meta.producer_id, meta.producer_epoch)
        is_bump_retry = meta.last_producer_epoch >= 0 and expected == (meta.last_producer_id, meta.last_producer_epoch)
        if has_expected and not (is_current or is_bump_retry):
            raise ProducerFencedError(f"{transactional_id}: expected producer {expected} is neither the current "
                                      f"({meta.producer_id}, {meta.producer_epoch}) nor the last one")
        if meta.state in PREPARE_STATES:
            raise concurrent_transactions(f"{transactional_id}: previous transaction still completing")
        if meta.state == TxnState.ONGOING:
            if has_expected and not is_current:
                raise ProducerFencedError(f"{transactional_id}: only the current producer may re-initialise")
            t = meta.prepare_fence_and_abort(now_ms, self._coordinator_epoch)
            return self._result([t], markers=[self._marker_plan(t)], error=concurrent_transactions(
                f"{transactional_id}: aborting the ongoing transaction of epoch {meta.producer_epoch}; retry"))
        if meta.state not in IDLE_STATES:
            raise IllegalStateTransition(f"{transactional_id}: unexpected state {meta.state.name}")
        if has_expected and not is_current:   # retry of a bump that already succeeded
            return self._result(response=InitProducerIdResponse(meta.producer_id, meta.producer_epoch))
        block = None
        if meta.producer_epoch >= EXHAUSTED_PRODUCER_EPOCH:   # rotate: new id at epoch 0
            pid, block = self._next_producer_id()
            epoch, last = 0, (meta.producer_id, meta.producer_epoch if has_expected else NO_PRODUCER_EPOCH)
        else:
            pid, epoch = meta.producer_id, meta.producer_epoch + 1
            last = (meta.producer_id, meta.producer_epoch) if has_expected else (NO_PRODUCER_ID, NO_PRODUCER_EPOCH)
        t = meta.prepare_init_producer_id(pid, epoch, last[0], last[1], txn_timeout_ms, now_ms,
                                          self._coordinator_epoch)
        return self._result([t], block=block, response=InitProducerIdResponse(pid, epoch))

    # ---- AddPartitionsToTxn / AddOffsetsToTxn -----------------------------------------------
    def handle_add_partitions(self, transactional_id: str, producer_id: int, producer_epoch: int,
                              partitions: Iterable[Partition], now_ms: int) -> CoordinatorResult:
        """Called by a partition leader on the first transactional write of (pid, epoch) to a
        partition (KIP-890 implicit add). Response None; idempotent. While the previous transaction
        completes: CONCURRENT_TRANSACTIONS (see `complete_markers` for adding with its completion)."""
        self._check_id_args(transactional_id, producer_id, producer_epoch)
        parts = self._partitions_arg(partitions)
        meta = self._known(transactional_id)
        self._prepare_concurrent(meta, producer_id, producer_epoch)
        self._check_producer(meta, producer_id, producer_epoch)
        if meta.state in PREPARE_STATES:
            raise concurrent_transactions(f"{transactional_id}: previous transaction still completing")
        if meta.state == TxnState.ONGOING and parts <= meta.partitions:
            return self._result()
        if meta.producer_epoch >= MAX_PRODUCER_EPOCH:
            # Short.MAX is only carried by markers of a fence/overflow; a transaction opened at it
            # could never be fenced again. The producer must re-initialise (which rotates the pid).
            raise ProducerFencedError(f"{transactional_id}: epoch {meta.producer_epoch} is exhausted; "
                                      f"re-initialise the producer")
        t = meta.prepare_add_partitions(parts, now_ms, self._coordinator_epoch)
        return self._result([t])

    def handle_add_offsets(self, transactional_id: str, producer_id: int, producer_epoch: int, group_id: str,
                           offsets_partition: Partition, now_ms: int) -> CoordinatorResult:
        """Add the group's ``__consumer_offsets`` partition (computed by the caller) to the transaction."""
        if not isinstance(group_id, str) or not group_id:
            raise InvalidRequestError(f"group id must be a non-empty string, got {group_id!r}")
        return self.handle_add_partitions(transactional_id, producer_id, producer_epoch, [offsets_partition], now_ms)

    # ---- EndTxn -----------------------------------------------------------------------------
    def handle_end_txn(self, transactional_id: str, producer_id: int, producer_epoch: int, commit: bool,
                       now_ms: int) -> CoordinatorResult:
        """TV2 EndTxn. -> `EndTxnResponse` with the identity the client uses from now on, and (for a
        non-empty transaction) one `MarkerPlan` carrying the bumped epoch."""
        self._check_id_args(transactional_id, producer_id, producer_epoch)
        if not isinstance(commit, bool):
            raise InvalidRequestError(f"commit must be a bool, got {commit!r}")
        meta = self._known(transactional_id)
        decided_commit = meta.state in (TxnState.PREPARE_COMMIT, TxnState.COMPLETE_COMMIT)
        if (meta.last_producer_epoch >= 0 and (producer_id, producer_epoch) == (meta.last_producer_id,
                                                                                meta.last_producer_epoch)
                and meta.state not in (TxnState.EMPTY, TxnState.ONGOING)):
            # a retry of the EndTxn that made the current decision
            if decided_commit != commit:
                raise InvalidTxnStateError(
                    f"{transactional_id}: transaction was already {'committed' if decided_commit else 'aborted'}")
            if meta.next_producer_id != NO_PRODUCER_ID:
                return self._result(response=EndTxnResponse(meta.next_producer_id, 0))
            return self._result(response=EndTxnResponse(meta.producer_id, meta.producer_epoch))
        self._prepare_concurrent(meta, producer_id, producer_epoch)
        self._check_producer(meta, producer_id, producer_epoch)
        if meta.state == TxnState.ONGOING:
            next_pid, block = NO_PRODUCER_ID, None
            if meta.producer_epoch >= EXHAUSTED_PRODUCER_EPOCH:
                next_pid, block = self._next_producer_id()
            t = meta.prepare_end_txn(commit, next_pid, now_ms, self._coordinator_epoch)
            response = (EndTxnResponse(next_pid, 0) if next_pid != NO_PRODUCER_ID
                        else EndTxnResponse(t.producer_id, t.producer_epoch))
            return self._result([t], block=block, response=response, markers=[self._marker_plan(t)])
        if meta.state in PREPARE_STATES:
            raise concurrent_transactions(f"{transactional_id}: previous transaction still completing")
        if meta.state not in IDLE_STATES:
            raise IllegalStateTransition(f"{transactional_id}: unexpected state {meta.state.name}")
        if commit:
            raise InvalidTxnStateError(f"{transactional_id}: no transaction to commit (state {meta.state.name})")
        new_pid, block = NO_PRODUCER_ID, None
        if meta.producer_epoch >= EXHAUSTED_PRODUCER_EPOCH:
            new_pid, block = self._next_producer_id()
        t = meta.prepare_empty_abort(new_pid, now_ms, self._coordinator_epoch)
        return self._result([t], block=block, response=EndTxnResponse(t.producer_id, t.producer_epoch))

    # ---- markers ----------------------------------------------------------------------------
    def complete_markers(self, transactional_id: str, now_ms: int, plan: MarkerPlan | None = None,
                         add: tuple[int, int, Iterable[Partition]] | None = None) -> CoordinatorResult:
        """Every marker of the current PREPARE_* was written: -> COMPLETE_*. With `plan`, a stale plan
        (its transaction already completed) yields an empty result instead of completing another.

        `add` = (producer_id, producer_epoch, partitions): adds waiting for this completion. When
        they come from the producer's next transaction (the identity it holds after completion),
        the completion and the add are one transition, PREPARE_* -> ONGOING, logged as one record;
        the result's response is then True (else None, and the adds are left to the caller)."""
        if plan is not None and add is not None:
            meta = self._txns.get(transactional_id)
            producer_id, producer_epoch, partitions = add
            try:
                parts = self._partitions_arg(partitions)
            except InvalidRequestError:
                parts = None        # a malformed add must not hold up the completion: it fails on its own
            if (parts and meta is not None and meta.pending_state is None and transactional_id not in self._pending_new
                    and self._completes_with(meta, plan, producer_id, producer_epoch)):
                t = meta.prepare_complete_then_add(parts, now_ms, self._coordinator_epoch)
                return self._result([t], response=True)
        if plan is not None:
            if plan.coordinator_epoch != self._coordinator_epoch:
                raise not_coordinator(f"marker plan of coordinator epoch {plan.coordinator_epoch}; this shard "
                                      f"serves {self._coordinator_epoch}")
            meta = self._txns.get(transactional_id)
            if (meta is None or meta.state not in PREPARE_STATES
                    or (meta.producer_id, meta.producer_epoch) != (plan.producer_id, plan.producer_epoch)
                    or (meta.state == TxnState.PREPARE_COMMIT) != plan.commit):
                if meta is not None and meta.pending_state is not None and meta.state in PREPARE_STATES:
                    raise concurrent_transactions(f"{transactional_id}: completion still pending")
                return self._result()
        meta = self._txns.get(transactional_id)
        if meta is None:
            raise InvalidTxnStateError(f"{transactional_id}: unknown transactional id")
        self._busy(transactional_id)
        if meta.state not in PREPARE_STATES:
            raise InvalidTxnStateError(f"{transactional_id}: nothing to complete in state {meta.state.name}")
        t = meta.prepare_complete(now_ms, self._coordinator_epoch)
        return self._result([t])

    def pending_markers(self) -> list[MarkerPlan]:
        """A plan for every transaction in PREPARE_* (resend all of them after loading)."""
        return [MarkerPlan(m.transactional_id, m.producer_id, m.producer_epoch, self._coordinator_epoch,
                           m.state == TxnState.PREPARE_COMMIT, m.partitions)
                for _, m in sorted(self._txns.items()) if m.state in PREPARE_STATES]

    # ---- timeouts, expiry, operator abort ----------------------------------------------------
    def expire_timed_out_transactions(self, now_ms: int) -> list[CoordinatorResult]:
        """ONGOING longer than its timeout (and not busy): fence (epoch+1) and abort; one result each."""
        out = []
        for tid, meta in sorted(self._txns.items()):
            if (meta.state == TxnState.ONGOING and meta.pending_state is None
                    and meta.txn_start_ms + meta.txn_timeout_ms < now_ms):
                t = meta.prepare_fence_and_abort(now_ms, self._coordinator_epoch)
                out.append(self._result([t], markers=[self._marker_plan(t)]))
        return out

    def expire_transactional_ids(self, now_ms: int, expiration_ms: int) -> CoordinatorResult:
        """Idle ids (EMPTY / COMPLETE_*) not updated for longer than `expiration_ms` -> tombstones."""
        ts = [meta.prepare_dead(now_ms, self._coordinator_epoch)
              for _, meta in sorted(self._txns.items())
              if meta.state in IDLE_STATES and meta.pending_state is None
              and meta.last_update_ms + expiration_ms < now_ms]
        return self._result(ts)

    def abort_transaction(self, transactional_id: str, now_ms: int) -> CoordinatorResult:
        """Operator abort (KIP-664-style): an ONGOING transaction is fenced and aborted like a timeout.
        Already aborting/aborted: empty result. Committing or nothing open: InvalidTxnStateError."""
        if not isinstance(transactional_id, str) or transactional_id not in self._txns:
            raise InvalidRequestError(f"unknown transactional id {transactional_id!r}")
        meta = self._known(transactional_id)
        if meta.state == TxnState.ONGOING:
            t = meta.prepare_fence_and_abort(now_ms, self._coordinator_epoch)
            return self._result([t], markers=[self._marker_plan(t)])
        if meta.state in (TxnState.PREPARE_ABORT, TxnState.COMPLETE_ABORT):
            return self._result()
        raise InvalidTxnStateError(f"{transactional_id}: no ongoing transaction to abort ({meta.state.name})")

    # ---- recovery / compaction --------------------------------------------------------------
    def replay(self, key: bytes, value: bytes | None) -> None:
        """Rebuild state from one log record (loading; last record per key wins)."""
        if self.has_pending():
            raise IllegalStateTransition("replay on a shard with pending transitions")
        k, v = decode_record(key, value)
        if isinstance(k, ProducerIdBlockKey):
            self._note_block(v)
            return
        if v is None:
            self._txns.pop(k.transactional_id, None)
            return
        self._txns[k.transactional_id] = TxnMetadata.from_log_value(k.transactional_id, v)
        self._note_producer_ids(v.producer_id, v.next_producer_id, v.last_producer_id)

    @classmethod
    def load(cls, records: Iterable[Record], coordinator_epoch: int, max_txn_timeout_ms: int,
             allocate_producer_ids: Callable[[int], int],
             producer_id_block_size: int = DEFAULT_PRODUCER_ID_BLOCK_SIZE) -> "TxnCoordinatorShard":
        shard = cls(coordinator_epoch, max_txn_timeout_ms, allocate_producer_ids, producer_id_block_size)
        for key, value in records:
            shard.replay(key, value)
        return shard

    def snapshot_records(self) -> list[Record]:
        """Minimal records that rebuild the applied state: the highest producer-id block, then one
        record per live transactional id (sorted). Replaying them into a fresh shard gives the
        same `committed_state()`."""
        out: list[Record] = []
        if self._reserved is not None:
            out.append(producer_id_block_record(self._reserved))
        out.extend(txn_record(tid, m.to_log_value()) for tid, m in sorted(self._txns.items()))
        return out

    # ---- inspection -------------------------------------------------------------------------
    def committed_state(self) -> dict:
        """Applied state, comparable across shards: {tid: TxnLogValue} plus the reserved block."""
        return {"txns": {tid: m.to_log_value() for tid, m in self._txns.items()},
                "reserved_block": self._reserved}

    @staticmethod
    def _describe(m: TxnMetadata) -> TxnDescription:
        return TxnDescription(m.transactional_id, m.state.name, m.producer_id, m.producer_epoch, m.txn_timeout_ms,
                              m.txn_start_ms, m.last_update_ms, tuple(sorted(m.partitions)))

    def list_transactions(self) -> list[TxnDescription]:
        return [self._describe(m) for _, m in sorted(self._txns.items())]

    def describe_transaction(self, transactional_id: str) -> TxnDescription | None:
        m = self._txns.get(transactional_id)
        return None if m is None else self._describe(m)

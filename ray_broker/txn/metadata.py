"""Per-transactional-id metadata and its two-phase transitions.

Every change follows Kafka's discipline (reference section 2.3):

1. ``prepare_*`` checks the state machine (`check_transition`), sets ``pending_state`` and returns
   an immutable `TxnTransition`: the full metadata *after* the change. Nothing else changes.
2. The caller logs ``transition.record()`` to ``__transaction_state`` durably.
3. ``complete_transition(t, coordinator_epoch)`` re-checks the invariants and applies ``t`` - only
   if the coordinator epoch is still the one the transition was prepared under; otherwise it
   raises NOT_COORDINATOR and changes nothing. If the append failed, ``abort_transition(t)``
   clears ``pending_state`` instead.

While ``pending_state`` is set, the id is busy: every ``prepare_*`` raises CONCURRENT_TRANSACTIONS.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import ErrorCode, error_for
from .records import Record, TxnLogValue, txn_record
from .state import (COMPLETE_STATES, IDLE_STATES, PREPARE_STATES, IllegalStateTransition, TxnState,
                    check_transition)

NO_PRODUCER_ID = -1
NO_PRODUCER_EPOCH = -1
MAX_PRODUCER_EPOCH = 32767            # Short.MAX_VALUE: only ever carried by markers / fenced states
EXHAUSTED_PRODUCER_EPOCH = MAX_PRODUCER_EPOCH - 1   # at or above this, the next bump rotates the pid

Partition = tuple[str, int]


def concurrent_transactions(message: str):
    return error_for(ErrorCode.CONCURRENT_TRANSACTIONS, message)


def not_coordinator(message: str):
    return error_for(ErrorCode.NOT_COORDINATOR, message)


@dataclass(frozen=True)
class TxnTransition:
    """Immutable target of one transition: the whole metadata after it, plus where it came from.

    ``source_state`` is None when the transition creates the id. ``via_state`` is the pending
    state a fence passes through (PREPARE_EPOCH_FENCE) before the logged target.
    """
    transactional_id: str
    coordinator_epoch: int
    source_state: TxnState | None
    via_state: TxnState | None
    state: TxnState
    producer_id: int
    producer_epoch: int
    last_producer_id: int
    last_producer_epoch: int
    next_producer_id: int
    txn_timeout_ms: int
    partitions: frozenset[Partition]
    txn_start_ms: int
    last_update_ms: int

    @property
    def pending_state(self) -> TxnState:
        return self.via_state if self.via_state is not None else self.state

    def log_value(self) -> TxnLogValue | None:
        if self.state == TxnState.DEAD:
            return None
        return TxnLogValue(self.producer_id, self.producer_epoch, self.last_producer_id,
                           self.last_producer_epoch, self.next_producer_id, self.txn_timeout_ms,
                           self.state, self.partitions, self.txn_start_ms, self.last_update_ms)

    def record(self) -> Record:
        """The transaction-log record of this transition (a tombstone for DEAD)."""
        return txn_record(self.transactional_id, self.log_value())


def new_producer_transition(transactional_id: str, producer_id: int, txn_timeout_ms: int, now_ms: int,
                            coordinator_epoch: int) -> TxnTransition:
    """Creation of an id unknown to the coordinator: a fresh pid at epoch 0, EMPTY."""
    return TxnTransition(transactional_id, coordinator_epoch, None, None, TxnState.EMPTY, producer_id, 0,
                         NO_PRODUCER_ID, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, txn_timeout_ms, frozenset(),
                         -1, now_ms)


@dataclass
class TxnMetadata:
    transactional_id: str
    producer_id: int
    producer_epoch: int
    txn_timeout_ms: int
    state: TxnState = TxnState.EMPTY
    last_producer_id: int = NO_PRODUCER_ID
    last_producer_epoch: int = NO_PRODUCER_EPOCH
    next_producer_id: int = NO_PRODUCER_ID
    partitions: frozenset[Partition] = frozenset()
    txn_start_ms: int = -1
    last_update_ms: int = -1
    pending_state: TxnState | None = field(default=None, compare=False)

    # ---- construction / persistence ---------------------------------------------------------
    @classmethod
    def from_transition(cls, t: TxnTransition) -> "TxnMetadata":
        if t.source_state is not None:
            raise IllegalStateTransition(f"{t.transactional_id}: only a creation transition can create metadata")
        return cls.from_log_value(t.transactional_id, t.log_value())

    @classmethod
    def from_log_value(cls, transactional_id: str, v: TxnLogValue) -> "TxnMetadata":
        return cls(transactional_id, v.producer_id, v.producer_epoch, v.txn_timeout_ms, TxnState(v.state),
                   v.last_producer_id, v.last_producer_epoch, v.next_producer_id, frozenset(v.partitions),
                   v.txn_start_ms, v.last_update_ms)

    def to_log_value(self) -> TxnLogValue:
        return TxnLogValue(self.producer_id, self.producer_epoch, self.last_producer_id, self.last_producer_epoch,
                           self.next_producer_id, self.txn_timeout_ms, self.state, self.partitions,
                           self.txn_start_ms, self.last_update_ms)

    # ---- prepare ----------------------------------------------------------------------------
    def _prepare(self, coordinator_epoch: int, target: TxnState, *, via: TxnState | None = None,
                 **changes) -> TxnTransition:
        if self.pending_state is not None:
            raise concurrent_transactions(
                f"{self.transactional_id}: transition to {self.pending_state.name} still pending")
        if via is None:
            check_transition(self.state, target)
        else:
            check_transition(self.state, via)
            check_transition(via, target)
        base = dict(transactional_id=self.transactional_id, coordinator_epoch=coordinator_epoch,
                    source_state=self.state, via_state=via, state=target, producer_id=self.producer_id,
                    producer_epoch=self.producer_epoch, last_producer_id=self.last_producer_id,
                    last_producer_epoch=self.last_producer_epoch, next_producer_id=self.next_producer_id,
                    txn_timeout_ms=self.txn_timeout_ms, partitions=self.partitions,
                    txn_start_ms=self.txn_start_ms, last_update_ms=self.last_update_ms)
        base.update(changes)
        t = TxnTransition(**base)
        self._check_invariants(t)
        self.pending_state = t.pending_state
        return t

    def prepare_init_producer_id(self, producer_id: int, producer_epoch: int, last_producer_id: int,
                                 last_producer_epoch: int, txn_timeout_ms: int, now_ms: int,
                                 coordinator_epoch: int) -> TxnTransition:
        """EMPTY with the given (already bumped or rotated) producer identity."""
        return self._prepare(coordinator_epoch, TxnState.EMPTY, producer_id=producer_id,
                             producer_epoch=producer_epoch, last_producer_id=last_producer_id,
                             last_producer_epoch=last_producer_epoch, next_producer_id=NO_PRODUCER_ID,
                             txn_timeout_ms=txn_timeout_ms, partitions=frozenset(), txn_start_ms=-1,
                             last_update_ms=now_ms)

    def prepare_add_partitions(self, partitions: frozenset[Partition], now_ms: int,
                               coordinator_epoch: int) -> TxnTransition:
        """ONGOING with the union of partitions; a transaction starts (txn_start_ms) when idle."""
        start = now_ms if self.state in IDLE_STATES else self.txn_start_ms
        base = self.partitions if self.state == TxnState.ONGOING else frozenset()
        return self._prepare(coordinator_epoch, TxnState.ONGOING, partitions=base | frozenset(partitions),
                             txn_start_ms=start, last_update_ms=now_ms)

    def prepare_end_txn(self, commit: bool, next_producer_id: int, now_ms: int,
                        coordinator_epoch: int) -> TxnTransition:
        """TV2 EndTxn: PREPARE_COMMIT/ABORT with the epoch bumped; the client's epoch is remembered
        as last_producer_epoch (to recognise retries). `next_producer_id` (or -1) is the id the
        producer switches to at completion when the epoch is exhausted."""
        return self._prepare(coordinator_epoch, TxnState.PREPARE_COMMIT if commit else TxnState.PREPARE_ABORT,
                             producer_epoch=self.producer_epoch + 1, last_producer_id=self.producer_id,
                             last_producer_epoch=self.producer_epoch, next_producer_id=next_producer_id,
                             last_update_ms=now_ms)

    def prepare_empty_abort(self, new_producer_id: int, now_ms: int, coordinator_epoch: int) -> TxnTransition:
        """TV2 EndTxn(abort) with nothing added: bump (or rotate to `new_producer_id`, epoch 0 when
        not -1) and complete directly; nothing to mark."""
        if new_producer_id == NO_PRODUCER_ID:
            pid, epoch = self.producer_id, self.producer_epoch + 1
        else:
            pid, epoch = new_producer_id, 0
        return self._prepare(coordinator_epoch, TxnState.COMPLETE_ABORT, producer_id=pid, producer_epoch=epoch,
                             last_producer_id=self.producer_id, last_producer_epoch=self.producer_epoch,
                             next_producer_id=NO_PRODUCER_ID, partitions=frozenset(), last_update_ms=now_ms)

    def prepare_fence_and_abort(self, now_ms: int, coordinator_epoch: int) -> TxnTransition:
        """Coordinator-initiated abort of an ONGOING transaction (InitProducerId fencing, timeout,
        operator): ONGOING -> [PREPARE_EPOCH_FENCE] -> PREPARE_ABORT with epoch+1. No retry window
        is kept (last_producer_* = -1): the old producer is fenced everywhere."""
        return self._prepare(coordinator_epoch, TxnState.PREPARE_ABORT, via=TxnState.PREPARE_EPOCH_FENCE,
                             producer_epoch=self.producer_epoch + 1, last_producer_id=NO_PRODUCER_ID,
                             last_producer_epoch=NO_PRODUCER_EPOCH, next_producer_id=NO_PRODUCER_ID,
                             last_update_ms=now_ms)

    def prepare_complete(self, now_ms: int, coordinator_epoch: int) -> TxnTransition:
        """All markers written: COMPLETE_COMMIT/ABORT, partitions cleared; switch to
        next_producer_id (epoch 0) if the epoch was exhausted."""
        if self.state not in PREPARE_STATES:
            raise IllegalStateTransition(f"{self.transactional_id}: cannot complete from {self.state.name}")
        target = TxnState.COMPLETE_COMMIT if self.state == TxnState.PREPARE_COMMIT else TxnState.COMPLETE_ABORT
        changes: dict = dict(partitions=frozenset(), last_update_ms=now_ms)
        if self.next_producer_id != NO_PRODUCER_ID:
            changes.update(producer_id=self.next_producer_id, producer_epoch=0, next_producer_id=NO_PRODUCER_ID)
        return self._prepare(coordinator_epoch, target, **changes)

    def prepare_complete_then_add(self, partitions: frozenset[Partition], now_ms: int,
                                  coordinator_epoch: int) -> TxnTransition:
        """All markers of the PREPARE_* are written and the producer's next transaction adds
        partitions: PREPARE_* -> [COMPLETE_*] -> ONGOING as one transition and one record (the
        ONGOING one; records are whole snapshots). The next transaction then waits for one append
        instead of two. A replay that ends before this record finds PREPARE_* and resends the
        markers, which partitions recognise as written."""
        if self.pending_state is not None:
            raise concurrent_transactions(
                f"{self.transactional_id}: transition to {self.pending_state.name} still pending")
        done = self.copy()
        completed = done.prepare_complete(now_ms, coordinator_epoch)
        done.complete_transition(completed, coordinator_epoch)
        added = done.prepare_add_partitions(partitions, now_ms, coordinator_epoch)
        t = replace(added, source_state=self.state, via_state=completed.state)
        self._check_invariants(t)
        self.pending_state = t.pending_state
        return t

    def prepare_dead(self, now_ms: int, coordinator_epoch: int) -> TxnTransition:
        """Expiration of an idle id: the record is a tombstone."""
        return self._prepare(coordinator_epoch, TxnState.DEAD, partitions=frozenset(), last_update_ms=now_ms)

    # ---- complete ---------------------------------------------------------------------------
    def _check_invariants(self, t: TxnTransition) -> None:
        def bad(why: str):
            return IllegalStateTransition(f"{self.transactional_id}: {self.state.name} -> {t.state.name}: {why}")

        if t.transactional_id != self.transactional_id:
            raise bad(f"transition is for {t.transactional_id!r}")
        if not 0 <= t.producer_epoch <= MAX_PRODUCER_EPOCH:
            raise bad(f"producer epoch {t.producer_epoch} out of range")
        if t.producer_id == self.producer_id:
            if t.producer_epoch not in (self.producer_epoch, self.producer_epoch + 1):
                raise bad(f"epoch {self.producer_epoch} -> {t.producer_epoch} is neither kept nor bumped by one")
        elif t.producer_epoch != 0:
            raise bad(f"a new producer id must start at epoch 0, not {t.producer_epoch}")
        if t.state == TxnState.ONGOING and self.state == TxnState.ONGOING and not self.partitions <= t.partitions:
            raise bad("partitions may only grow while ONGOING")
        if t.state in PREPARE_STATES and t.partitions != self.partitions:
            raise bad("prepare must carry exactly the transaction's partitions")
        if t.state in COMPLETE_STATES | {TxnState.EMPTY} and t.partitions:
            raise bad("an idle state has no partitions")
        if t.state == TxnState.ONGOING and not t.partitions:
            raise bad("an ongoing transaction has at least one partition")

    def complete_transition(self, t: TxnTransition, coordinator_epoch: int) -> None:
        """Apply `t` after its record was durably appended. Raises NOT_COORDINATOR (changing nothing)
        if `coordinator_epoch` is not the epoch `t` was prepared under."""
        if t.coordinator_epoch != coordinator_epoch:
            raise not_coordinator(f"{self.transactional_id}: coordinator epoch changed from "
                                  f"{t.coordinator_epoch} to {coordinator_epoch} while appending")
        if self.pending_state != t.pending_state:
            raise IllegalStateTransition(
                f"{self.transactional_id}: completing {t.state.name} but pending state is "
                f"{self.pending_state.name if self.pending_state is not None else None}")
        if t.source_state != self.state:
            raise IllegalStateTransition(f"{self.transactional_id}: state moved from {t.source_state} to "
                                         f"{self.state.name} since the transition was prepared")
        if t.via_state is None:
            check_transition(self.state, t.state)
        else:
            check_transition(self.state, t.via_state)
            check_transition(t.via_state, t.state)
        self._check_invariants(t)
        self.state = t.state
        self.producer_id = t.producer_id
        self.producer_epoch = t.producer_epoch
        self.last_producer_id = t.last_producer_id
        self.last_producer_epoch = t.last_producer_epoch
        self.next_producer_id = t.next_producer_id
        self.txn_timeout_ms = t.txn_timeout_ms
        self.partitions = t.partitions
        self.txn_start_ms = t.txn_start_ms
        self.last_update_ms = t.last_update_ms
        self.pending_state = None

    def abort_transition(self, t: TxnTransition) -> None:
        """The append of `t` failed (or its result was discarded): forget the pending state."""
        if self.pending_state == t.pending_state:
            self.pending_state = None

    def copy(self) -> "TxnMetadata":
        return replace(self)

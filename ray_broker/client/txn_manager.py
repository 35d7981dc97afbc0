"""Client-side transaction state machine of a transactional producer (Kafka's `TransactionManager.State`).

Pure: no Ray, no I/O. The producer asks it before every transactional call (`start`), reports the
outcome (`finish`), and reports errors seen by the sender thread (`abortable`, `fatal`).

States and the normal path (kafka-eos.md 2.12)::

    UNINITIALIZED --init--> INITIALIZING --(pid, epoch)--> READY --begin--> IN_TRANSACTION
    IN_TRANSACTION --commit--> COMMITTING --(decision durable)--> READY
    IN_TRANSACTION --abort-->  ABORTING   --(decision durable)--> READY
    IN_TRANSACTION / COMMITTING --(a record of the transaction failed)--> ABORTABLE_ERROR --abort--> ABORTING
    any --(fenced)--> FATAL_ERROR   (terminal)

Two tables drive it:

- `TRANSITIONS`: every state change the machine may make (source -> allowed targets).
- `OPERATIONS`: per user call, the states it may be called in and the state it moves to.
  A call in any other state raises and changes nothing:

  * in FATAL_ERROR: the fatal error again (`ProducerFencedError` when this producer was fenced);
  * in ABORTABLE_ERROR: `TransactionAbortableError` naming the cause (only `abort_transaction()`
    is allowed);
  * otherwise `InvalidTxnStateError` (commit without begin, begin twice, send outside a
    transaction, init while initialised, ...).

A call that was interrupted by a timeout (init, commit, abort) leaves the state where it was
(INITIALIZING, COMMITTING, ABORTING); only the SAME call may then be made again, which resumes it
(all coordinator calls are idempotent).
"""
from __future__ import annotations

import enum
import threading
from collections.abc import Mapping

from ..errors import (BrokerError, InvalidProducerEpochError, InvalidTxnStateError, ProducerFencedError,
                      TransactionAbortableError)

__all__ = ["ClientTxnState", "TxnOperation", "TRANSITIONS", "OPERATIONS", "TransactionManager", "is_fatal_error"]


class ClientTxnState(enum.Enum):
    UNINITIALIZED = "UNINITIALIZED"
    INITIALIZING = "INITIALIZING"
    READY = "READY"
    IN_TRANSACTION = "IN_TRANSACTION"
    COMMITTING = "COMMITTING"
    ABORTING = "ABORTING"
    ABORTABLE_ERROR = "ABORTABLE_ERROR"
    FATAL_ERROR = "FATAL_ERROR"


class TxnOperation(enum.Enum):
    INIT = "init_transactions"
    BEGIN = "begin_transaction"
    SEND = "send"
    SEND_OFFSETS = "send_offsets_to_transaction"
    COMMIT = "commit_transaction"
    ABORT = "abort_transaction"


S = ClientTxnState
Op = TxnOperation

# source -> states it may move to (FATAL_ERROR is reachable from everywhere, and terminal).
TRANSITIONS: Mapping[ClientTxnState, frozenset[ClientTxnState]] = {
    S.UNINITIALIZED: frozenset({S.INITIALIZING, S.FATAL_ERROR}),
    S.INITIALIZING: frozenset({S.INITIALIZING, S.READY, S.FATAL_ERROR}),
    S.READY: frozenset({S.IN_TRANSACTION, S.FATAL_ERROR}),
    S.IN_TRANSACTION: frozenset({S.IN_TRANSACTION, S.COMMITTING, S.ABORTING, S.ABORTABLE_ERROR, S.FATAL_ERROR}),
    S.COMMITTING: frozenset({S.COMMITTING, S.READY, S.ABORTABLE_ERROR, S.FATAL_ERROR}),
    S.ABORTING: frozenset({S.ABORTING, S.READY, S.FATAL_ERROR}),
    S.ABORTABLE_ERROR: frozenset({S.ABORTABLE_ERROR, S.ABORTING, S.FATAL_ERROR}),
    S.FATAL_ERROR: frozenset({S.FATAL_ERROR}),
}

# operation -> {state it may be called in: state while it runs}. The state a successful call ends
# in is `FINISH[op]` (None: stays).
OPERATIONS: Mapping[TxnOperation, Mapping[ClientTxnState, ClientTxnState]] = {
    Op.INIT: {S.UNINITIALIZED: S.INITIALIZING, S.INITIALIZING: S.INITIALIZING},
    Op.BEGIN: {S.READY: S.IN_TRANSACTION},
    Op.SEND: {S.IN_TRANSACTION: S.IN_TRANSACTION},
    Op.SEND_OFFSETS: {S.IN_TRANSACTION: S.IN_TRANSACTION},
    Op.COMMIT: {S.IN_TRANSACTION: S.COMMITTING, S.COMMITTING: S.COMMITTING},
    Op.ABORT: {S.IN_TRANSACTION: S.ABORTING, S.ABORTABLE_ERROR: S.ABORTING, S.ABORTING: S.ABORTING},
}
FINISH: Mapping[TxnOperation, ClientTxnState | None] = {
    Op.INIT: S.READY,
    Op.BEGIN: None,
    Op.SEND: None,
    Op.SEND_OFFSETS: None,
    Op.COMMIT: S.READY,
    Op.ABORT: S.READY,
}

_FATAL_TYPES = (ProducerFencedError, InvalidProducerEpochError)


def is_fatal_error(err: BaseException) -> bool:
    """Errors after which the producer can no longer be used (fenced by a newer instance)."""
    return isinstance(err, _FATAL_TYPES) or (isinstance(err, BrokerError) and err.fatal)


def _copy(err: BaseException) -> BaseException:
    """A fresh instance of `err` (raising one instance again and again grows its traceback)."""
    if isinstance(err, BrokerError):
        return type(err)(err.message, err.code)
    try:
        return type(err)(*err.args)
    except Exception:  # pragma: no cover - exotic exception signature
        return err


class TransactionManager:
    """The state machine. Thread-safe; pass the producer's lock as `lock` to share one lock."""

    def __init__(self, transactional_id: str, lock: threading.RLock | None = None):
        self.transactional_id = transactional_id
        self._lock = lock if lock is not None else threading.RLock()
        self._state = S.UNINITIALIZED
        self._fatal: BaseException | None = None
        self._abortable: BaseException | None = None
        self.history: list[ClientTxnState] = [S.UNINITIALIZED]   # for debugging and tests

    # ------------------------------------------------------------------------------- queries
    @property
    def state(self) -> ClientTxnState:
        return self._state

    @property
    def fatal_error(self) -> BaseException | None:
        return self._fatal

    @property
    def abortable_error(self) -> BaseException | None:
        return self._abortable

    @property
    def in_transaction(self) -> bool:
        """A transaction is open (records may have been written under the current epoch)."""
        return self._state in (S.IN_TRANSACTION, S.COMMITTING, S.ABORTING, S.ABORTABLE_ERROR)

    def check_send(self) -> None:
        """`check(SEND)` for the per-record path: IN_TRANSACTION is read without the lock (one
        attribute read is atomic); the locked check runs only to raise. The producer calls it again
        under its own lock, where commit and abort take their first step, so no send slips past one."""
        if self._state is not S.IN_TRANSACTION:
            self.check(TxnOperation.SEND)

    def check(self, op: TxnOperation) -> ClientTxnState:
        """Raise if `op` may not be called now (see the module docstring); else the state it runs in."""
        with self._lock:
            state = self._state
            allowed = OPERATIONS[op]
            if state in allowed:
                return allowed[state]
            if state is S.FATAL_ERROR:
                raise _copy(self._fatal) if self._fatal is not None else ProducerFencedError(
                    f"transactional producer {self.transactional_id!r} is in a fatal error state")
            if state is S.ABORTABLE_ERROR:
                cause = self._abortable
                raise TransactionAbortableError(
                    f"{op.value}() not allowed: the transaction of {self.transactional_id!r} failed and "
                    f"must be aborted with abort_transaction(); cause: {cause!r}") from cause
            raise InvalidTxnStateError(self._illegal_message(op, state))

    def _illegal_message(self, op: TxnOperation, state: ClientTxnState) -> str:
        hint = {
            S.UNINITIALIZED: "call init_transactions() first",
            S.INITIALIZING: "init_transactions() has not completed; call it again",
            S.READY: "no transaction is open; call begin_transaction() first",
            S.IN_TRANSACTION: "a transaction is already open",
            S.COMMITTING: "a previous commit_transaction() did not complete; call commit_transaction() again",
            S.ABORTING: "a previous abort_transaction() did not complete; call abort_transaction() again",
        }.get(state, "")
        allowed = ", ".join(s.value for s in OPERATIONS[op])
        return (f"{op.value}() is not allowed in transaction state {state.value} (allowed in: {allowed}); "
                f"{hint}")

    # ------------------------------------------------------------------------------- user calls
    def start(self, op: TxnOperation) -> ClientTxnState:
        """Check `op` and move to the state it runs in; returns that state."""
        with self._lock:
            target = self.check(op)
            self._transition(target)
            return target

    def finish(self, op: TxnOperation) -> ClientTxnState:
        """`op` completed: move to its final state. Ignored if an error moved the state meanwhile
        into one `op` does not run in (e.g. a concurrent fatal error)."""
        with self._lock:
            target = FINISH[op]
            running = set(OPERATIONS[op].values())
            if target is not None and self._state in running:
                self._transition(target)
                if target is S.READY:
                    self._abortable = None
            return self._state

    # ------------------------------------------------------------------------------- errors
    def abortable(self, err: BaseException) -> bool:
        """A record (or offset commit) of the open transaction failed: the transaction can only be
        aborted. Returns True if the state changed (no effect outside IN_TRANSACTION/COMMITTING;
        the first cause is kept)."""
        with self._lock:
            if self._state in (S.IN_TRANSACTION, S.COMMITTING):
                self._abortable = err
                self._transition(S.ABORTABLE_ERROR)
                return True
            return False

    def fatal(self, err: BaseException) -> BaseException:
        """Move to FATAL_ERROR (terminal); returns the error every later call raises. Being fenced
        (`ProducerFencedError` / `InvalidProducerEpochError`) is reported as `ProducerFencedError`."""
        with self._lock:
            if self._state is S.FATAL_ERROR and self._fatal is not None:
                return self._fatal
            if isinstance(err, InvalidProducerEpochError):
                err = ProducerFencedError(
                    f"transactional producer {self.transactional_id!r} was fenced: {err.message}")
            elif isinstance(err, ProducerFencedError):
                err = ProducerFencedError(
                    f"transactional producer {self.transactional_id!r} was fenced: {err.message}")
            self._fatal = err
            self._transition(S.FATAL_ERROR)
            return err

    # ------------------------------------------------------------------------------- internals
    def _transition(self, target: ClientTxnState) -> None:
        if target not in TRANSITIONS[self._state]:  # a bug in the caller, not a user error
            raise InvalidTxnStateError(f"illegal transaction state transition {self._state.value} -> {target.value}")
        if target is not self._state:
            self.history.append(target)
        self._state = target

    def __repr__(self) -> str:
        return f"TransactionManager({self.transactional_id!r}, state={self._state.value})"

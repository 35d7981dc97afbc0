"""Transaction-coordinator state machine (Kafka `TransactionState`, transactions v2 / KIP-890).

One `TxnState` per transactional id. Values are the wire/log values of Kafka's
`TransactionLogValue.TransactionStatus`, so they are frozen: never renumber.

::

                 InitProducerId (bump / rotate pid)
                  +----+
                  |    v
    (new id) --> EMPTY ----------------------------------------+
                  |  ^                                         |
  first write to  |  | InitProducerId                          | EndTxn(abort), nothing added
  a partition     |  | (bump)                                  | (TV2: bump, no markers)
  (AddPartitions/ v  |                                         v
  AddOffsets)   ONGOING <--+ more partitions            COMPLETE_ABORT
                  |  |  |  |                                 ^   ^
                  |  |  +--+                                 |   |
                  |  |                                       |   |
   EndTxn(commit) |  | EndTxn(abort) / timeout / operator    |   |
   (epoch+1)      |  | abort / InitProducerId fencing        |   |
                  |  |       (epoch+1)                       |   |
                  |  +--> [PREPARE_EPOCH_FENCE] --+          |   |
                  |        (in memory only)      |           |   |
                  |  +---------------------------+           |   |
                  v  v                                       |   |
      PREPARE_COMMIT   PREPARE_ABORT --- all markers written -+   |
            |                                                    |
            +--- all markers written --> COMPLETE_COMMIT         |
                                                                 |
    EMPTY / COMPLETE_COMMIT / COMPLETE_ABORT --> ONGOING (next transaction)
    EMPTY / COMPLETE_COMMIT / COMPLETE_ABORT --> EMPTY   (InitProducerId)
    EMPTY / COMPLETE_COMMIT / COMPLETE_ABORT --> DEAD    (transactional.id expiration: tombstone)

The table below is Kafka's (`TransactionMetadata.scala` / reference section 2.4) plus one
documented TV2 extension: ``COMPLETE_ABORT`` may also follow ``EMPTY``, ``COMPLETE_COMMIT`` and
``COMPLETE_ABORT``. That is EndTxn(abort) when no partition was added: the coordinator bumps the
epoch (so a late write of the old epoch is fenced) and, having nothing to mark, records the
completed abort directly instead of writing a PREPARE_ABORT with an empty marker set.

``PREPARE_EPOCH_FENCE`` is a pending (in-memory) state only: the fence is logged as PREPARE_ABORT
with the bumped epoch. ``DEAD`` is never logged as a value either: it is the tombstone.

An illegal transition is an error (`IllegalStateTransition`), never a silent no-op.
"""
from __future__ import annotations

from enum import IntEnum
from types import MappingProxyType
from typing import Final, Mapping

from ..errors import InvalidTxnStateError


class TxnState(IntEnum):
    # action: InitProducerId created or bumped the producer; no transaction is open.
    # transition: first partition / offsets added => ONGOING; InitProducerId => EMPTY;
    #             EndTxn(abort) => COMPLETE_ABORT (TV2 bump); expiration => DEAD
    EMPTY = 0
    # action: a transaction is open; partitions are being added.
    # transition: EndTxn(commit) => PREPARE_COMMIT; EndTxn(abort) / timeout / operator abort =>
    #             PREPARE_ABORT; InitProducerId => PREPARE_EPOCH_FENCE => PREPARE_ABORT
    ONGOING = 1
    # action: commit decided and durable; markers being written (epoch already bumped).
    # transition: all markers written => COMPLETE_COMMIT
    PREPARE_COMMIT = 2
    # action: abort decided and durable; markers being written (epoch already bumped).
    # transition: all markers written => COMPLETE_ABORT
    PREPARE_ABORT = 3
    # action: transaction committed everywhere.
    # transition: => ONGOING (next transaction), EMPTY (InitProducerId), DEAD (expiry),
    #             COMPLETE_ABORT (TV2 empty abort)
    COMPLETE_COMMIT = 4
    # action: transaction aborted everywhere.
    # transition: same as COMPLETE_COMMIT
    COMPLETE_ABORT = 5
    # action: transactional id expired; removed from memory, tombstone in the log.
    # transition: none (terminal)
    DEAD = 6
    # action: in-memory pending state while an ongoing transaction is fenced (epoch bump).
    # transition: => PREPARE_ABORT (with the bumped epoch)
    PREPARE_EPOCH_FENCE = 7


_S = TxnState
_TERMINAL = frozenset({_S.EMPTY, _S.COMPLETE_COMMIT, _S.COMPLETE_ABORT})

ALLOWED_PREVIOUS: Final[Mapping[TxnState, frozenset[TxnState]]] = MappingProxyType({
    _S.EMPTY: _TERMINAL,
    _S.ONGOING: _TERMINAL | {_S.ONGOING},
    _S.PREPARE_COMMIT: frozenset({_S.ONGOING}),
    _S.PREPARE_ABORT: frozenset({_S.ONGOING, _S.PREPARE_EPOCH_FENCE}),
    _S.COMPLETE_COMMIT: frozenset({_S.PREPARE_COMMIT}),
    # Kafka: {PREPARE_ABORT}; TV2 extension (see module docstring): empty abort.
    _S.COMPLETE_ABORT: frozenset({_S.PREPARE_ABORT}) | _TERMINAL,
    _S.DEAD: _TERMINAL,
    _S.PREPARE_EPOCH_FENCE: frozenset({_S.ONGOING}),
})

# States a transactional id may rest in between transactions (expirable, re-initialisable).
IDLE_STATES: Final[frozenset[TxnState]] = _TERMINAL
PREPARE_STATES: Final[frozenset[TxnState]] = frozenset({_S.PREPARE_COMMIT, _S.PREPARE_ABORT})
COMPLETE_STATES: Final[frozenset[TxnState]] = frozenset({_S.COMPLETE_COMMIT, _S.COMPLETE_ABORT})
# States that are never the value of a transaction-log record.
NEVER_LOGGED: Final[frozenset[TxnState]] = frozenset({_S.DEAD, _S.PREPARE_EPOCH_FENCE})


class IllegalStateTransition(InvalidTxnStateError):
    """A transition the table forbids was attempted (a bug or a forged/corrupt request)."""


def is_allowed(source: TxnState, target: TxnState) -> bool:
    return source in ALLOWED_PREVIOUS[target]


def check_transition(source: TxnState, target: TxnState) -> None:
    """Raise `IllegalStateTransition` unless `target` lists `source` as a valid predecessor."""
    if not is_allowed(TxnState(source), TxnState(target)):
        raise IllegalStateTransition(
            f"illegal transaction state transition {TxnState(source).name} -> {TxnState(target).name}")

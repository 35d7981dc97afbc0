"""Consumer-group state machine (Kafka classic `ClassicGroupState`, reference section 4.1).

One `GroupState` per consumer group. Values are stored in group-metadata records, so they are
frozen: never renumber.

::

                      first member joins
          +--------------------------------------------+
          |                                            v
        EMPTY <---- rebalance ends with no member -- PREPARING_REBALANCE <---------+
          ^  (generation + 1)                          |    ^    ^                 |
          |                                            |    |    | join / leave /  |
          |                 all members rejoined,      |    |    | session expiry /|
          |                 or rebalance timeout:      |    |    | subscription or |
          |                 generation + 1, assign     v    |    | metadata change |
          |                                   COMPLETING_REBALANCE                 |
          |                                            |    (member left before    |
          |                 assignment stored          |     the assignment was    |
          |                 (server-side assignor)     v     stored)               |
          |                                         STABLE ------------------------+
          |
    EMPTY / PREPARING_REBALANCE / COMPLETING_REBALANCE / STABLE --> DEAD (group deleted: tombstone)

``COMPLETING_REBALANCE`` is kept for fidelity with Kafka. In Kafka it lasts until the leader's
SyncGroup brings the assignment; here the coordinator computes the assignment itself
(server-side assignment), so a group passes PREPARING_REBALANCE -> COMPLETING_REBALANCE -> STABLE
within one step and is never *stored* in COMPLETING_REBALANCE.

An illegal transition is an error (`IllegalGroupStateTransition`), never a silent no-op.
"""
from __future__ import annotations

from enum import IntEnum
from types import MappingProxyType
from typing import Final, Mapping

from ..errors import UnknownServerError


class GroupState(IntEnum):
    # action: no members; committed offsets (if any) are kept; generation survives.
    # transition: a member joins => PREPARING_REBALANCE; group deleted => DEAD
    EMPTY = 0
    # action: members are (re)joining; heartbeats answer REBALANCE_IN_PROGRESS to members that
    #         have not rejoined yet.
    # transition: all known members rejoined or rebalance timeout => COMPLETING_REBALANCE
    #             (members left) or EMPTY (nobody left); deleted => DEAD
    PREPARING_REBALANCE = 1
    # action: the new generation exists; its assignment is being computed and stored.
    # transition: assignment stored => STABLE; membership change => PREPARING_REBALANCE
    COMPLETING_REBALANCE = 2
    # action: every member has its assignment for the current generation.
    # transition: join / leave / expiry / subscription change / cooperative follow-up =>
    #             PREPARING_REBALANCE
    STABLE = 3
    # action: group removed (tombstone); terminal.
    # transition: none
    DEAD = 4


_S = GroupState

ALLOWED_PREVIOUS: Final[Mapping[GroupState, frozenset[GroupState]]] = MappingProxyType({
    _S.EMPTY: frozenset({_S.PREPARING_REBALANCE}),
    _S.PREPARING_REBALANCE: frozenset({_S.EMPTY, _S.COMPLETING_REBALANCE, _S.STABLE}),
    _S.COMPLETING_REBALANCE: frozenset({_S.PREPARING_REBALANCE}),
    _S.STABLE: frozenset({_S.COMPLETING_REBALANCE}),
    _S.DEAD: frozenset({_S.EMPTY, _S.PREPARING_REBALANCE, _S.COMPLETING_REBALANCE, _S.STABLE, _S.DEAD}),
})


class IllegalGroupStateTransition(UnknownServerError):
    """A transition the table forbids was attempted: a coordinator bug, never a client error."""


def is_allowed(source: GroupState, target: GroupState) -> bool:
    return GroupState(source) in ALLOWED_PREVIOUS[GroupState(target)]


def check_transition(source: GroupState, target: GroupState) -> None:
    """Raise `IllegalGroupStateTransition` unless `target` lists `source` as a valid predecessor."""
    if not is_allowed(source, target):
        raise IllegalGroupStateTransition(
            f"illegal group state transition {GroupState(source).name} -> {GroupState(target).name}")

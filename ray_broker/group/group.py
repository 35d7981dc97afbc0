"""`ConsumerGroup`: one consumer group's membership and rebalance state machine (pure, no I/O).

Time always arrives as ``now_ms``; the owner (the coordinator shard, wrapped by an actor) drives
timeouts with `tick`. Methods either change the group consistently and return, or raise a
`BrokerError` after changing nothing but soft state (the member's last-heartbeat time, which a
failed call still refreshes, as in Kafka).

Protocol (polling-friendly, nothing blocks)
-------------------------------------------
1. ``join(None, topics, ...)`` returns a `JoinResult` with a fresh member id (assigned on the first
   join: no MEMBER_ID_REQUIRED round trip) and ``generation_id``: the generation the member will
   belong to (the pending one while a rebalance is in progress).
2. The member polls ``sync(member_id, generation_id, now_ms)``; while the rebalance is still
   collecting members the `SyncResult` has ``ready=False``. Once every known member has rejoined
   (or the rebalance timeout passed: members that did not rejoin are removed), the coordinator
   bumps the generation, computes the assignment itself and the group becomes STABLE.
3. ``heartbeat`` keeps the session alive: REBALANCE_IN_PROGRESS means "call join again",
   ILLEGAL_GENERATION means the member's generation is stale, UNKNOWN_MEMBER_ID means it was
   removed (session expired, left, or never joined) and must join again with no member id.

Server-side assignment
----------------------
Kafka's classic protocol lets the group leader compute the assignment and send it in SyncGroup.
Here the coordinator runs the group's assignor (`assignors.ASSIGNORS[protocol]`) at the end of the
join phase, using the coordinator's own record of who owns what, so there is no leader SyncGroup
and the group goes PREPARING_REBALANCE -> COMPLETING_REBALANCE -> STABLE in one step. ``leader_id``
is still chosen (informational). The assignor is chosen by the first member of an empty group;
later members must use the same one.

Cooperative protocol (KIP-429)
------------------------------
With a cooperative assignor, generation N revokes a moving partition from its owner without
assigning it; once every member with revocations has synced generation N (so has stopped
consuming them) the coordinator starts a follow-up rebalance whose generation N+1 assigns them.
Until a member has synced the generation that revoked a partition, the coordinator still treats
the partition as owned by that member.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ..errors import ErrorCode, error_for
from ..records import TopicPartition
from .assignors import COOPERATIVE, Subscription, assignor_for
from .state import GroupState, check_transition

NO_GENERATION = -1
DEFAULT_PROTOCOL = "range"


@dataclass
class GroupMember:
    member_id: str
    client_id: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    subscription: tuple[str, ...]
    assignment: tuple[TopicPartition, ...] = ()
    # The assignment the member last received from a ready sync (what it may still be consuming).
    synced_assignment: tuple[TopicPartition, ...] = ()
    joined: bool = False                 # has (re)joined the rebalance in progress
    synced_generation: int = NO_GENERATION
    last_heartbeat_ms: int = 0           # soft state: not compared, refreshed on load

    def to_dict(self) -> dict:
        return {
            "member_id": self.member_id, "client_id": self.client_id,
            "session_timeout_ms": self.session_timeout_ms, "rebalance_timeout_ms": self.rebalance_timeout_ms,
            "subscription": list(self.subscription),
            "assignment": [list(tp) for tp in self.assignment],
            "synced_assignment": [list(tp) for tp in self.synced_assignment],
            "joined": self.joined, "synced_generation": self.synced_generation,
            "last_heartbeat_ms": self.last_heartbeat_ms,
        }

    @staticmethod
    def from_dict(d: Mapping) -> "GroupMember":
        return GroupMember(
            d["member_id"], d["client_id"], int(d["session_timeout_ms"]), int(d["rebalance_timeout_ms"]),
            tuple(d["subscription"]), _tps(d["assignment"]), _tps(d["synced_assignment"]),
            bool(d["joined"]), int(d["synced_generation"]), int(d["last_heartbeat_ms"]))


def _tps(items: Iterable) -> tuple[TopicPartition, ...]:
    return tuple(sorted(TopicPartition(str(t), int(p)) for t, p in items))


@dataclass(frozen=True)
class JoinResult:
    member_id: str
    generation_id: int            # the generation to sync with (the pending one while rebalancing)
    ready: bool                   # True: the generation is complete, sync returns the assignment
    state: GroupState
    protocol: str | None
    leader_id: str | None


@dataclass(frozen=True)
class SyncResult:
    ready: bool                                 # False: rebalance still collecting members; poll again
    generation_id: int
    assignment: tuple[TopicPartition, ...] = ()  # everything the member owns in this generation
    # Deltas against the assignment this member last received from a ready sync (so a member that
    # skipped a generation still gets correct deltas).
    revoked: tuple[TopicPartition, ...] = ()     # stop consuming these
    added: tuple[TopicPartition, ...] = ()       # start consuming these
    rejoin: bool = False                        # a new rebalance started: call join again
    protocol: str | None = None


def _normalize_topics(subscription) -> tuple[str, ...]:
    if isinstance(subscription, Subscription):
        return subscription.topics
    if isinstance(subscription, str):
        subscription = [subscription]
    topics = tuple(sorted(set(subscription)))
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise error_for(ErrorCode.INVALID_REQUEST, f"subscription must be a non-empty list of topics: {subscription!r}")
    return topics


class ConsumerGroup:
    def __init__(self, group_id: str, default_protocol: str = DEFAULT_PROTOCOL):
        self.group_id = group_id
        self.state = GroupState.EMPTY
        self.generation_id = 0
        self.protocol: str | None = None
        self.leader_id: str | None = None
        self.members: dict[str, GroupMember] = {}
        self.rebalance_deadline_ms: int | None = None
        self.next_member_seq = 0
        # Cooperative: partitions were withheld (revoked, not yet reassigned) in this generation.
        self.followup_pending = False
        self.default_protocol = default_protocol
        # Soft: topic -> partition count, kept current by the owner (not part of the stored state).
        self.topic_partitions: Mapping[str, int] = {}

    # ---- persistence --------------------------------------------------------------------------
    def to_dict(self, include_soft: bool = True) -> dict:
        members = [m.to_dict() for _, m in sorted(self.members.items())]
        if not include_soft:
            for m in members:
                m.pop("last_heartbeat_ms")
        return {"group_id": self.group_id, "state": int(self.state), "generation_id": self.generation_id,
                "protocol": self.protocol, "leader_id": self.leader_id,
                "rebalance_deadline_ms": self.rebalance_deadline_ms,
                "next_member_seq": self.next_member_seq, "followup_pending": self.followup_pending,
                "members": members}

    @staticmethod
    def from_dict(d: Mapping, default_protocol: str = DEFAULT_PROTOCOL) -> "ConsumerGroup":
        g = ConsumerGroup(d["group_id"], default_protocol)
        g.state = GroupState(d["state"])
        g.generation_id = int(d["generation_id"])
        g.protocol = d["protocol"]
        g.leader_id = d["leader_id"]
        g.rebalance_deadline_ms = d["rebalance_deadline_ms"]
        g.next_member_seq = int(d["next_member_seq"])
        g.followup_pending = bool(d.get("followup_pending", False))
        g.members = {m["member_id"]: GroupMember.from_dict(m) for m in d["members"]}
        return g

    def copy(self) -> "ConsumerGroup":
        g = ConsumerGroup.from_dict(self.to_dict(), self.default_protocol)
        g.topic_partitions = self.topic_partitions
        return g

    # ---- queries ------------------------------------------------------------------------------
    @property
    def pending_generation_id(self) -> int:
        """The generation a member syncs with: the next one while a rebalance is in progress."""
        return self.generation_id + 1 if self.state is GroupState.PREPARING_REBALANCE else self.generation_id

    def is_cooperative(self) -> bool:
        return self.protocol is not None and assignor_for(self.protocol).rebalance_protocol == COOPERATIVE

    def subscribed_topics(self) -> set[str]:
        return {t for m in self.members.values() for t in m.subscription}

    def owner_of(self) -> dict[TopicPartition, str]:
        return {tp: mid for mid, m in self.members.items() for tp in m.assignment}

    def _member(self, member_id: str | None) -> GroupMember:
        m = self.members.get(member_id) if member_id else None
        if m is None:
            raise error_for(ErrorCode.UNKNOWN_MEMBER_ID,
                            f"member {member_id!r} is not in group {self.group_id!r} (left, expired or never joined)")
        return m

    # ---- operations ---------------------------------------------------------------------------
    def join(self, member_id: str | None, subscription, session_timeout_ms: int, rebalance_timeout_ms: int,
             now_ms: int, *, client_id: str = "", protocol: str | None = None) -> JoinResult:
        if self.state is GroupState.DEAD:
            raise error_for(ErrorCode.COORDINATOR_NOT_AVAILABLE, f"group {self.group_id!r} was deleted")
        topics = _normalize_topics(subscription)
        for name, v in (("session_timeout_ms", session_timeout_ms), ("rebalance_timeout_ms", rebalance_timeout_ms)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise error_for(ErrorCode.INVALID_REQUEST, f"{name} must be a positive integer, got {v!r}")
        proto = protocol or self.protocol or self.default_protocol
        assignor_for(proto)  # validates the name
        if self.members and proto != self.protocol:
            raise error_for(ErrorCode.INVALID_REQUEST,
                            f"group {self.group_id!r} uses assignor {self.protocol!r}, member asked for {proto!r}")
        if not member_id:
            member_id = f"{client_id or 'consumer'}-{self.group_id}-{self.next_member_seq}"
            self.next_member_seq += 1
            if not self.members:
                self.protocol = proto
            member = GroupMember(member_id, client_id, session_timeout_ms, rebalance_timeout_ms, topics)
            self.members[member_id] = member
            changed = True
        else:
            member = self._member(member_id)
            changed = member.subscription != topics
            member.subscription = topics
            member.session_timeout_ms = session_timeout_ms
            member.rebalance_timeout_ms = rebalance_timeout_ms
        member.last_heartbeat_ms = now_ms
        if self.state is not GroupState.PREPARING_REBALANCE and (changed or self.state is not GroupState.STABLE):
            self._prepare_rebalance(now_ms)
        if self.state is GroupState.PREPARING_REBALANCE:
            member.joined = True
            self._maybe_complete_rebalance(now_ms)
        return self._join_result(member_id)

    def sync(self, member_id: str, generation: int, now_ms: int) -> SyncResult:
        member = self._member(member_id)
        member.last_heartbeat_ms = now_ms
        if self.state is GroupState.PREPARING_REBALANCE:
            if member.joined and generation == self.pending_generation_id:
                return SyncResult(False, generation, protocol=self.protocol)
            self._check_generation(generation)
            raise error_for(ErrorCode.REBALANCE_IN_PROGRESS, f"group {self.group_id!r} is rebalancing: rejoin")
        self._check_generation(generation)
        prev, cur = set(member.synced_assignment), set(member.assignment)
        member.synced_generation = generation
        member.synced_assignment = member.assignment
        self._maybe_start_followup_rebalance(now_ms)
        return SyncResult(True, generation, member.assignment, tuple(sorted(prev - cur)), tuple(sorted(cur - prev)),
                          rejoin=self.state is GroupState.PREPARING_REBALANCE, protocol=self.protocol)

    def heartbeat(self, member_id: str, generation: int, now_ms: int) -> None:
        """Return normally if all is well; raise REBALANCE_IN_PROGRESS / ILLEGAL_GENERATION /
        UNKNOWN_MEMBER_ID otherwise (the session is refreshed either way for a known member)."""
        member = self._member(member_id)
        member.last_heartbeat_ms = now_ms
        if self.state is GroupState.PREPARING_REBALANCE:
            if member.joined and generation == self.pending_generation_id:
                return None
            self._check_generation(generation)
            raise error_for(ErrorCode.REBALANCE_IN_PROGRESS, f"group {self.group_id!r} is rebalancing: rejoin")
        self._check_generation(generation)
        return None

    def leave(self, member_id: str, now_ms: int) -> None:
        self._member(member_id)
        self._remove_members([member_id], now_ms)

    def tick(self, now_ms: int) -> list[str]:
        """Expire sessions and complete a timed-out rebalance; returns the removed member ids."""
        expired = sorted(mid for mid, m in self.members.items()
                         if now_ms >= m.last_heartbeat_ms + m.session_timeout_ms)
        if expired:
            self._remove_members(expired, now_ms)
        if (self.state is GroupState.PREPARING_REBALANCE and self.rebalance_deadline_ms is not None
                and now_ms >= self.rebalance_deadline_ms):
            expired += sorted(mid for mid, m in self.members.items() if not m.joined)
            self._maybe_complete_rebalance(now_ms, force=True)
        return expired

    def request_rebalance(self, now_ms: int) -> bool:
        """Start a rebalance (e.g. a subscribed topic's partition count changed); False if not needed."""
        if self.state in (GroupState.STABLE, GroupState.COMPLETING_REBALANCE) and self.members:
            self._prepare_rebalance(now_ms)
            return True
        return False

    def mark_dead(self) -> None:
        check_transition(self.state, GroupState.DEAD)
        self.state = GroupState.DEAD
        self.members.clear()
        self.leader_id = None
        self.rebalance_deadline_ms = None

    def on_loaded(self, now_ms: int) -> None:
        """After a coordinator (re)load: give every member a full session, and a rebalance in
        progress a full rebalance timeout, from now."""
        for m in self.members.values():
            m.last_heartbeat_ms = max(m.last_heartbeat_ms, now_ms)
        if self.state is GroupState.PREPARING_REBALANCE:
            self.rebalance_deadline_ms = max(self.rebalance_deadline_ms or 0, now_ms + self._max_rebalance_timeout())

    # ---- offset-commit validation (reference 4.4: ClassicGroup.validateOffsetCommit) ------------
    def validate_offset_commit(self, member_id: str | None, generation: int, transactional: bool) -> None:
        if self.state is GroupState.DEAD:
            raise error_for(ErrorCode.COORDINATOR_NOT_AVAILABLE, f"group {self.group_id!r} was deleted")
        if generation < 0 and not member_id and not self.members:
            return  # admin / simple (unmanaged) commit to a group without members
        self._member(member_id)
        self._check_generation(generation)
        if not transactional and self.state is GroupState.COMPLETING_REBALANCE:
            raise error_for(ErrorCode.REBALANCE_IN_PROGRESS, f"group {self.group_id!r} is completing a rebalance")

    # ---- internals ----------------------------------------------------------------------------
    def _check_generation(self, generation: int) -> None:
        if generation != self.generation_id:
            raise error_for(ErrorCode.ILLEGAL_GENERATION,
                            f"generation {generation} is not group {self.group_id!r}'s current generation "
                            f"{self.generation_id}")

    def _max_rebalance_timeout(self) -> int:
        return max((m.rebalance_timeout_ms for m in self.members.values()), default=0)

    def _join_result(self, member_id: str) -> JoinResult:
        return JoinResult(member_id, self.pending_generation_id, self.state is GroupState.STABLE,
                          self.state, self.protocol, self.leader_id)

    def _prepare_rebalance(self, now_ms: int) -> None:
        check_transition(self.state, GroupState.PREPARING_REBALANCE)
        self.state = GroupState.PREPARING_REBALANCE
        self.followup_pending = False
        for m in self.members.values():
            m.joined = False
        self.rebalance_deadline_ms = now_ms + self._max_rebalance_timeout()

    def _remove_members(self, member_ids: list[str], now_ms: int) -> None:
        for mid in member_ids:
            del self.members[mid]
            if self.leader_id == mid:
                self.leader_id = None
        if self.state in (GroupState.STABLE, GroupState.COMPLETING_REBALANCE):
            self._prepare_rebalance(now_ms)
        self._maybe_complete_rebalance(now_ms)

    def _maybe_complete_rebalance(self, now_ms: int, force: bool = False) -> None:
        if self.state is not GroupState.PREPARING_REBALANCE:
            return
        if not force and not all(m.joined for m in self.members.values()):
            return
        for mid in sorted(mid for mid, m in self.members.items() if not m.joined):
            del self.members[mid]
        self.generation_id += 1
        self.rebalance_deadline_ms = None
        if not self.members:
            check_transition(self.state, GroupState.EMPTY)
            self.state = GroupState.EMPTY
            self.protocol = None
            self.leader_id = None
            return
        check_transition(self.state, GroupState.COMPLETING_REBALANCE)
        self.state = GroupState.COMPLETING_REBALANCE
        if self.leader_id not in self.members:
            self.leader_id = min(self.members)
        assignor = assignor_for(self.protocol or self.default_protocol)
        cooperative = assignor.rebalance_protocol == COOPERATIVE
        owned = {mid: self._owned(m, cooperative) for mid, m in self.members.items()}
        subs = {mid: Subscription(m.subscription, owned[mid]) for mid, m in self.members.items()}
        assignment = assignor.assign(subs, self.topic_partitions)
        for mid, m in self.members.items():
            m.assignment = tuple(sorted(assignment.get(mid, ())))
            m.joined = False
        if cooperative:
            assigned = {tp for parts in assignment.values() for tp in parts}
            withheld = {tp for parts in owned.values() for tp in parts} - assigned
            self.followup_pending = bool(withheld & set(self._all_subscribed_partitions()))
        check_transition(self.state, GroupState.STABLE)
        self.state = GroupState.STABLE

    def _owned(self, m: GroupMember, cooperative: bool) -> tuple[TopicPartition, ...]:
        if not cooperative:
            return m.assignment
        # Partitions revoked in a generation the member has not synced yet may still be in use.
        return tuple(sorted(set(m.assignment) | set(m.synced_assignment)))

    def _all_subscribed_partitions(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t in sorted(self.subscribed_topics())
                for p in range(max(0, int(self.topic_partitions.get(t, 0))))]

    def _maybe_start_followup_rebalance(self, now_ms: int) -> None:
        """Cooperative: once every member with revocations has synced, assign the revoked ones."""
        if self.state is not GroupState.STABLE or not self.followup_pending:
            return
        if any(set(m.synced_assignment) - set(m.assignment) for m in self.members.values()):
            return  # some member has not acknowledged its revocations yet
        self._prepare_rebalance(now_ms)

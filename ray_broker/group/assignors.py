"""Partition assignors: pure functions from subscriptions to an assignment.

Every assignor maps ``members: {member_id: Subscription}`` and ``partitions_per_topic: {topic:
count}`` to ``{member_id: [TopicPartition, ...]}`` (every member present, lists sorted). They are
deterministic: members are visited in sorted order and ties break on member id, so two
coordinators replaying the same inputs compute the same assignment. Topics absent from
``partitions_per_topic`` (unknown or deleted) contribute no partitions.

* `RangeAssignor` ("range", eager): per topic, contiguous ranges; the first ``count % n`` members
  (sorted) get one extra partition (Kafka's `RangeAssignor`).
* `RoundRobinAssignor` ("roundrobin", eager): all partitions sorted by (topic, partition), dealt
  to members in sorted order, skipping members not subscribed to the topic.
* `CooperativeStickyAssignor` ("cooperative-sticky", cooperative / KIP-429): computes a balanced
  target that keeps as many owned partitions as possible, then withholds every partition whose
  owner changes: it is revoked from its current owner in this generation and assigned only in the
  next one (the follow-up rebalance), once the owner has acknowledged the revocation. Partitions
  that do not move are never revoked. Balance is within one partition per member when all members
  have the same subscription; with different subscriptions it is best effort (greedy: least-loaded
  eligible member, then moves from members holding at least two more than an eligible peer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Mapping

from ..records import TopicPartition

EAGER = "EAGER"
COOPERATIVE = "COOPERATIVE"


@dataclass(frozen=True)
class Subscription:
    topics: tuple[str, ...]
    owned_partitions: tuple[TopicPartition, ...] = field(default=())

    @staticmethod
    def of(topics: Iterable[str], owned: Iterable[TopicPartition] = ()) -> "Subscription":
        return Subscription(tuple(sorted(set(topics))),
                            tuple(sorted({TopicPartition(t, int(p)) for t, p in owned})))


Assignment = dict[str, list[TopicPartition]]


class PartitionAssignor:
    name: ClassVar[str] = ""
    rebalance_protocol: ClassVar[str] = EAGER

    def assign(self, members: Mapping[str, Subscription],
               partitions_per_topic: Mapping[str, int]) -> Assignment:
        raise NotImplementedError


def _partitions(topic: str, partitions_per_topic: Mapping[str, int]) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(max(0, int(partitions_per_topic.get(topic, 0))))]


def _subscribed_partitions(members: Mapping[str, Subscription],
                           partitions_per_topic: Mapping[str, int]) -> list[TopicPartition]:
    topics = sorted({t for s in members.values() for t in s.topics})
    return [tp for t in topics for tp in _partitions(t, partitions_per_topic)]


def _finish(result: Mapping[str, Iterable[TopicPartition]], members: Mapping[str, Subscription]) -> Assignment:
    return {m: sorted(result.get(m, ())) for m in sorted(members)}


class RangeAssignor(PartitionAssignor):
    name = "range"
    rebalance_protocol = EAGER

    def assign(self, members, partitions_per_topic):
        result: dict[str, list[TopicPartition]] = {m: [] for m in members}
        topics = sorted({t for s in members.values() for t in s.topics})
        for topic in topics:
            consumers = sorted(m for m, s in members.items() if topic in s.topics)
            parts = _partitions(topic, partitions_per_topic)
            per, extra = divmod(len(parts), len(consumers))
            start = 0
            for i, m in enumerate(consumers):
                n = per + (1 if i < extra else 0)
                result[m].extend(parts[start:start + n])
                start += n
        return _finish(result, members)


class RoundRobinAssignor(PartitionAssignor):
    name = "roundrobin"
    rebalance_protocol = EAGER

    def assign(self, members, partitions_per_topic):
        result: dict[str, list[TopicPartition]] = {m: [] for m in members}
        order = sorted(members)
        if not order:
            return {}
        i = 0
        for tp in _subscribed_partitions(members, partitions_per_topic):
            # Circular iterator over sorted members; skip those not subscribed (one exists).
            while tp.topic not in members[order[i % len(order)]].topics:
                i += 1
            result[order[i % len(order)]].append(tp)
            i += 1
        return _finish(result, members)


def sticky_target(members: Mapping[str, Subscription],
                  partitions_per_topic: Mapping[str, int]) -> Assignment:
    """Balanced assignment keeping as many valid owned partitions as possible (no revocation step).

    1. Keep owned partitions that still exist and are still subscribed (a partition claimed twice
       stays with the first claimant in sorted order).
    2. Give each unowned partition to the least-loaded eligible member.
    3. While some member holds at least two more than an eligible peer, move one of its partitions
       (its highest) to the least-loaded eligible peer. Each move lowers the sum of squared loads,
       so this terminates; with identical subscriptions it ends balanced within one.
    """
    order = sorted(members)
    all_parts = _subscribed_partitions(members, partitions_per_topic)
    valid = set(all_parts)
    owner: dict[TopicPartition, str] = {}
    load: dict[str, list[TopicPartition]] = {m: [] for m in order}
    for m in order:
        for tp in members[m].owned_partitions:
            if tp in valid and tp not in owner and tp.topic in members[m].topics:
                owner[tp] = m
                load[m].append(tp)
    eligible = {t: [m for m in order if t in members[m].topics]
                for t in {tp.topic for tp in all_parts}}

    def least_loaded(topic: str) -> str:
        return min(eligible[topic], key=lambda m: (len(load[m]), m))

    for tp in all_parts:
        if tp not in owner:
            m = least_loaded(tp.topic)
            owner[tp] = m
            load[m].append(tp)

    moved = True
    while moved:
        moved = False
        for m in sorted(order, key=lambda m: (-len(load[m]), m)):
            for tp in sorted(load[m], reverse=True):
                target = least_loaded(tp.topic)
                if len(load[target]) + 1 < len(load[m]):
                    load[m].remove(tp)
                    load[target].append(tp)
                    owner[tp] = target
                    moved = True
                    break
            if moved:
                break
    return _finish(load, members)


class CooperativeStickyAssignor(PartitionAssignor):
    name = "cooperative-sticky"
    rebalance_protocol = COOPERATIVE

    def assign(self, members, partitions_per_topic):
        target = sticky_target(members, partitions_per_topic)
        claimed: dict[TopicPartition, str] = {}
        for m in sorted(members):
            for tp in members[m].owned_partitions:
                claimed.setdefault(tp, m)
        result: dict[str, list[TopicPartition]] = {}
        for m, parts in target.items():
            # A partition still owned by another member is revoked there first (this generation)
            # and assigned here only in the next generation.
            result[m] = [tp for tp in parts if claimed.get(tp, m) == m]
        return _finish(result, members)


ASSIGNORS: Mapping[str, PartitionAssignor] = {
    a.name: a for a in (RangeAssignor(), RoundRobinAssignor(), CooperativeStickyAssignor())}


def assignor_for(name: str) -> PartitionAssignor:
    try:
        return ASSIGNORS[name]
    except KeyError:
        from ..errors import ErrorCode, error_for
        raise error_for(ErrorCode.INVALID_REQUEST,
                        f"unknown partition assignor {name!r}; known: {sorted(ASSIGNORS)}") from None

"""Consumer-group lag per partition, measured against the last stable offset (pure)."""
from __future__ import annotations

from dataclasses import dataclass

from ..records import TopicPartition
from .coordinator import GroupDescription


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    member_id: str | None          # owner in the current assignment (None: unassigned)
    client_id: str | None
    committed: int | None          # the group's committed offset (None: nothing committed)
    last_stable_offset: int | None  # None: leader unavailable / topic gone
    lag: int | None                # last_stable_offset - committed (>= 0); None if either is unknown
    pending: bool = False          # offsets of an open transaction wait for its marker


@dataclass(frozen=True)
class ConsumerGroupDescription(GroupDescription):
    """`GroupDescription` plus lag per partition (`Admin.describe_group`)."""
    partitions: tuple = ()


def group_lag(desc, last_stable_offsets) -> tuple:
    """`PartitionLag` of every partition the group has an offset, a pending offset or an owner for.
    `last_stable_offsets`: {(topic, partition): LSO} (-1 or missing: unknown). Pure."""
    owner = {}
    for m in desc.members:
        for tp in m.assignment:
            owner[TopicPartition(*tp)] = m
    tps = set(desc.offsets) | set(desc.pending_offsets) | set(owner)
    out = []
    for tp in sorted(TopicPartition(*t) for t in tps):
        om = desc.offsets.get(tp)
        committed = None if om is None else int(getattr(om, "offset", om))
        lso = last_stable_offsets.get((tp.topic, tp.partition))
        lso = None if lso is None or lso < 0 else int(lso)
        lag = None if committed is None or lso is None else max(0, lso - committed)
        m = owner.get(tp)
        out.append(PartitionLag(tp.topic, tp.partition, m.member_id if m else None, m.client_id if m else None,
                                committed, lso, lag, tp in set(desc.pending_offsets)))
    return tuple(out)

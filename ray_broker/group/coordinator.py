"""`GroupCoordinatorShard`: the consumer groups and offsets of one ``__consumer_offsets`` partition.

Pure: the actor that wraps it does the I/O (appending to the replicated partition) and the timers
(calling `handle_tick` periodically).

Append / apply contract
-----------------------
Every ``handle_*`` method validates against the current state and returns a `CoordinatorResult`
``(records, response)`` **without changing durable state**. The caller appends ``records`` durably
(replicated, committed) in order and then calls ``apply(result)``, which replays each record: the
state changes only then, through exactly the code that rebuilds it after a restart, so replaying
the log always reproduces the live state. If the append fails, the caller drops the result and
nothing changed. A handler that raises a `BrokerError` changed nothing either. The caller runs one
operation at a time per shard (prepare -> append -> apply, then the next), as Kafka's coordinator
runtime does per partition.

Soft state is the exception: a member's last-heartbeat time (refreshed by join / sync / heartbeat /
commit, even when they fail) and the topic partition counts given to `update_topic_partitions`.
Neither is part of a record's identity; after a load, `on_loaded(now_ms)` gives every member a
fresh session.

After a restart: ``for key, value in log: shard.replay(key, value)`` then ``shard.on_loaded(now)``.
Compaction: `snapshot_records()` is the minimal record list that rebuilds the current state
(one record per group, per committed offset and per pending transactional offset, in log order);
the caller may write it and truncate everything before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Mapping, TypeVar

from ..errors import ErrorCode, error_for
from ..records import TopicPartition
from .group import DEFAULT_PROTOCOL, ConsumerGroup, JoinResult, SyncResult
from .offsets import OffsetAndMetadata, OffsetStore, normalize_offsets
from .records import (GroupMetadataRecord, OffsetCommitRecord, Record, TxnMarkerRecord, TxnOffsetRecord,
                      decode_record, group_metadata_record, group_tombstone, offset_commit_record,
                      txn_marker_record, txn_offset_record)
from .state import GroupState

R = TypeVar("R")


@dataclass(frozen=True)
class CoordinatorResult(Generic[R]):
    records: tuple[Record, ...]
    response: R


@dataclass(frozen=True)
class MemberDescription:
    member_id: str
    client_id: str
    subscription: tuple[str, ...]
    assignment: tuple[TopicPartition, ...]
    session_timeout_ms: int
    rebalance_timeout_ms: int


@dataclass(frozen=True)
class GroupDescription:
    group_id: str
    state: GroupState
    generation_id: int
    protocol: str | None
    leader_id: str | None
    members: tuple[MemberDescription, ...]
    offsets: dict[TopicPartition, OffsetAndMetadata]
    pending_offsets: tuple[TopicPartition, ...]   # partitions with pending transactional offsets


@dataclass(frozen=True)
class GroupListing:
    group_id: str
    state: GroupState
    protocol: str | None


class GroupCoordinatorShard:
    def __init__(self, default_protocol: str = DEFAULT_PROTOCOL,
                 partitions_per_topic: Mapping[str, int] | None = None):
        self.default_protocol = default_protocol
        self._topic_partitions: dict[str, int] = dict(partitions_per_topic or {})
        self._groups: dict[str, ConsumerGroup] = {}
        self.offsets = OffsetStore(self._groups.get)

    # ---- metadata (soft input) ----------------------------------------------------------------
    @property
    def topic_partitions(self) -> Mapping[str, int]:
        return dict(self._topic_partitions)

    def update_topic_partitions(self, partitions_per_topic: Mapping[str, int],
                                now_ms: int) -> CoordinatorResult[list[str]]:
        """Install new partition counts (immediately: soft input) and rebalance the groups
        subscribed to a topic whose count changed (records, applied after append)."""
        old = self._topic_partitions
        new = {t: int(n) for t, n in partitions_per_topic.items()}
        changed_topics = {t for t in set(old) | set(new) if old.get(t, 0) != new.get(t, 0)}
        self._topic_partitions.clear()
        self._topic_partitions.update(new)
        records: list[Record] = []
        rebalanced = []
        for gid, g in sorted(self._groups.items()):
            if g.subscribed_topics() & changed_topics:
                scratch = self._scratch(g)
                if scratch.request_rebalance(now_ms):
                    records.append(group_metadata_record(scratch))
                    rebalanced.append(gid)
        return CoordinatorResult(tuple(records), rebalanced)

    # ---- membership handlers ------------------------------------------------------------------
    def handle_join(self, group_id: str, member_id: str | None, subscription, session_timeout_ms: int,
                    rebalance_timeout_ms: int, now_ms: int, *, client_id: str = "",
                    protocol: str | None = None) -> CoordinatorResult[JoinResult]:
        return self._group_op(group_id, lambda g: g.join(
            member_id, subscription, session_timeout_ms, rebalance_timeout_ms, now_ms,
            client_id=client_id, protocol=protocol), create=True)

    def handle_sync(self, group_id: str, member_id: str, generation: int, now_ms: int) -> CoordinatorResult[SyncResult]:
        return self._group_op(group_id, lambda g: g.sync(member_id, generation, now_ms))

    def handle_heartbeat(self, group_id: str, member_id: str, generation: int, now_ms: int) -> CoordinatorResult[None]:
        return self._group_op(group_id, lambda g: g.heartbeat(member_id, generation, now_ms))

    def handle_leave(self, group_id: str, member_id: str, now_ms: int) -> CoordinatorResult[None]:
        return self._group_op(group_id, lambda g: g.leave(member_id, now_ms))

    def handle_tick(self, now_ms: int) -> CoordinatorResult[dict[str, list[str]]]:
        """Session expiry and rebalance timeouts for every group; response: removed members per group."""
        records: list[Record] = []
        removed: dict[str, list[str]] = {}
        for gid, g in sorted(self._groups.items()):
            scratch = self._scratch(g)
            gone = scratch.tick(now_ms)
            if scratch.to_dict(include_soft=False) != g.to_dict(include_soft=False):
                records.append(group_metadata_record(scratch))
            if gone:
                removed[gid] = gone
        return CoordinatorResult(tuple(records), removed)

    def handle_delete_group(self, group_id: str) -> CoordinatorResult[None]:
        """Delete an empty group: tombstones for its offsets (committed and pending) and metadata."""
        g = self._groups.get(group_id)
        if g is not None and g.members:
            raise error_for(ErrorCode.INVALID_REQUEST, f"group {group_id!r} still has members")
        tps = set(self.offsets.committed(group_id))
        tps |= {tp for (grp, tp) in self._pending_keys() if grp == group_id}
        records = [offset_commit_record(group_id, tp, None) for tp in sorted(tps)]
        if g is not None:
            records.append(group_tombstone(group_id))
        return CoordinatorResult(tuple(records), None)

    # ---- offset handlers ----------------------------------------------------------------------
    def handle_offset_commit(self, group_id: str, generation: int, member_id: str | None, offsets: Mapping,
                             now_ms: int) -> CoordinatorResult[dict[TopicPartition, OffsetAndMetadata]]:
        values = normalize_offsets(offsets, now_ms)
        self.offsets.validate_commit(group_id, generation, member_id)
        self._touch(group_id, member_id, now_ms)
        records = tuple(offset_commit_record(group_id, tp, om) for tp, om in sorted(values.items()))
        return CoordinatorResult(records, values)

    def handle_txn_offset_commit(self, group_id: str, producer_id: int, producer_epoch: int, generation: int,
                                 member_id: str | None, offsets: Mapping,
                                 now_ms: int) -> CoordinatorResult[dict[TopicPartition, OffsetAndMetadata]]:
        """KIP-447: validated by generation + member id; pending until the producer's marker."""
        values = normalize_offsets(offsets, now_ms)
        self.offsets.validate_txn_offsets(group_id, producer_id, producer_epoch, generation, member_id)
        self._touch(group_id, member_id, now_ms)
        records = tuple(txn_offset_record(producer_id, producer_epoch, group_id, tp, om)
                        for tp, om in sorted(values.items()))
        return CoordinatorResult(records, values)

    def handle_txn_marker(self, producer_id: int, producer_epoch: int, commit: bool) -> CoordinatorResult[list]:
        """WriteTxnMarkers for this partition: commit publishes, abort drops the pending offsets.
        Always logged (replaying a marker with nothing pending is a no-op), so retries are safe."""
        touched = sorted(self.offsets.pending_offsets(producer_id))
        return CoordinatorResult((txn_marker_record(producer_id, producer_epoch, commit),), touched)

    def handle_reset_offsets(self, group_id: str, offsets: Mapping, now_ms: int) -> CoordinatorResult[dict]:
        """Admin reset (AlterConsumerGroupOffsets); refused while the group has live members."""
        g = self._groups.get(group_id)
        if g is not None and g.members:
            raise error_for(ErrorCode.INVALID_REQUEST,
                            f"cannot reset offsets of group {group_id!r} while it has {len(g.members)} "
                            f"live member(s); stop its consumers first")
        values = normalize_offsets(offsets, now_ms)
        self.offsets.validate_commit(group_id, -1, None)
        records = tuple(offset_commit_record(group_id, tp, om) for tp, om in sorted(values.items()))
        return CoordinatorResult(records, values)

    reset_offsets = handle_reset_offsets

    # ---- reads --------------------------------------------------------------------------------
    def fetch_offsets(self, group_id: str, tps: Iterable[TopicPartition] | None = None,
                      require_stable: bool = True) -> dict[TopicPartition, OffsetAndMetadata | None]:
        return self.offsets.fetch(group_id, tps, require_stable)

    def group(self, group_id: str) -> ConsumerGroup | None:
        """The live group (read it, never mutate it)."""
        return self._groups.get(group_id)

    def list_groups(self) -> list[GroupListing]:
        ids = set(self._groups) | set(self.offsets.groups())
        out = []
        for gid in sorted(ids):
            g = self._groups.get(gid)
            out.append(GroupListing(gid, g.state if g else GroupState.EMPTY, g.protocol if g else None))
        return out

    def describe_group(self, group_id: str) -> GroupDescription:
        g = self._groups.get(group_id)
        offsets = self.offsets.committed(group_id)
        pending = tuple(sorted(tp for (grp, tp) in self._pending_keys() if grp == group_id))
        if g is None:
            known = bool(offsets or pending)
            return GroupDescription(group_id, GroupState.EMPTY if known else GroupState.DEAD, 0, None, None, (),
                                    offsets, pending)
        members = tuple(MemberDescription(m.member_id, m.client_id, m.subscription, m.assignment,
                                          m.session_timeout_ms, m.rebalance_timeout_ms)
                        for _, m in sorted(g.members.items()))
        return GroupDescription(group_id, g.state, g.generation_id, g.protocol, g.leader_id, members,
                                offsets, pending)

    def durable_state(self) -> dict:
        """Everything records rebuild (no soft state); equal after replay of the emitted records."""
        return {
            "groups": {gid: g.to_dict(include_soft=False) for gid, g in sorted(self._groups.items())},
            "committed": {gid: self.offsets.committed(gid) for gid in self.offsets.groups()
                          if self.offsets.committed(gid)},
            "pending": {pid: self.offsets.pending_offsets(pid) for pid in self.offsets.pending_producers()},
        }

    # ---- apply / replay / snapshot ------------------------------------------------------------
    def apply(self, result: CoordinatorResult) -> None:
        """Call once the result's records are durably appended, in order."""
        for key, value in result.records:
            self.replay(key, value)

    def replay(self, key: bytes, value: bytes | None) -> None:
        rec = decode_record(key, value)
        if isinstance(rec, OffsetCommitRecord):
            self.offsets.apply_commit(rec.group, rec.tp, rec.value)
        elif isinstance(rec, TxnOffsetRecord):
            self.offsets.apply_txn_offset(rec.producer_id, rec.producer_epoch, rec.group, rec.tp, rec.value)
        elif isinstance(rec, TxnMarkerRecord):
            self.offsets.apply_txn_marker(rec.producer_id, rec.commit)
        elif isinstance(rec, GroupMetadataRecord):
            self._replay_group(rec)
        else:  # pragma: no cover - decode_record returns one of the above
            raise error_for(ErrorCode.CORRUPT_MESSAGE, f"unexpected record {rec!r}")

    def on_loaded(self, now_ms: int) -> None:
        for g in self._groups.values():
            g.on_loaded(now_ms)

    def snapshot_records(self) -> list[Record]:
        records: list[Record] = [group_metadata_record(g) for _, g in sorted(self._groups.items())]
        for _seq, kind, payload in self.offsets.entries_in_log_order():
            if kind == "committed":
                group, tp, om = payload
                records.append(offset_commit_record(group, tp, om))
            else:
                pid, epoch, group, tp, om = payload
                records.append(txn_offset_record(pid, epoch, group, tp, om))
        return records

    # ---- internals ----------------------------------------------------------------------------
    def _scratch(self, g: ConsumerGroup) -> ConsumerGroup:
        scratch = g.copy()
        scratch.topic_partitions = self._topic_partitions
        return scratch

    def _group_op(self, group_id: str, fn: Callable[[ConsumerGroup], R], create: bool = False) -> CoordinatorResult[R]:
        live = self._groups.get(group_id)
        if live is None:
            if not create:
                raise error_for(ErrorCode.UNKNOWN_MEMBER_ID, f"group {group_id!r} has no members")
            base = None
            scratch = ConsumerGroup(group_id, self.default_protocol)
            scratch.topic_partitions = self._topic_partitions
        else:
            base = live.to_dict(include_soft=False)
            scratch = self._scratch(live)
        try:
            response = fn(scratch)
        finally:
            if live is not None:  # soft state: session refreshes apply at once, even on error
                for mid, m in scratch.members.items():
                    if mid in live.members:
                        lm = live.members[mid]
                        lm.last_heartbeat_ms = max(lm.last_heartbeat_ms, m.last_heartbeat_ms)
        changed = scratch.to_dict(include_soft=False) != base
        return CoordinatorResult((group_metadata_record(scratch),) if changed else (), response)

    def _replay_group(self, rec: GroupMetadataRecord) -> None:
        old = self._groups.get(rec.group_id)
        if rec.value is None:
            self._groups.pop(rec.group_id, None)
            return
        g = ConsumerGroup.from_dict(rec.value, self.default_protocol)
        g.topic_partitions = self._topic_partitions
        if old is not None:
            for mid, m in g.members.items():
                if mid in old.members:
                    m.last_heartbeat_ms = max(m.last_heartbeat_ms, old.members[mid].last_heartbeat_ms)
        self._groups[rec.group_id] = g

    def _touch(self, group_id: str, member_id: str | None, now_ms: int) -> None:
        g = self._groups.get(group_id)
        if g is not None and member_id in g.members:
            m = g.members[member_id]
            m.last_heartbeat_ms = max(m.last_heartbeat_ms, now_ms)

    def _pending_keys(self) -> list[tuple[str, TopicPartition]]:
        return [k for pid in self.offsets.pending_producers() for k in self.offsets.pending_offsets(pid)]

"""GroupCoordinatorActor: the consumer groups and committed offsets of one `__consumer_offsets` partition.

A thin shell around the pure `GroupCoordinatorShard` (see `ray_broker/group/coordinator.py` for
the append/apply contract), built like `TxnCoordinatorActor`: the shard is loaded lazily by
replaying partition ``index`` of ``__consumer_offsets``; each request is decided by the shard, its
records are appended durably (acks=all) through an `InternalPartitionWriter` whose producer epoch is
this coordinator's epoch (so an older incarnation's appends are refused), and only then applied.
One operation runs at a time (an asyncio lock). A background tick expires sessions and completes
timed-out rebalances (`handle_tick`) and refreshes topic partition counts from the controller.

Group ``g`` lives on coordinator ``to_positive(murmur2(g.encode())) % group_coordinators``
(`group_coordinator_index`). Offsets cross the actor boundary as ``dict[TopicPartition, int]``.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray

from ..errors import (GroupIdNotFoundError, NonEmptyGroupError, NotCoordinatorError,
                      TransactionCoordinatorFencedError)
from ..group.coordinator import CoordinatorResult, GroupCoordinatorShard, GroupDescription, GroupListing
from ..group.group import JoinResult, SyncResult
from ..group.state import GroupState
from ..protocol import OFFSETS_TOPIC
from ..records import TopicPartition
from .coordinator_base import CoordinatorActorBase, _now_ms, controller_handle
from .naming import broker_actor_options

log = logging.getLogger(__name__)

TICK_S = 0.15
METADATA_REFRESH_S = 2.0


def group_coordinator_index(group_id: str, coordinators: int) -> int:
    from ..client.partitioner import murmur2, to_positive

    return to_positive(murmur2(group_id.encode())) % coordinators


def _tps(tps) -> list[TopicPartition] | None:
    return None if tps is None else [TopicPartition(str(t), int(p)) for t, p in tps]


class GroupCoordinatorActor(CoordinatorActorBase):
    KIND = "group"
    TOPIC = OFFSETS_TOPIC
    SNAPSHOT_EVERY_RECORDS = 5000

    def __init__(self, index: int, namespace: str, broker_config: dict | None = None):
        super().__init__(index, namespace, broker_config)
        self._last_metadata = 0.0
        # soft: highest transaction-coordinator epoch seen per producer id (older markers are fenced)
        self._marker_epochs: dict[int, int] = {}

    # ---- the base's hooks --------------------------------------------------------------------
    async def _build_shard(self, records, epoch: int) -> GroupCoordinatorShard:
        shard = GroupCoordinatorShard(partitions_per_topic=await self._partition_counts())
        for key, value in records:
            shard.replay(key, value)
        shard.on_loaded(_now_ms())
        self._last_metadata = time.monotonic()
        return shard

    def _after_load(self, shard: GroupCoordinatorShard, epoch: int) -> list[asyncio.Task]:
        return [asyncio.get_running_loop().create_task(self._tick_loop(epoch))]

    async def _partition_counts(self) -> dict[str, int]:
        meta = await controller_handle(self.namespace).get_metadata.remote(None)
        return {name: m.num_partitions for name, m in meta.items() if not m.internal}

    async def _refresh_metadata(self) -> None:
        counts = await self._partition_counts()
        self._last_metadata = time.monotonic()
        shard = await self._ensure_loaded()
        if dict(shard.topic_partitions) != counts:
            await self._run(lambda s: s.update_topic_partitions(counts, _now_ms()))

    async def _tick_loop(self, epoch: int) -> None:
        while self.coordinator_epoch == epoch and self.shard is not None:
            await asyncio.sleep(TICK_S)
            if self.shard is None:
                return
            try:
                if time.monotonic() - self._last_metadata > METADATA_REFRESH_S:
                    await self._refresh_metadata()
                r = await self._run(lambda s: s.handle_tick(_now_ms()))
                for gid, members in r.response.items():
                    log.info("group %s: removed members %s", gid, members)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - try again next tick
                log.info("group tick: %s", exc)

    # ---- membership --------------------------------------------------------------------------
    async def join_group(self, group_id: str, member_id: str | None, topics, session_timeout_ms: int,
                         rebalance_timeout_ms: int, protocol: str | None = None, client_id: str = "") -> JoinResult:
        shard = await self._ensure_loaded()
        topics = [topics] if isinstance(topics, str) else list(topics)
        if any(t not in shard.topic_partitions for t in topics):
            await self._refresh_metadata()   # a topic created since the last refresh
        r = await self._run(lambda s: s.handle_join(group_id, member_id or None, topics, session_timeout_ms,
                                                    rebalance_timeout_ms, _now_ms(), client_id=client_id,
                                                    protocol=protocol))
        return r.response

    async def sync_group(self, group_id: str, member_id: str, generation: int) -> SyncResult:
        return (await self._run(lambda s: s.handle_sync(group_id, member_id, generation, _now_ms()))).response

    async def heartbeat(self, group_id: str, member_id: str, generation: int) -> None:
        await self._run(lambda s: s.handle_heartbeat(group_id, member_id, generation, _now_ms()))

    async def leave_group(self, group_id: str, member_id: str) -> None:
        await self._run(lambda s: s.handle_leave(group_id, member_id, _now_ms()))

    # ---- offsets -------------------------------------------------------------------------------
    async def commit_offsets(self, group_id: str, generation: int, member_id: str | None,
                             offsets: dict) -> dict[TopicPartition, int]:
        r = await self._run(lambda s: s.handle_offset_commit(group_id, generation, member_id or None, offsets,
                                                             _now_ms()))
        return {tp: om.offset for tp, om in r.response.items()}

    async def fetch_offsets(self, group_id: str, tps=None, require_stable: bool = True) -> dict[TopicPartition, int | None]:
        """Committed offsets (None: none committed); raises the retriable UnstableOffsetCommitError
        while a requested partition has pending transactional offsets and `require_stable`."""
        shard = await self._ensure_loaded()
        got = shard.fetch_offsets(group_id, _tps(tps), require_stable)
        return {tp: (None if om is None else om.offset) for tp, om in got.items()}

    async def txn_offset_commit(self, transactional_id: str, producer_id: int, producer_epoch: int, group_id: str,
                                generation: int, member_id: str | None, offsets: dict) -> dict[TopicPartition, int]:
        """KIP-447 TxnOffsetCommit: validated by generation + member id; pending until the marker."""
        r = await self._run(lambda s: s.handle_txn_offset_commit(group_id, producer_id, producer_epoch, generation,
                                                                 member_id or None, offsets, _now_ms()))
        return {tp: om.offset for tp, om in r.response.items()}

    async def write_txn_marker(self, producer_id: int, producer_epoch: int, commit: bool,
                               coordinator_epoch: int) -> list:
        """The transaction that sent offsets ended: publish (commit) or drop (abort) the producer's
        pending offsets. Idempotent (a retried marker finds nothing pending). A marker from an older
        transaction-coordinator epoch than one already seen for this producer is fenced."""
        seen = self._marker_epochs.get(producer_id, -1)
        if coordinator_epoch < seen:
            raise TransactionCoordinatorFencedError(
                f"marker from coordinator epoch {coordinator_epoch}; epoch {seen} already seen for producer "
                f"{producer_id}")
        r = await self._run(lambda s: s.handle_txn_marker(producer_id, producer_epoch, bool(commit)))
        self._marker_epochs[producer_id] = max(seen, coordinator_epoch)
        return r.response

    # ---- admin ---------------------------------------------------------------------------------
    async def list_groups(self) -> list[GroupListing]:
        return (await self._ensure_loaded()).list_groups()

    async def describe_group(self, group_id: str) -> GroupDescription:
        return (await self._ensure_loaded()).describe_group(group_id)

    async def reset_offsets(self, group_id: str, offsets: dict) -> dict[TopicPartition, int]:
        """Admin offset reset (AlterConsumerGroupOffsets); NonEmptyGroupError while members are live."""
        shard = await self._ensure_loaded()
        self._check_empty(shard, group_id)
        r = await self._run(lambda s: (self._check_empty(s, group_id), s.handle_reset_offsets(
            group_id, offsets, _now_ms()))[1])
        return {tp: om.offset for tp, om in r.response.items()}

    async def delete_group(self, group_id: str) -> None:
        """Delete an empty group and its offsets; NonEmptyGroupError / GroupIdNotFoundError."""
        shard = await self._ensure_loaded()
        if shard.describe_group(group_id).state is GroupState.DEAD:
            raise GroupIdNotFoundError(f"unknown consumer group {group_id!r}")
        await self._run(lambda s: (self._check_empty(s, group_id), s.handle_delete_group(group_id))[1])

    @staticmethod
    def _check_empty(shard: GroupCoordinatorShard, group_id: str) -> None:
        g = shard.group(group_id)
        if g is not None and g.members:
            raise NonEmptyGroupError(
                f"group {group_id!r} has {len(g.members)} live member(s) ({', '.join(sorted(g.members))}); "
                f"stop its consumers first")

    async def ping(self) -> dict:
        shard = await self._ensure_loaded()
        return {"index": self.index, "coordinator_epoch": self.coordinator_epoch,
                "groups": len(shard.list_groups())}


def group_coordinator_options(name: str, namespace: str) -> dict:
    return broker_actor_options(name, namespace)


GroupCoordinator = ray.remote(GroupCoordinatorActor)

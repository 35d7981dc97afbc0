"""What both coordinator actors share: a log in one internal partition, loaded lazily, and
operations run as decide -> append -> apply.

Operations on the same key (a transactional id; for coordinators whose shard does not track
pending state per key, everything) run one at a time. Operations on different keys run
concurrently and their appends are group-committed (`GroupCommit`): one replicated append carries
what all of them decided while the previous append was in flight.

`InternalPartitionWriter` appends to and reads one partition of `__transaction_state` or
`__consumer_offsets` as an idempotent producer whose epoch is the coordinator epoch, so an older
incarnation's appends are refused. `CoordinatorActorBase` is the actor skeleton: subclasses name
their log (`KIND`, `TOPIC`), build the pure shard from the replayed records (`_build_shard`), start
their background work (`_after_load`) and say how a result is applied or dropped.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import pyarrow as pa
import ray

from ..client.metadata_cache import ACTOR_GONE
from ..config import BrokerConfig
from ..errors import (BrokerError, CoordinatorLoadInProgressError, InvalidProducerEpochError, NotCoordinatorError,
                      UnknownProducerIdError)
from ..protocol import CONTROLLER_NAME, READ_UNCOMMITTED, replica_actor_name
from ..records import HEADERS_TYPE, TIMESTAMP_TYPE, stored_schema
from ..testing import failpoints
from .group_commit import GroupCommit

log = logging.getLogger(__name__)

APPEND_RETRY_S = 15.0


def _now_ms() -> int:
    return int(time.time() * 1000)


def controller_handle(namespace: str):
    """The controller, looked up by name at each use: a recreated controller is a new actor."""
    return ray.get_actor(CONTROLLER_NAME, namespace=namespace)


def records_batch(records) -> pa.RecordBatch:
    n = len(records)
    return pa.RecordBatch.from_arrays([
        pa.array([_now_ms()] * n, pa.int64()).cast(TIMESTAMP_TYPE),
        pa.array([k for k, _ in records], pa.binary()),
        pa.array([v for _, v in records], pa.binary()),
        pa.nulls(n, HEADERS_TYPE)], schema=stored_schema(None))


class InternalPartitionWriter:
    """Appends to and reads one internal partition as an idempotent producer (shared by coordinators)."""

    def __init__(self, namespace: str, topic: str, partition: int, producer_id: int, producer_epoch: int):
        self.namespace, self.topic, self.partition = namespace, topic, partition
        self.producer_id, self.producer_epoch = producer_id, producer_epoch
        self.sequence = 0
        self._leader = None

    async def leader(self, refresh: bool = False):
        if self._leader is None or refresh:
            meta = (await controller_handle(self.namespace).get_metadata.remote([self.topic]))[self.topic]
            leader = meta.partitions[self.partition].leader
            if leader is None:
                raise CoordinatorLoadInProgressError(f"{self.topic}/{self.partition} has no leader right now")
            self._leader = ray.get_actor(replica_actor_name(self.topic, self.partition, leader),
                                         namespace=self.namespace)
        return self._leader

    async def append(self, records) -> int:
        """Append durably; retried with the same sequence (deduplicated) until it succeeds."""
        batch = records_batch(records)
        deadline = time.monotonic() + APPEND_RETRY_S
        refresh = False
        while True:
            try:
                leader = await self.leader(refresh)
                result = await leader.produce.remote(batch, -1, 10_000, self.producer_id, self.producer_epoch,
                                                     self.sequence, False, None)
                self.sequence = (self.sequence + len(records)) % (2**31 - 1)
                return result.base_offset
            except (InvalidProducerEpochError, UnknownProducerIdError) as exc:
                raise NotCoordinatorError(f"coordinator fenced on {self.topic}/{self.partition}: {exc}") from None
            # ACTOR_GONE includes a handle to a replica pinned to a removed node (re-created elsewhere)
            except (BrokerError, *ACTOR_GONE, ValueError) as exc:
                if isinstance(exc, BrokerError) and not exc.retriable:
                    raise
                if time.monotonic() > deadline:
                    raise NotCoordinatorError(f"appending to {self.topic}/{self.partition} failed: {exc}") from None
                refresh = True
                await asyncio.sleep(0.1)

    async def read_all(self) -> list[tuple[bytes, bytes | None]]:
        deadline = time.monotonic() + 60
        while True:
            try:
                leader = await self.leader(refresh=True)
                offset = await leader.list_offset.remote("earliest", READ_UNCOMMITTED)
                end = await leader.list_offset.remote("latest", READ_UNCOMMITTED)
                out = []
                while offset < end:
                    res = await leader.fetch.remote(offset, 8 << 20, READ_UNCOMMITTED, 0)
                    for b in res.batches:
                        out.extend(zip(b.column("key").to_pylist(), b.column("value").to_pylist()))
                    if res.next_offset <= offset:
                        break
                    offset = res.next_offset
                return out
            except (BrokerError, *ACTOR_GONE, ValueError) as exc:
                if time.monotonic() > deadline:
                    raise CoordinatorLoadInProgressError(f"cannot read {self.topic}/{self.partition}: {exc}") from None
                await asyncio.sleep(0.2)

    async def delete_records_before(self, offset: int, replicas: int) -> None:
        for r in range(replicas):
            try:
                h = ray.get_actor(replica_actor_name(self.topic, self.partition, r), namespace=self.namespace)
                await h.delete_records.remote(offset)
            except Exception:  # noqa: BLE001 - a replica that misses it keeps a longer log; harmless
                pass


class CoordinatorActorBase:
    """Skeleton of a coordinator actor over one internal partition (see the module docstring)."""

    KIND = ""                    # "txn" | "group": the controller's name for this coordinator kind
    TOPIC = ""                   # its internal topic
    SNAPSHOT_EVERY_RECORDS = 2000
    # True when the shard marks what a decided-but-unapplied result touches as pending (so results
    # for different keys may be decided, appended and applied concurrently)
    CONCURRENT_KEYS = False

    def __init__(self, index: int, namespace: str, broker_config: dict | None = None):
        failpoints.hit("coordinator.start")
        self.index = index
        self.namespace = namespace
        self.config = BrokerConfig.from_dict(broker_config or {})
        self.shard = None
        self.coordinator_epoch = -1
        self.writer: InternalPartitionWriter | None = None
        self._load_lock: asyncio.Lock | None = None
        self._key_locks: dict = {}     # key -> [asyncio.Lock, users]; dropped when unused
        self._group_commit: GroupCommit | None = None
        self._background: list[asyncio.Task] = []
        self._records_since_snapshot = 0

    # ---- hooks -------------------------------------------------------------------------------
    async def _build_shard(self, records, epoch: int):
        raise NotImplementedError

    def _after_load(self, shard, epoch: int) -> list[asyncio.Task]:
        """Start background work for this incarnation; returns the tasks (cancelled on reload)."""
        return []

    def _apply(self, shard, result) -> None:
        shard.apply(result)

    def _discard(self, shard, result) -> None:
        """An append failed: undo whatever `decide` reserved in the shard."""

    def _can_snapshot(self, shard) -> bool:
        return True

    # ---- loading -----------------------------------------------------------------------------
    async def _ensure_loaded(self):
        if self.shard is not None:
            return self.shard
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if self.shard is None:
                await self._load()
        return self.shard

    async def _load(self) -> None:
        for t in self._background:
            t.cancel()
        producer_id, epoch = await controller_handle(self.namespace).coordinator_identity.remote(self.KIND, self.index)
        writer = InternalPartitionWriter(self.namespace, self.TOPIC, self.index, producer_id, epoch)
        records = await writer.read_all()
        shard = await self._build_shard(records, epoch)
        self.writer, self.coordinator_epoch, self.shard = writer, epoch, shard
        self._group_commit = GroupCommit(writer.append)
        self._records_since_snapshot = len(records)
        log.info("%s coordinator %d loaded %d records at epoch %d", self.KIND, self.index, len(records), epoch)
        self._background = self._after_load(shard, epoch)

    def _fence(self) -> None:
        """Our log writes were refused: a newer coordinator exists or the log moved. Reload lazily."""
        self.shard = None

    # ---- decide, append (group-committed), apply ---------------------------------------------
    async def _run(self, decide, key=None):
        shard = await self._ensure_loaded()
        lock_key = key if self.CONCURRENT_KEYS and key is not None else None
        entry = self._key_locks.get(lock_key)
        if entry is None:
            entry = self._key_locks[lock_key] = [asyncio.Lock(), 0]
        lock = entry[0]
        entry[1] += 1
        try:
            async with lock:
                if self.shard is not shard:
                    raise NotCoordinatorError(f"{self.KIND} coordinator reloaded; retry")
                result = decide(shard)
                try:
                    if result.records:
                        failpoints.hit("coordinator.before_append")
                        await self._group_commit.append(list(result.records))
                        self._records_since_snapshot += len(result.records)
                    if self.shard is not shard:
                        raise NotCoordinatorError(f"{self.KIND} coordinator reloaded; retry")
                    self._apply(shard, result)
                except NotCoordinatorError:
                    self._discard(shard, result)
                    self._fence()
                    raise
                except BaseException:
                    self._discard(shard, result)
                    raise
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._key_locks.pop(lock_key, None)
        await self._maybe_snapshot(shard)
        return result

    async def _maybe_snapshot(self, shard) -> None:
        """Keep the internal topic bounded: append a full snapshot, then drop what lies before it.
        Taken only between operations (nothing decided and unapplied), so it reflects the log."""
        if self._records_since_snapshot < self.SNAPSHOT_EVERY_RECORDS or not self._can_snapshot(shard):
            return
        if self.shard is not shard or self._key_locks:
            return
        records = shard.snapshot_records()
        self._records_since_snapshot = 0
        start = await self._group_commit.append(records) if records else None
        self._records_since_snapshot = len(records)
        if start is not None:
            await self.writer.delete_records_before(start, replicas=3)

    # ---- liveness ----------------------------------------------------------------------------
    async def liveness(self) -> int:
        """Liveness only (never waits on loading): the controller replaces a coordinator that stops
        answering. Returns the process id."""
        return os.getpid()

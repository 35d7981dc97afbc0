"""TxnCoordinatorActor: the transaction coordinator for one `__transaction_state` partition.

A thin shell around the pure `TxnCoordinatorShard`: each request is decided by the shard, its
records are appended durably (acks=all) to the internal partition, and only then applied; then
markers are written to the transaction's partitions and the completion is logged. The actor
writes its log as an idempotent producer whose epoch is its coordinator epoch, so an older
incarnation's appends are refused by the partition, and its markers carry the same epoch, so
partitions refuse markers from an older coordinator. Recovery is construction: read the
partition, replay it, resend the markers of every transaction that was decided but not completed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import pyarrow as pa
import ray
from ray.exceptions import RayActorError

from ..config import BrokerConfig
from ..errors import (BrokerError, CoordinatorLoadInProgressError, InvalidProducerEpochError, NotCoordinatorError,
                      UnknownProducerIdError)
from ..protocol import (CONTROLLER_NAME, OFFSETS_TOPIC, READ_UNCOMMITTED, TXN_STATE_TOPIC, group_coordinator_name,
                        replica_actor_name)
from ..records import HEADERS_TYPE, TIMESTAMP_TYPE, stored_schema
from ..testing import failpoints
from ..txn.coordinator import CoordinatorResult, MarkerPlan, TxnCoordinatorShard

log = logging.getLogger(__name__)

APPEND_RETRY_S = 15.0
TIMEOUT_SCAN_S = 1.0
SNAPSHOT_EVERY_RECORDS = 2000


def _now_ms() -> int:
    return int(time.time() * 1000)


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
            controller = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
            meta = (await controller.get_metadata.remote([self.topic]))[self.topic]
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
            except (BrokerError, RayActorError, ValueError) as exc:
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
            except (BrokerError, RayActorError, ValueError) as exc:
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


class TxnCoordinatorActor:
    def __init__(self, index: int, namespace: str, broker_config: dict | None = None):
        self.index = index
        self.namespace = namespace
        self.config = BrokerConfig.from_dict(broker_config or {})
        self.shard: TxnCoordinatorShard | None = None
        self.coordinator_epoch = -1
        self.writer: InternalPartitionWriter | None = None
        self._load_lock: asyncio.Lock | None = None
        self._op_lock: asyncio.Lock | None = None
        self._marker_tasks: dict[str, asyncio.Task] = {}
        self._background: list[asyncio.Task] = []
        self._records_since_snapshot = 0

    # ---- loading ---------------------------------------------------------------------------------
    async def _ensure_loaded(self) -> TxnCoordinatorShard:
        if self.shard is not None:
            return self.shard
        if self._load_lock is None:
            self._load_lock, self._op_lock = asyncio.Lock(), asyncio.Lock()
        async with self._load_lock:
            if self.shard is None:
                await self._load()
        return self.shard

    async def _load(self) -> None:
        for t in self._background:
            t.cancel()
        controller = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
        producer_id, epoch = await controller.coordinator_identity.remote("txn", self.index)
        writer = InternalPartitionWriter(self.namespace, TXN_STATE_TOPIC, self.index, producer_id, epoch)
        records = await writer.read_all()

        def allocate(count: int) -> int:
            # by name at each use: a controller recreated since the load is a different actor
            return ray.get(ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
                           .allocate_producer_ids.remote(count))

        shard = TxnCoordinatorShard.load(records, epoch, self.config.transaction_max_timeout_ms, allocate)
        self.writer, self.coordinator_epoch, self.shard = writer, epoch, shard
        self._records_since_snapshot = len(records)
        log.info("txn coordinator %d loaded %d records at epoch %d", self.index, len(records), epoch)
        loop = asyncio.get_running_loop()
        for plan in shard.pending_markers():
            self._spawn_markers(plan)
        self._background = [loop.create_task(self._expire_loop(epoch))]

    def _fence(self) -> None:
        """Our log writes were refused: a newer coordinator exists or the log moved. Reload lazily."""
        self.shard = None

    # ---- one operation at a time: decide, append, apply ------------------------------------------
    async def _run(self, decide) -> CoordinatorResult:
        shard = await self._ensure_loaded()
        async with self._op_lock:
            if self.shard is not shard:
                raise NotCoordinatorError("transaction coordinator reloaded; retry")
            result = decide(shard)
            try:
                if result.records:
                    await self.writer.append(list(result.records))
                    self._records_since_snapshot += len(result.records)
                shard.apply(result, self.coordinator_epoch)
            except NotCoordinatorError:
                shard.discard(result)
                self._fence()
                raise
            except BaseException:
                shard.discard(result)
                raise
            await self._maybe_snapshot(shard)
        failpoints.hit("txn.before_markers")
        for plan in result.markers:
            self._spawn_markers(plan)
        return result

    async def _maybe_snapshot(self, shard: TxnCoordinatorShard) -> None:
        """Keep `__transaction_state` bounded: append a full snapshot, then drop what lies before it."""
        if self._records_since_snapshot < SNAPSHOT_EVERY_RECORDS or shard.has_pending():
            return
        records = shard.snapshot_records()
        start = await self.writer.append(records) if records else None
        self._records_since_snapshot = len(records)
        if start is not None:
            await self.writer.delete_records_before(start, replicas=3)

    # ---- markers -----------------------------------------------------------------------------
    def _spawn_markers(self, plan: MarkerPlan) -> None:
        task = self._marker_tasks.get(plan.transactional_id)
        if task is not None and not task.done():
            return
        self._marker_tasks[plan.transactional_id] = asyncio.get_running_loop().create_task(self._write_markers(plan))

    async def _write_markers(self, plan: MarkerPlan) -> None:
        """Write the plan's marker to every partition (retrying forever), then log completion."""
        epoch = plan.coordinator_epoch
        marker = [(plan.producer_id, plan.producer_epoch, plan.commit, plan.coordinator_epoch)]

        async def one(topic: str, partition: int, first: bool) -> None:
            backoff = 0.05
            while self.coordinator_epoch == epoch:
                try:
                    if topic == OFFSETS_TOPIC:
                        # offsets sent in the transaction: their group coordinator ends them
                        gc = ray.get_actor(group_coordinator_name(partition), namespace=self.namespace)
                        await gc.write_txn_marker.remote(*marker[0])
                        return
                    controller = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
                    meta = (await controller.get_metadata.remote([topic]))[topic]
                    leader = meta.partitions[partition].leader
                    if leader is not None:
                        h = ray.get_actor(replica_actor_name(topic, partition, leader), namespace=self.namespace)
                        await h.write_txn_markers.remote(marker)
                        if first:
                            failpoints.hit("txn.after_first_marker")
                        return
                except BrokerError as exc:
                    if exc.code.name == "TRANSACTION_COORDINATOR_FENCED":
                        self._fence()
                        return
                    if exc.code.name == "UNKNOWN_TOPIC_OR_PARTITION":
                        return      # the topic was deleted: nothing left to mark
                except (RayActorError, ValueError):
                    pass
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

        parts = sorted(plan.partitions)
        if parts:
            await one(*parts[0], True)
            await asyncio.gather(*(one(t, p, False) for t, p in parts[1:]))
        if self.coordinator_epoch != epoch or self.shard is None:
            return
        failpoints.hit("txn.before_complete")
        while self.coordinator_epoch == epoch and self.shard is not None:
            try:
                await self._run(lambda s: s.complete_markers(plan.transactional_id, _now_ms(), plan=plan))
                return
            except NotCoordinatorError:
                return
            except BrokerError as exc:
                if not exc.retriable:
                    log.warning("completing %s failed: %s", plan.transactional_id, exc)
                    return
                await asyncio.sleep(0.1)

    async def _expire_loop(self, epoch: int) -> None:
        while self.coordinator_epoch == epoch and self.shard is not None:
            await asyncio.sleep(TIMEOUT_SCAN_S)
            shard = self.shard
            if shard is None:
                return
            try:
                for result in shard.expire_timed_out_transactions(_now_ms()):
                    # each result was prepared against the shard; run them one at a time
                    await self._run(lambda s, r=result: r)
                expired = shard.expire_transactional_ids(_now_ms(), self.config.transactional_id_expiration_ms)
                if expired.records:
                    await self._run(lambda s, r=expired: r)
                else:
                    shard.discard(expired)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - try again next tick
                log.info("timeout scan: %s", exc)

    # ---- API -----------------------------------------------------------------------------------
    async def liveness(self) -> int:
        """Liveness only (never waits on loading): the controller replaces a coordinator that stops
        answering. Returns the process id."""
        return os.getpid()

    async def ping(self) -> dict:
        shard = await self._ensure_loaded()
        return {"index": self.index, "coordinator_epoch": self.coordinator_epoch,
                "transactions": len(shard.list_transactions())}

    async def init_producer_id(self, transactional_id: str, txn_timeout_ms: int) -> tuple[int, int]:
        r = await self._run(lambda s: s.handle_init_producer_id(transactional_id, txn_timeout_ms, _now_ms()))
        resp = r.reply()
        return resp.producer_id, resp.producer_epoch

    async def add_partitions_from_leader(self, transactional_id: str, producer_id: int, producer_epoch: int,
                                         partitions: list) -> None:
        r = await self._run(lambda s: s.handle_add_partitions(transactional_id, producer_id, producer_epoch,
                                                             [tuple(p) for p in partitions], _now_ms()))
        r.reply()

    async def add_offsets(self, transactional_id: str, producer_id: int, producer_epoch: int, group_id: str,
                          offsets_partition: tuple | None = None) -> None:
        from ..protocol import OFFSETS_TOPIC

        part = tuple(offsets_partition) if offsets_partition else (OFFSETS_TOPIC, 0)
        r = await self._run(lambda s: s.handle_add_offsets(transactional_id, producer_id, producer_epoch, group_id,
                                                          part, _now_ms()))
        r.reply()

    async def end_txn(self, transactional_id: str, producer_id: int, producer_epoch: int,
                      commit: bool) -> tuple[int, int]:
        r = await self._run(lambda s: s.handle_end_txn(transactional_id, producer_id, producer_epoch, commit,
                                                      _now_ms()))
        resp = r.reply()
        return resp.producer_id, resp.producer_epoch

    async def list_transactions(self) -> list:
        return (await self._ensure_loaded()).list_transactions()

    async def describe_transaction(self, transactional_id: str):
        return (await self._ensure_loaded()).describe_transaction(transactional_id)

    async def abort_transaction(self, transactional_id: str) -> None:
        r = await self._run(lambda s: s.abort_transaction(transactional_id, _now_ms()))
        r.reply()

    def arm_failpoint(self, name: str, action: str, arg=None, count: int = 1, skip: int = 0) -> None:
        failpoints.arm(name, action, arg, count, skip)


def txn_coordinator_options(name: str, namespace: str) -> dict:
    return {"name": name, "namespace": namespace, "lifetime": "detached", "max_restarts": -1,
            "max_task_retries": 0, "num_cpus": 0, "max_concurrency": 1000}


TxnCoordinator = ray.remote(TxnCoordinatorActor)

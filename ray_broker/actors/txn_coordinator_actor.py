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

import ray

from ..errors import BrokerError, ConcurrentTransactionsError, NotCoordinatorError
from ..protocol import (CONTROLLER_NAME, OFFSETS_TOPIC, TXN_STATE_TOPIC, group_coordinator_name,
                        replica_actor_name)
from ..testing import failpoints
from ..txn.coordinator import CoordinatorResult, MarkerPlan, TxnCoordinatorShard
from ..txn.marker_writer import MarkersFenced, MarkerWriter
from .coordinator_base import (CoordinatorActorBase, InternalPartitionWriter, _now_ms, controller_handle,
                               records_batch)
from .naming import NamedActors, broker_actor_options

__all__ = ["TxnCoordinatorActor", "TxnCoordinator", "txn_coordinator_options", "InternalPartitionWriter",
           "records_batch"]

log = logging.getLogger(__name__)

TIMEOUT_SCAN_S = 1.0
COMPLETION_WAIT_S = 5.0     # how long an add waits for the previous transaction's markers


class TxnCoordinatorActor(CoordinatorActorBase):
    KIND = "txn"
    TOPIC = TXN_STATE_TOPIC
    CONCURRENT_KEYS = True       # the shard marks touched transactional ids pending

    def __init__(self, index: int, namespace: str, broker_config: dict | None = None):
        super().__init__(index, namespace, broker_config)
        self._marker_tasks: dict[str, asyncio.Task] = {}
        self._named = NamedActors(namespace)     # partition leaders, group coordinators, the controller
        self._marker_metadata: dict = {}         # topic -> metadata, shared by all marker writes
        self._marker_writers: dict[str, MarkerWriter] = {}    # transactional_id -> writing its markers
        # (transactional_id, producer_id, epoch) -> (partitions, future): adds from several
        # leaders of one transaction waiting behind each other become one decision and one append
        self._adds_waiting: dict[tuple, tuple[set, asyncio.Future]] = {}

    # ---- the base's hooks --------------------------------------------------------------------
    async def _build_shard(self, records, epoch: int) -> TxnCoordinatorShard:
        def allocate(count: int) -> int:      # rare fallback (see init_producer_id)
            return ray.get(controller_handle(self.namespace).allocate_producer_ids.remote(count), timeout=30)

        return TxnCoordinatorShard.load(records, epoch, self.config.transaction_max_timeout_ms, allocate)

    def _after_load(self, shard: TxnCoordinatorShard, epoch: int) -> list[asyncio.Task]:
        for plan in shard.pending_markers():       # decided before the crash: finish them
            self._spawn_markers(plan)
        return [asyncio.get_running_loop().create_task(self._expire_loop(epoch))]

    def _apply(self, shard: TxnCoordinatorShard, result: CoordinatorResult) -> None:
        shard.apply(result, self.coordinator_epoch)

    def _discard(self, shard: TxnCoordinatorShard, result: CoordinatorResult) -> None:
        shard.discard(result)

    def _can_snapshot(self, shard: TxnCoordinatorShard) -> bool:
        return not shard.has_pending()

    async def _run(self, decide, key=None) -> CoordinatorResult:
        result = await super()._run(decide, key)
        failpoints.hit("txn.before_markers")
        for plan in result.markers:
            self._spawn_markers(plan)
        return result

    # ---- markers -----------------------------------------------------------------------------
    def _spawn_markers(self, plan: MarkerPlan) -> None:
        task = self._marker_tasks.get(plan.transactional_id)
        if task is not None and not task.done():
            return
        self._marker_tasks[plan.transactional_id] = asyncio.get_running_loop().create_task(self._write_markers(plan))

    async def _write_markers(self, plan: MarkerPlan) -> None:
        """Write the plan's marker to every partition (retrying until done), then log completion."""
        epoch = plan.coordinator_epoch
        marker = (plan.producer_id, plan.producer_epoch, plan.commit, plan.coordinator_epoch)

        named = self._named

        async def fetch_metadata(topics):
            return await named.call(CONTROLLER_NAME, "get_metadata", topics)

        async def write_marker(topic, partition, leader):
            await named.call(replica_actor_name(topic, partition, leader), "write_txn_markers", [marker])

        async def write_offsets_marker(partition):
            # offsets sent in the transaction: their group coordinator ends them
            await named.call(group_coordinator_name(partition), "write_txn_marker", *marker)

        writer = self._marker_writers[plan.transactional_id] = MarkerWriter(
            offsets_topic=OFFSETS_TOPIC, fetch_metadata=fetch_metadata, write_marker=write_marker,
            write_offsets_marker=write_offsets_marker, still_current=lambda: self.coordinator_epoch == epoch,
            metadata_cache=self._marker_metadata)
        try:
            # the first partition done hits the failpoint; the next transaction of this id waits
            # for all of them
            await writer.write_all(plan.partitions, lambda: failpoints.hit("txn.after_first_marker"))
        except MarkersFenced:
            self._fence()
            return
        finally:
            if self._marker_writers.get(plan.transactional_id) is writer:
                del self._marker_writers[plan.transactional_id]
        if self.coordinator_epoch != epoch or self.shard is None:
            return
        failpoints.hit("txn.before_complete")
        tid = plan.transactional_id
        while self.coordinator_epoch == epoch and self.shard is not None:
            claimed: list[asyncio.Future] = []

            def decide(s):
                # the producer's next transaction waiting to add partitions: complete and add in
                # one transition and one append (they would otherwise be two loaded appends in a row)
                key = next((k for k in self._adds_waiting if k[0] == tid), None)
                if key is None:
                    return s.complete_markers(tid, _now_ms(), plan=plan)
                parts, fut = self._adds_waiting[key]
                r = s.complete_markers(tid, _now_ms(), plan=plan, add=(key[1], key[2], sorted(parts)))
                if r.response:
                    del self._adds_waiting[key]
                    claimed.append(fut)
                return r

            try:
                await self._run(decide, tid)
            except BaseException as exc:
                for fut in claimed:     # their leaders retry the produce, which adds again
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, BrokerError) else NotCoordinatorError(
                            f"completing {tid} failed: {exc!r}"))
                if isinstance(exc, NotCoordinatorError):
                    return
                if not isinstance(exc, BrokerError):
                    raise
                if not exc.retriable:
                    log.warning("completing %s failed: %s", tid, exc)
                    return
                await asyncio.sleep(0.1)
                continue
            for fut in claimed:
                if not fut.done():
                    fut.set_result(None)
            return

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
    async def ping(self) -> dict:
        shard = await self._ensure_loaded()
        return {"index": self.index, "coordinator_epoch": self.coordinator_epoch,
                "transactions": len(shard.list_transactions()),
                "log_appends": self._group_commit.appends if self._group_commit else 0}

    async def init_producer_id(self, transactional_id: str, txn_timeout_ms: int) -> tuple[int, int]:
        shard = await self._ensure_loaded()
        if shard.needs_producer_id_block():
            # fetched here, awaited: the shard's own fallback would block the event loop
            start = await controller_handle(self.namespace).allocate_producer_ids.remote(shard.producer_id_block_size)
            if shard.needs_producer_id_block():
                shard.offer_producer_id_block(start)
        r = await self._run(lambda s: s.handle_init_producer_id(transactional_id, txn_timeout_ms, _now_ms()),
                            transactional_id)
        resp = r.reply()
        return resp.producer_id, resp.producer_epoch

    async def _wait_for_markers(self, transactional_id: str, timeout: float = COMPLETION_WAIT_S) -> bool:
        """Wait (bounded) for the previous transaction of this id to finish its markers; False if
        there was nothing to wait for."""
        task = self._marker_tasks.get(transactional_id)
        if task is None or task.done() or timeout <= 0:
            return False
        await asyncio.wait([task], timeout=timeout)
        return True

    async def _after_completion(self, transactional_id: str, run) -> None:
        """Run `run` (-> CoordinatorResult) and reply; while the previous transaction of this id is
        still writing its markers (CONCURRENT_TRANSACTIONS), wait for them here rather than sending
        the retriable error back (a producer that starts its next transaction right after a commit
        would otherwise pay a retry backoff per transaction)."""
        deadline = asyncio.get_running_loop().time() + COMPLETION_WAIT_S
        while True:
            try:
                return (await run()).reply()
            except ConcurrentTransactionsError:
                if not await self._wait_for_markers(transactional_id, deadline - asyncio.get_running_loop().time()):
                    raise

    async def add_partitions_from_leader(self, transactional_id: str, producer_id: int, producer_epoch: int,
                                         partitions: list) -> None:
        key = (transactional_id, producer_id, producer_epoch)
        parts = {tuple(p) for p in partitions}
        waiting = self._adds_waiting.get(key)
        if waiting is not None:
            waiting[0].update(parts)
            return await asyncio.shield(waiting[1])
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())   # joiners are optional
        entry = self._adds_waiting[key] = (parts, fut)
        # adds arriving while the previous transaction's markers are written wait as one group; its
        # completion takes them along when it can (_write_markers), else they are decided here
        await self._wait_for_markers(transactional_id)
        if fut.done():
            return fut.result()

        def decide(s):
            if self._adds_waiting.get(key) is entry:
                del self._adds_waiting[key]        # later arrivals start the next group
            return s.handle_add_partitions(transactional_id, producer_id, producer_epoch, sorted(entry[0]),
                                           _now_ms())

        try:
            await self._after_completion(transactional_id, lambda: self._run(decide, transactional_id))
        except BaseException as exc:
            if self._adds_waiting.get(key) is entry:
                del self._adds_waiting[key]
            if not fut.done():
                fut.set_exception(exc)
            raise
        if not fut.done():      # (a completion may have taken this group along meanwhile)
            fut.set_result(None)

    async def add_partitions(self, transactional_id: str, producer_id: int, producer_epoch: int,
                             partitions: list) -> None:
        """The producer's AddPartitionsToTxn, sent once it knows partitions of its open transaction
        (ahead of its produce calls, all partitions in one call). The leaders' own adds stay the
        check before a write; they then find their partition added, or join this group."""
        return await self.add_partitions_from_leader(transactional_id, producer_id, producer_epoch, partitions)

    async def add_offsets(self, transactional_id: str, producer_id: int, producer_epoch: int, group_id: str,
                          offsets_partition: tuple | None = None) -> None:
        from ..protocol import OFFSETS_TOPIC

        part = tuple(offsets_partition) if offsets_partition else (OFFSETS_TOPIC, 0)
        await self._after_completion(transactional_id, lambda: self._run(
            lambda s: s.handle_add_offsets(transactional_id, producer_id, producer_epoch, group_id, part, _now_ms()),
            transactional_id))

    async def end_txn(self, transactional_id: str, producer_id: int, producer_epoch: int,
                      commit: bool) -> tuple[int, int]:
        r = await self._run(lambda s: s.handle_end_txn(transactional_id, producer_id, producer_epoch, commit,
                                                      _now_ms()), transactional_id)
        resp = r.reply()
        return resp.producer_id, resp.producer_epoch

    def pending_markers(self) -> dict:
        """{transactional_id: {(topic, partition): state}} of marker writes not yet done."""
        return {t: dict(w.progress) for t, w in self._marker_writers.items() if w.progress}

    async def list_transactions(self) -> list:
        return (await self._ensure_loaded()).list_transactions()

    async def describe_transaction(self, transactional_id: str):
        return (await self._ensure_loaded()).describe_transaction(transactional_id)

    async def abort_transaction(self, transactional_id: str) -> None:
        r = await self._run(lambda s: s.abort_transaction(transactional_id, _now_ms()), transactional_id)
        r.reply()

    def arm_failpoint(self, name: str, action: str, arg=None, count: int = 1, skip: int = 0) -> None:
        failpoints.arm(name, action, arg, count, skip)


def txn_coordinator_options(name: str, namespace: str) -> dict:
    return broker_actor_options(name, namespace)


TxnCoordinator = ray.remote(TxnCoordinatorActor)

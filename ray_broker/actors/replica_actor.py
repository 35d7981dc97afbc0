"""PartitionReplicaActor: one replica of one partition, wrapping a PartitionLog.

The leader appends produce batches, pushes the exact frame bytes to its followers (one pump task
per follower, so many produce calls coalesce into few replication calls), advances the high
watermark from follower acknowledgements and answers fetches up to it. Followers append what the
leader pushes after truncating any divergent suffix by leader epoch. Who leads, at which epoch and
with which ISR is decided only by the controller (fenced by controller epoch); every mutating
method is fenced by leader epoch or offsets so that a retried or duplicated call is harmless.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid

import ray
from ray.exceptions import RayActorError

from ..config import BrokerConfig, TopicConfig
from ..errors import (BrokerError, BrokerTimeoutError, CorruptRecordError, FencedLeaderEpochError,
                      InvalidRequestError, NotEnoughReplicasAfterAppendError, NotEnoughReplicasError,
                      NotLeaderOrFollowerError, OffsetNotAvailableError, OffsetOutOfRangeError,
                      ReplicaOfflineError, StaleControllerEpochError, UnknownLeaderEpochError)
from ..metrics.counters import ReplicaCounters
from ..protocol import (ACKS_ALL, READ_COMMITTED, FetchResult, ProduceResult, replica_actor_name,
                        txn_coordinator_name)
from ..records import conform_batch, from_wire, read_schema, schema_from_bytes, stored_schema
from ..replication.divergence import truncation_offset
from ..replication.isr import LeaderReplicationState
from ..storage import PartitionLog
from ..storage.frame import decode_payload, iter_frames
from ..storage.producer_state import ProducerStateManager, marker_batch
from ..testing import failpoints
from .deployment import ensure_controller
from .naming import NamedActors, broker_actor_options

log = logging.getLogger(__name__)

LEADER, FOLLOWER = "leader", "follower"
REPLICATION_MAX_BYTES = 8 * 1024 * 1024
PUMP_IDLE_S = 1.0             # idle heartbeat to followers
HW_PUSH_DELAY_S = 0.05        # a follower learns a new HW with the next data, or alone after this
MAINTENANCE_S = 0.5
PREDECESSOR_WAIT_S = 0.5      # how long an out-of-order idempotent batch waits for its predecessor
HW_CHECKPOINT_S = 5.0          # Kafka's replica.high.watermark.checkpoint.interval.ms
SNAPSHOT_INTERVAL_S = 10.0    # producer-state snapshot cadence (recovery replays only the tail)
SEQUENCE_WRAP = 2**31 - 1
CONTROLLER_CHECK_S = 2.0      # leaders bring back a controller that was killed


def _now_ms() -> int:
    return int(time.time() * 1000)


class PartitionReplicaActor:
    def __init__(self, topic: str, partition: int, replica_id: int, log_dir: str, topic_config: dict,
                 schema: bytes | None, namespace: str, controller_epoch: int = -1,
                 broker_config: dict | None = None, fresh: bool = True):
        self.topic, self.partition, self.replica_id = topic, partition, replica_id
        self.namespace = namespace
        broker = BrokerConfig.from_dict(broker_config or {})
        self._lag_time_max_ms = broker.replica_lag_time_max_ms
        self._producer_id_expiration_ms = broker.producer_id_expiration_ms
        self._txn_coordinators = broker.transaction_coordinators
        self.config = TopicConfig.from_dict(topic_config)
        self._set_schema(schema)
        self.log_dir = log_dir
        self.incarnation = uuid.uuid4().hex
        self.role = FOLLOWER
        self.leader_epoch = -1
        self.leader_id: int | None = None
        self.controller_epoch = controller_epoch
        self.replicas: tuple[int, ...] = ()
        # A replica that lost its log (corrupt, or a new incarnation on another node) is an empty
        # follower and not eligible for leadership until it has caught up and rejoined the ISR.
        self.rebuilding = False
        self.corruption: str | None = None
        self.log = self._open_log(fresh)
        self.high_watermark = self.log.high_watermark_checkpoint
        self._epoch_start_offset = 0        # log end when this replica last became leader
        self.producers, self._snapshot_offset = ProducerStateManager.recover(self.log)
        self._last_snapshot_check = time.monotonic()
        self.leader_state: LeaderReplicationState | None = None
        self._tasks: list[asyncio.Task] = []
        self._changed: asyncio.Condition | None = None
        self._isr_request_inflight = False
        self._named = NamedActors(namespace)      # followers (when leading), transaction coordinators
        self._last_hw_checkpoint = self.high_watermark
        self._last_hw_checkpoint_time = 0.0
        self.counters = ReplicaCounters()        # `ray-broker metrics` reads them through status()

    # ---- setup -----------------------------------------------------------------------------------
    def _set_schema(self, schema: bytes | None) -> None:
        self.schema_bytes = schema
        user = schema_from_bytes(schema)
        self.stored_schema = stored_schema(user)
        self.read_schema = read_schema(user)

    def _open_log(self, fresh: bool) -> PartitionLog:
        marker = os.path.join(self.log_dir, "replica.created")
        if not fresh and not os.path.exists(marker):
            # Recreated after its first start but its directory is gone (lost disk, new node):
            # whatever it had is lost, so it must not lead before catching up.
            self.rebuilding = True
        os.makedirs(self.log_dir, exist_ok=True)
        try:
            opened = PartitionLog(self.log_dir, self.config)
        except CorruptRecordError as exc:
            # Keep the damaged files for inspection; rebuild from the leader as an empty follower.
            aside = f"{self.log_dir}.corrupt-{int(time.time() * 1000)}"
            shutil.move(self.log_dir, aside)
            self.corruption = f"{exc} (moved to {aside})"
            self.rebuilding = True
            log.error("replica %s/%s/%s: %s", self.topic, self.partition, self.replica_id, self.corruption)
            os.makedirs(self.log_dir, exist_ok=True)
            opened = PartitionLog(self.log_dir, self.config)
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"{self.topic} {self.partition} {self.replica_id}\n")
        return opened

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        cond = self._cond()
        async with cond:
            cond.notify_all()

    async def _wait_changed(self, timeout: float) -> None:
        cond = self._cond()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _fence_controller(self, controller_epoch: int) -> None:
        if controller_epoch < self.controller_epoch:
            raise StaleControllerEpochError(
                f"controller epoch {controller_epoch} is older than {self.controller_epoch} already seen")
        self.controller_epoch = controller_epoch

    # ---- control plane (from the controller) -----------------------------------------------------
    @property
    def last_stable_offset(self) -> int:
        """Below this every transaction is decided: read_committed readers stop here."""
        first = self.producers.first_unstable_offset()
        return self.high_watermark if first is None else min(first, self.high_watermark)

    async def watch(self) -> None:
        """Never answers: the controller keeps one call outstanding to learn of this actor's death."""
        await asyncio.Event().wait()

    def ping(self) -> dict:
        st = self.leader_state
        return {
            "incarnation": self.incarnation, "role": self.role, "leader_epoch": self.leader_epoch,
            "controller_epoch": self.controller_epoch, "log_end_offset": self.log.log_end_offset,
            "log_start_offset": self.log.log_start_offset, "high_watermark": self.high_watermark,
            "last_stable_offset": self.last_stable_offset,
            "isr": list(st.isr) if st else None, "eligible": not self.rebuilding,
            "corruption": self.corruption, "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def become_leader(self, controller_epoch: int, leader_epoch: int, replicas: list[int], isr: list[int],
                            schema: bytes | None = None, topic_config: dict | None = None) -> dict:
        self._fence_controller(controller_epoch)
        if leader_epoch < self.leader_epoch:
            raise FencedLeaderEpochError(f"leader epoch {leader_epoch} < current {self.leader_epoch}")
        self._apply_topic_update(schema, topic_config)
        if self.role == LEADER and leader_epoch == self.leader_epoch and self.leader_state is not None:
            self.leader_state.set_isr(isr)       # a repeat, or an ISR change pushed by the controller
            self.leader_state.replicas = tuple(replicas)
            if self.leader_state.maybe_advance_high_watermark(self.log.log_end_offset):
                self._on_high_watermark(self.leader_state.high_watermark)
            await self._notify()
            return self.ping()
        await self._stop_tasks()
        self.role, self.leader_epoch, self.leader_id = LEADER, leader_epoch, self.replica_id
        self.replicas = tuple(replicas)
        self.rebuilding = False
        leo = self.log.log_end_offset
        self.log.assign_epoch(leader_epoch, leo)
        self._epoch_start_offset = leo
        self.high_watermark = min(self.high_watermark, leo)
        self.leader_state = LeaderReplicationState(
            self.replica_id, leader_epoch, tuple(replicas), tuple(sorted(isr)), self.config.min_insync_replicas,
            self._lag_time_max_ms, self.high_watermark, leo)
        for r in self.leader_state.followers:
            self.leader_state.followers[r].last_caught_up_ms = _now_ms()
        self.leader_state.maybe_advance_high_watermark(leo)
        self.high_watermark = self.leader_state.high_watermark
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(r, leader_epoch)) for r in replicas if r != self.replica_id]
        self._tasks.append(loop.create_task(self._maintenance(leader_epoch)))
        await self._notify()
        return self.ping()

    async def become_follower(self, controller_epoch: int, leader_epoch: int, leader_id: int | None,
                              replicas: list[int], schema: bytes | None = None,
                              topic_config: dict | None = None) -> dict:
        self._fence_controller(controller_epoch)
        if leader_epoch < self.leader_epoch:
            raise FencedLeaderEpochError(f"leader epoch {leader_epoch} < current {self.leader_epoch}")
        self._apply_topic_update(schema, topic_config)
        if self.role == LEADER:
            await self._stop_tasks()
            self.leader_state = None
        self.role, self.leader_epoch, self.leader_id = FOLLOWER, leader_epoch, leader_id
        self.replicas = tuple(replicas)
        await self._notify()     # wake produce/fetch waiters so they answer NOT_LEADER
        return self.ping()

    def update_topic(self, controller_epoch: int, schema: bytes | None, topic_config: dict | None) -> None:
        self._fence_controller(controller_epoch)
        self._apply_topic_update(schema, topic_config)

    def _apply_topic_update(self, schema: bytes | None, topic_config: dict | None) -> None:
        if schema is not None and schema != self.schema_bytes:
            self._set_schema(schema)
        if topic_config:
            self.config = TopicConfig.from_dict(topic_config)

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    async def close_for_shutdown(self) -> None:
        """Controlled shutdown (the broker is stopping; the actor is killed next): checkpoint the HW,
        snapshot producer state and close the log with its clean-shutdown mark, so the restart
        skips full segment verification and serves acknowledged records at once."""
        await self._stop_tasks()
        self.role = FOLLOWER         # refuse produce from now on
        self.leader_state = None
        self.log.checkpoint_high_watermark(self.high_watermark)
        self._maybe_snapshot_producers(force=True)
        self.log.close()

    def arm_failpoint(self, name: str, action: str, arg=None, count: int = 1, skip: int = 0) -> None:
        failpoints.arm(name, action, arg, count, skip)

    def failpoint_hits(self, name: str) -> int:
        return failpoints.hit_count(name)

    def disarm_failpoints(self) -> None:
        failpoints.disarm()

    def delete_log(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.log.delete()

    # ---- data plane (from clients) ---------------------------------------------------------------
    def _require_leader(self) -> LeaderReplicationState:
        if self.role != LEADER or self.leader_state is None:
            raise NotLeaderOrFollowerError(
                f"replica {self.replica_id} of {self.topic}/{self.partition} is not the leader "
                f"(leader {self.leader_id}, epoch {self.leader_epoch})")
        return self.leader_state

    async def produce(self, batch, acks: int = ACKS_ALL, timeout_ms: int = 30_000, producer_id: int = -1,
                      producer_epoch: int = -1, base_sequence: int = -1, is_transactional: bool = False,
                      transactional_id: str | None = None) -> ProduceResult:
        state = self._require_leader()
        self.counters.produce_requests += 1
        if acks == ACKS_ALL and len(state.isr) < self.config.min_insync_replicas:
            raise NotEnoughReplicasError(
                f"{self.topic}/{self.partition}: ISR {list(state.isr)} is smaller than "
                f"min.insync.replicas={self.config.min_insync_replicas}")
        batch = conform_batch(from_wire(batch), self.stored_schema)
        if batch.num_rows == 0:
            return ProduceResult(self.log.log_end_offset, self.log.log_start_offset)
        epoch = self.leader_epoch
        failpoints.hit("replica.before_append")
        if is_transactional:
            await self._verify_transaction(transactional_id, producer_id, producer_epoch, epoch)
        if producer_id >= 0:
            await self._await_predecessor(producer_id, producer_epoch, base_sequence)
            state = self._require_leader()
            if self.leader_epoch != epoch:
                raise NotLeaderOrFollowerError(f"{self.topic}/{self.partition}: leadership moved")
            dup = self.producers.check_append(producer_id, producer_epoch, base_sequence, batch.num_rows)
            if dup is not None:
                # a retry of an appended batch: the original offsets, once they are replicated
                await self._await_high_watermark(dup.last_offset, acks, timeout_ms, epoch)
                return ProduceResult(dup.first_offset, self.log.log_start_offset, duplicate=True)
        info = self.log.append(batch, leader_epoch=epoch, producer_id=producer_id, producer_epoch=producer_epoch,
                               base_sequence=base_sequence, is_transactional=is_transactional)
        self.producers.on_append(producer_id, producer_epoch, base_sequence, batch.num_rows, info.base_offset,
                                 _now_ms(), is_transactional)
        self.counters.on_append(batch.num_rows, info.header.frame_length)
        failpoints.hit("replica.after_append")
        if state.maybe_advance_high_watermark(self.log.log_end_offset):
            self._on_high_watermark(state.high_watermark)
        await self._notify()
        await self._await_high_watermark(info.last_offset, acks, timeout_ms, epoch)
        return ProduceResult(info.base_offset, self.log.log_start_offset)

    async def _verify_transaction(self, transactional_id: str | None, producer_id: int, producer_epoch: int,
                                  epoch: int) -> None:
        """KIP-890: the first transactional write of a producer to this partition is added to its
        transaction by the leader itself, through the coordinator, so a write can only land in a
        transaction the coordinator knows (a delayed write of an ended transaction is fenced)."""
        if producer_id < 0 or not transactional_id:
            raise InvalidRequestError("a transactional batch needs a producer id and a transactional id")
        entry = self.producers.producers.get(producer_id)
        if entry is not None and entry.current_txn_first_offset >= 0 and entry.producer_epoch == producer_epoch:
            return
        from ..client.partitioner import murmur2, to_positive

        n = to_positive(murmur2(transactional_id.encode())) % self._txn_coordinators
        await self._named.call(txn_coordinator_name(n), "add_partitions_from_leader",
                               transactional_id, producer_id, producer_epoch, [(self.topic, self.partition)])
        self._require_leader()
        if self.leader_epoch != epoch:
            raise NotLeaderOrFollowerError(f"{self.topic}/{self.partition}: leadership moved")

    async def write_txn_markers(self, markers: list[tuple], timeout_ms: int = 30_000) -> list[int]:
        """Append commit/abort markers [(producer_id, producer_epoch, commit, coordinator_epoch)].

        Idempotent: a marker already written (same producer epoch or older) is not written again.
        Refused from a coordinator epoch older than one already seen for the producer. Returns once
        the markers are replicated to the ISR.
        """
        self._require_leader()
        epoch = self.leader_epoch
        offsets, last = [], -1
        for producer_id, producer_epoch, commit, coordinator_epoch in markers:
            if not self.producers.check_marker(producer_id, producer_epoch, coordinator_epoch):
                offsets.append(-1)
                # a retry of a marker written earlier (its call may have timed out waiting for
                # the ISR): answer only once that earlier write is replicated too
                last = max(last, self.log.log_end_offset - 1)
                continue
            failpoints.hit("replica.before_marker")
            info = self.log.append(marker_batch(commit, coordinator_epoch), leader_epoch=epoch,
                                   producer_id=producer_id, producer_epoch=producer_epoch, is_transactional=True,
                                   is_control=True)
            self.producers.on_marker(producer_id, producer_epoch, commit, coordinator_epoch, info.base_offset,
                                     _now_ms())
            offsets.append(info.base_offset)
            last = info.last_offset
        state = self.leader_state
        if state is not None and state.maybe_advance_high_watermark(self.log.log_end_offset):
            self._on_high_watermark(state.high_watermark)
        await self._notify()
        if last >= 0:
            await self._await_high_watermark(last, ACKS_ALL, timeout_ms, epoch)
        return offsets

    async def _await_predecessor(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        """Ray does not keep the order of concurrent calls to an async actor, so a producer's
        pipelined batches may arrive out of order; wait briefly for the predecessor to arrive."""
        deadline = time.monotonic() + PREDECESSOR_WAIT_S
        while True:
            expected = self.producers.expected_sequence(producer_id, producer_epoch)
            if expected is None:
                expected = 0     # a producer (or epoch) new to this partition starts at sequence 0
            if not 0 < (base_sequence - expected) % SEQUENCE_WRAP < 2**30:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.role != LEADER:
                return
            await self._wait_changed(remaining)

    async def _await_high_watermark(self, last_offset: int, acks: int, timeout_ms: int, epoch: int) -> None:
        if acks != ACKS_ALL:
            return
        deadline = time.monotonic() + timeout_ms / 1000.0
        while self.high_watermark <= last_offset:
            if self.role != LEADER or self.leader_epoch != epoch:
                raise NotLeaderOrFollowerError(
                    f"{self.topic}/{self.partition}: leadership moved while waiting for replication")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerTimeoutError(
                    f"{self.topic}/{self.partition}: replication to the ISR did not finish in {timeout_ms} ms")
            await self._wait_changed(min(remaining, 0.5))
        state = self.leader_state
        if state is None or len(state.isr) < self.config.min_insync_replicas:
            raise NotEnoughReplicasAfterAppendError(
                f"{self.topic}/{self.partition}: ISR shrank below min.insync.replicas after append")

    def _on_high_watermark(self, hw: int) -> None:
        self.high_watermark = hw

    async def fetch(self, offset: int, max_bytes: int, isolation_level: str = "read_committed",
                    max_wait_ms: int = 0) -> FetchResult:
        self._require_leader()
        self._check_offset(offset)
        committed = isolation_level == READ_COMMITTED
        if max_wait_ms > 0 and offset >= (self.last_stable_offset if committed else self.high_watermark):
            deadline = time.monotonic() + max_wait_ms / 1000.0
            while offset >= (self.last_stable_offset if committed else self.high_watermark) and self.role == LEADER:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._wait_changed(remaining)
            self._require_leader()
            self._check_offset(offset)
        committed = isolation_level == READ_COMMITTED
        lso = self.last_stable_offset
        bound = lso if committed else self.high_watermark
        result = FetchResult(high_watermark=self.high_watermark, last_stable_offset=lso,
                             log_start_offset=self.log.log_start_offset, next_offset=offset)
        if offset < bound:
            # aborted transactions are dropped here, whole frames at a time, so consumers get clean batches
            skip = self.producers.is_aborted if committed and self.producers.aborted else None
            batches, result.next_offset = self.log.read_batches(offset, max_bytes, max_offset=bound, skip=skip)
            result.batches = [b if b.schema.equals(self.read_schema) else conform_batch(b, self.read_schema)
                              for b in batches]
        self.counters.on_fetch(result.batches)
        return result

    def _check_offset(self, offset: int) -> None:
        if offset < self.log.log_start_offset or offset > self.log.log_end_offset:
            raise OffsetOutOfRangeError(
                f"offset {offset} is outside {self.topic}/{self.partition}'s range "
                f"[{self.log.log_start_offset}, {self.log.log_end_offset}]")

    def list_offset(self, which: str, isolation_level: str = "read_committed") -> int:
        self._require_leader()
        if which == "earliest":
            return self.log.log_start_offset
        if which == "latest":
            if self.high_watermark < self._epoch_start_offset:
                # KIP-207: a new leader learns the HW from its followers; until it reaches the start
                # of its epoch, "latest" would go backwards (readers stop early, coordinators load
                # part of their log). The caller retries.
                raise OffsetNotAvailableError(
                    f"{self.topic}/{self.partition}: leader's high watermark {self.high_watermark} is below "
                    f"its epoch start {self._epoch_start_offset}")
            return self.last_stable_offset if isolation_level == READ_COMMITTED else self.high_watermark
        raise InvalidRequestError(f"list_offset: which must be 'earliest' or 'latest', got {which!r}")

    # ---- replication: follower side --------------------------------------------------------------
    def _fence_leader(self, leader_epoch: int) -> None:
        if leader_epoch < self.leader_epoch:
            raise FencedLeaderEpochError(f"leader epoch {leader_epoch} < current {self.leader_epoch}")
        if leader_epoch > self.leader_epoch:
            if self.role == LEADER:
                raise UnknownLeaderEpochError(f"leader epoch {leader_epoch} not yet known to this (old) leader")
            # Only the controller mints epochs and each has one leader: the sender is the new leader.
            self.leader_epoch = leader_epoch
        if self.role == LEADER:
            raise NotLeaderOrFollowerError("a leader does not take replication from another replica")

    def get_log_state(self, leader_epoch: int) -> dict:
        self._fence_leader(leader_epoch)
        failpoints.hit("follower.get_log_state")
        return {"entries": self.log.epoch_entries(), "log_start_offset": self.log.log_start_offset,
                "log_end_offset": self.log.log_end_offset}

    def truncate(self, leader_epoch: int, offset: int) -> int:
        self._fence_leader(leader_epoch)
        if offset < self.log.log_end_offset:
            self.log.truncate_to(offset)
            self.high_watermark = min(self.high_watermark, self.log.log_end_offset)
            self.producers, self._snapshot_offset = ProducerStateManager.recover(self.log)
        return self.log.log_end_offset

    def reset_log(self, leader_epoch: int, start_offset: int) -> int:
        self._fence_leader(leader_epoch)
        self.log.truncate_fully_and_start_at(start_offset)
        self.high_watermark = start_offset
        self.producers, self._snapshot_offset = ProducerStateManager.recover(self.log)
        return self.log.log_end_offset

    def replicate(self, leader_epoch: int, frames, base_offset: int, leader_high_watermark: int) -> int:
        self._fence_leader(leader_epoch)
        if frames:
            if base_offset != self.log.log_end_offset:
                raise InvalidRequestError(
                    f"replicate at {base_offset} but this follower's log ends at {self.log.log_end_offset}")
            failpoints.hit("follower.before_append")
            headers = self.log.append_frames(frames)
            self.counters.on_replicate(len(frames))
            markers = ((h, decode_payload(p)) for _, h, p in iter_frames(frames, verify=False) if h.is_control)
            self.producers.on_headers(headers, markers)
        self.high_watermark = max(self.high_watermark, min(leader_high_watermark, self.log.log_end_offset))
        if self.rebuilding and self.log.log_end_offset >= leader_high_watermark:
            self.rebuilding = False
        self._maybe_checkpoint_hw()
        self._maybe_snapshot_producers()
        return self.log.log_end_offset

    # ---- replication: leader side ----------------------------------------------------------------
    def _replica_name(self, replica: int) -> str:
        return replica_actor_name(self.topic, self.partition, replica)

    async def _pump(self, follower: int, epoch: int) -> None:
        """Push the log to one follower until this leadership ends."""
        follower_leo: int | None = None
        hw_sent = -1
        backoff = 0.05
        while self.role == LEADER and self.leader_epoch == epoch:
            state = self.leader_state
            try:
                h = self._named.get(self._replica_name(follower))
                if follower_leo is None:
                    follower_leo = await self._sync_follower(h, epoch)
                    state.on_follower_ack(follower, follower_leo, self.log.log_end_offset
                                          if follower_leo >= self.log.log_end_offset else follower_leo + 1, _now_ms())
                leo = self.log.log_end_offset
                if follower_leo >= leo:
                    await self._idle_until_data(follower_leo, hw_sent, epoch)
                    if self.role != LEADER or self.leader_epoch != epoch:
                        return
                    if self.log.log_end_offset <= follower_leo:
                        if self.high_watermark > hw_sent:
                            failpoints.hit("replica.before_hw_push")
                        hw_sent = self.high_watermark
                        follower_leo = await h.replicate.remote(epoch, b"", follower_leo, hw_sent)
                        state.on_follower_ack(follower, follower_leo, self.log.log_end_offset, _now_ms())
                        self._after_ack()
                        continue
                    leo = self.log.log_end_offset
                _headers, frames = self.log.read_frames(follower_leo, REPLICATION_MAX_BYTES)
                hw_sent = self.high_watermark
                follower_leo = await h.replicate.remote(epoch, frames, follower_leo, hw_sent)
                state.on_follower_ack(follower, follower_leo, leo, _now_ms())
                self._after_ack()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (RayActorError, BrokerError, ValueError) as exc:
                # ValueError: ray.get_actor found no such actor (being recreated by the controller)
                if self.role != LEADER or self.leader_epoch != epoch:
                    return
                if isinstance(exc, (RayActorError, ValueError)):
                    self._named.forget(self._replica_name(follower))
                    state.on_follower_failed(follower)
                follower_leo = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:  # noqa: BLE001 - e.g. ActorUnschedulableError: the actor is being replaced
                log.exception("replication pump %s/%s -> %s", self.topic, self.partition, follower)
                self._named.forget(self._replica_name(follower))
                state.on_follower_failed(follower)
                follower_leo = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _idle_until_data(self, follower_leo: int, hw_sent: int, epoch: int) -> None:
        """Wait for new data for a follower that has everything. A high watermark it has not seen
        yet rides the next data push; it is sent alone only if no data comes within
        HW_PUSH_DELAY_S (pushing every HW move at once doubled the replication calls under load),
        and a heartbeat goes out after PUMP_IDLE_S of quiet."""
        loop = asyncio.get_running_loop()
        idle_by = loop.time() + PUMP_IDLE_S
        hw_by = None
        while self.role == LEADER and self.leader_epoch == epoch and self.log.log_end_offset <= follower_leo:
            now = loop.time()
            if hw_by is None and self.high_watermark > hw_sent:
                hw_by = now + HW_PUSH_DELAY_S
            due = idle_by if hw_by is None else min(idle_by, hw_by)
            if now >= due:
                return
            await self._wait_changed(due - now)

    async def _sync_follower(self, h, epoch: int) -> int:
        """Truncate the follower to the point where its log agrees with ours (by leader epoch)."""
        st = await h.get_log_state.remote(epoch)
        f_start, f_leo = st["log_start_offset"], st["log_end_offset"]
        if f_leo < self.log.log_start_offset or f_start > self.log.log_end_offset:
            return await h.reset_log.remote(epoch, self.log.log_start_offset)
        target = truncation_offset(self.log.end_offset_for_epoch, st["entries"], f_start, f_leo)
        target = min(target, self.log.log_end_offset)
        if target < f_leo:
            return await h.truncate.remote(epoch, target)
        return f_leo

    def _after_ack(self) -> None:
        state = self.leader_state
        if state is None:
            return
        if state.maybe_advance_high_watermark(self.log.log_end_offset):
            self._on_high_watermark(state.high_watermark)
            asyncio.get_running_loop().create_task(self._notify())
        self._maybe_request_isr_change()

    def _maybe_request_isr_change(self) -> None:
        state = self.leader_state
        if state is None or self._isr_request_inflight:
            return
        wanted = state.isr_change_wanted(self.log.log_end_offset, _now_ms())
        if wanted is None:
            return
        self._isr_request_inflight = True
        asyncio.get_running_loop().create_task(self._request_isr_change(state.leader_epoch, wanted))

    async def _request_isr_change(self, epoch: int, wanted: tuple[int, ...]) -> None:
        from ..protocol import CONTROLLER_NAME

        try:
            controller = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
            new_state = await controller.alter_isr.remote(self.topic, self.partition, self.replica_id, epoch,
                                                          list(wanted))
            if self.leader_state is not None and self.leader_epoch == epoch:
                self.leader_state.set_isr(new_state.isr)
                if self.leader_state.maybe_advance_high_watermark(self.log.log_end_offset):
                    self._on_high_watermark(self.leader_state.high_watermark)
                await self._notify()
        except Exception as exc:  # noqa: BLE001 - the controller may be restarting; retried next tick
            log.info("ISR change %s for %s/%s not applied: %s", wanted, self.topic, self.partition, exc)
        finally:
            self._isr_request_inflight = False

    async def _maintenance(self, epoch: int) -> None:
        """Leader housekeeping: ISR shrink by lag, flush policy, retention, HW checkpoint."""
        last_retention = last_controller_check = 0.0
        while self.role == LEADER and self.leader_epoch == epoch:
            await asyncio.sleep(MAINTENANCE_S)
            try:
                self._maybe_request_isr_change()
                now = _now_ms()
                self.log.maybe_flush(now)
                self._maybe_snapshot_producers()
                self._maybe_checkpoint_hw()
                if time.monotonic() - last_controller_check > CONTROLLER_CHECK_S:
                    last_controller_check = time.monotonic()
                    ensure_controller(self.namespace)
                if time.monotonic() - last_retention > 5.0:
                    last_retention = time.monotonic()
                    self.log.apply_retention(now, max_offset=self.high_watermark)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("maintenance %s/%s", self.topic, self.partition)

    def _maybe_checkpoint_hw(self) -> None:
        """The HW file is written (with fsyncs) at most every HW_CHECKPOINT_S, never per batch, as
        Kafka's replica.high.watermark.checkpoint.interval.ms: a stale checkpoint only means a
        restarted replica re-learns the HW from replication."""
        now = time.monotonic()
        if self.high_watermark != self._last_hw_checkpoint and now - self._last_hw_checkpoint_time >= HW_CHECKPOINT_S:
            self.log.checkpoint_high_watermark(self.high_watermark)
            self._last_hw_checkpoint = self.high_watermark
            self._last_hw_checkpoint_time = now

    def _maybe_snapshot_producers(self, force: bool = False) -> None:
        """Expire idle producer ids and snapshot producer state now and then (and on expiry)."""
        now = time.monotonic()
        if not force and now - self._last_snapshot_check < 1.0:
            return
        self._last_snapshot_check = now
        expired = self.producers.remove_expired(_now_ms(), self._producer_id_expiration_ms)
        if self.role == FOLLOWER and now - getattr(self, "_last_retention", 0.0) > 5.0:
            self._last_retention = now
            self.log.apply_retention(_now_ms(), max_offset=self.high_watermark)
        due = now - getattr(self, "_last_snapshot_time", 0.0) > SNAPSHOT_INTERVAL_S
        if expired or force or (due and self.log.log_end_offset != self._snapshot_offset):
            self.producers.prune_aborted(self.log.log_start_offset)
            self.producers.write_snapshot(self.log.directory, self.log.log_end_offset)
            self._snapshot_offset = self.log.log_end_offset
            self._last_snapshot_time = now

    def delete_records(self, before_offset: int) -> int:
        """Advance the log start (used to truncate internal topics after a snapshot). Safe on any
        replica: only offsets below the high watermark, which every in-sync replica holds, go."""
        target = min(before_offset, self.high_watermark)
        if target <= self.log.log_start_offset:
            return self.log.log_start_offset
        self.log.delete_records_before(target)
        self.producers.prune_aborted(self.log.log_start_offset)
        return self.log.log_start_offset

    def producer_state(self) -> dict:
        """Producer ids known here with epoch and last sequence, plus dedup metrics."""
        return {"producers": {pid: {"epoch": e.producer_epoch, "last_seq": e.last_seq}
                              for pid, e in self.producers.producers.items()},
                "duplicates_dropped": self.producers.duplicates_dropped,
                "out_of_order_refused": self.producers.out_of_order_refused,
                "fenced_refused": self.producers.fenced_refused,
                "snapshot_offset": self._snapshot_offset}

    def snapshot_producer_state(self) -> int:
        self._maybe_snapshot_producers(force=True)
        return self._snapshot_offset

    def status(self) -> dict:
        info = self.ping()
        info.update({"topic": self.topic, "partition": self.partition, "replica": self.replica_id,
                     "log_dir": self.log_dir, "size_bytes": self.log.size_bytes,
                     "counters": {**self.counters.as_dict(),
                                  "duplicates_dropped": self.producers.duplicates_dropped,
                                  "out_of_order_refused": self.producers.out_of_order_refused,
                                  "fenced_refused": self.producers.fenced_refused}})
        return info

    def read_all_frames(self) -> tuple[int, bytes]:
        """(log_start_offset, every frame's bytes) — for tests comparing replicas byte for byte."""
        out, offset = [], self.log.log_start_offset
        while offset < self.log.log_end_offset:
            headers, frames = self.log.read_frames(offset, REPLICATION_MAX_BYTES)
            out.append(bytes(frames))
            offset = headers[-1].next_offset
        return self.log.log_start_offset, b"".join(out)


def replica_options(name: str, namespace: str) -> dict:
    return broker_actor_options(name, namespace)


ReplicaActor = ray.remote(PartitionReplicaActor)

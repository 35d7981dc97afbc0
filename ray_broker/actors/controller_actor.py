"""ControllerActor: owns cluster metadata and keeps the replica actors in line with it.

A reconcile thread pings every replica a few times a second; it recreates replica actors that are
gone (e.g. `ray.kill`ed), elects a new leader from the ISR when a leader dies or restarts, removes
dead followers from the ISR, moves replicas off dead nodes, and pushes the decided state to each
replica stamped with the controller epoch. Every decision is persisted (atomic write) before it is
pushed, so a restarted controller, or a whole restarted cluster, carries on from the same state.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import ray
from ray.exceptions import ActorDiedError, ActorUnschedulableError, GetTimeoutError, RayActorError

from ..config import BrokerConfig
from ..controller.heartbeats import HeartbeatClock
from ..controller.state import ClusterState, TopicRecord
from ..errors import BrokerTimeoutError, SchemaMismatchError, UnknownTopicOrPartitionError
from ..protocol import (CONTROLLER_NAME, TXN_STATE_TOPIC, PartitionDescription, PartitionState, TopicDescription,
                        TopicMetadata, group_coordinator_name, replica_actor_name, txn_coordinator_name)
from ..records import check_schema_evolution, schema_from_bytes, schema_to_bytes
from ..storage import atomic_write
from .naming import alive_node_ids, broker_actor_options, pinned
from .replica_actor import ReplicaActor, replica_options

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 1.0
STARTUP_GRACE_S = 15.0
NODE_CHECK_S = 1.0
COORDINATOR_PING_S = 1.0
COORDINATOR_STARTUP_S = 60.0  # a coordinator's process start on a loaded machine (see HeartbeatClock)
SHUTDOWN_CLOSE_S = 5.0        # how long a controlled shutdown waits for replicas to close their logs
Key = tuple[str, int, int]


class ControllerActor:
    def __init__(self, data_dir: str, broker_config: dict | None = None, namespace: str = "ray_broker"):
        self.data_dir = os.path.abspath(data_dir)
        self.namespace = namespace
        self.config = BrokerConfig.from_dict(broker_config or {})
        self.meta_path = os.path.join(self.data_dir, "controller", "metadata.json")
        os.makedirs(os.path.dirname(self.meta_path), exist_ok=True)
        if os.path.exists(self.meta_path):
            with open(self.meta_path, "rb") as f:
                self.state = ClusterState.from_json(f.read(), self.config)
        else:
            self.state = ClusterState(self.config)
        self.state.controller_epoch += 1
        self.lock = threading.RLock()
        self.handles: dict[Key, object] = {}
        self._watched: dict[Key, tuple] = {}      # key -> (handle, outstanding watch ref)
        self._watches: dict = {}                   # watch ref -> key
        self.reports: dict[Key, dict] = {}
        # key -> (when it last answered a poll, that answer): a slow (not dead) replica keeps its
        # last answer for replica.session.timeout.ms rather than losing its role on one late poll
        self.last_answer: dict[Key, tuple[float, dict]] = {}
        self.incarnations: dict[Key, str] = {}
        self.seen_alive: set[Key] = set()
        self.created_at: dict[Key, float] = {}
        self.started = time.monotonic()
        self._pending_pushes: list = []
        self._heartbeats = HeartbeatClock(self.config.coordinator_session_timeout_ms / 1000.0,
                                          max(COORDINATOR_STARTUP_S, self.config.coordinator_session_timeout_ms / 1000.0))
        self._heartbeat_refs: dict[str, object] = {}   # coordinator name -> outstanding liveness call
        self._last_node_check = 0.0
        self._nodes: list[str] = alive_node_ids()
        self._remap_nodes_after_restart()
        # A new controller incarnation bumps every leader epoch, so every replica (perhaps freshly
        # restarted) receives its role again and stale leaders are fenced.
        for t in self.state.topics.values():
            for p in t.partitions:
                p.leader_epoch += 1
        self._persist()
        self._stop = threading.Event()
        self._coordinators: dict[str, object] = {}
        self._thread = threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True)
        self._thread.start()
        threading.Thread(target=self._ensure_internal_topics, name="internal-topics", daemon=True).start()

    # ---- persistence ---------------------------------------------------------------------------
    def _persist(self) -> None:
        atomic_write(self.meta_path, self.state.to_json())

    def _log_dir(self, topic: TopicRecord, partition: int, replica: int) -> str:
        inc = topic.partitions[partition].placement[replica].incarnation
        suffix = f".{inc}" if inc else ""
        return os.path.join(self.data_dir, "topics", topic.name, str(partition), f"replica-{replica}{suffix}")

    def _remap_nodes_after_restart(self) -> None:
        """After a whole-cluster restart node ids are new: map old ids onto live nodes in order."""
        alive = set(self._nodes)
        old = sorted({pl.node_id for t in self.state.topics.values() for p in t.partitions
                      for pl in p.placement.values() if pl.node_id is not None})
        if not old or any(n in alive for n in old):
            return
        mapping = {o: self._nodes[i % len(self._nodes)] for i, o in enumerate(old)}
        for t in self.state.topics.values():
            for p in t.partitions:
                for pl in p.placement.values():
                    if pl.node_id is not None:
                        pl.node_id = mapping[pl.node_id]

    # ---- replica actors ------------------------------------------------------------------------
    def _placement_node(self, topic: TopicRecord, partition: int, replica: int) -> str | None:
        node = topic.partitions[partition].placement[replica].node_id
        return node if len(self._nodes) > 1 else None

    def _create_replica(self, topic: TopicRecord, partition: int, replica: int, fresh: bool):
        name = replica_actor_name(topic.name, partition, replica)
        opts = replica_options(name, self.namespace)
        opts.update(pinned(self._placement_node(topic, partition, replica)))
        handle = ReplicaActor.options(**opts).remote(
            topic.name, partition, replica, self._log_dir(topic, partition, replica), topic.config, topic.schema,
            self.namespace, self.state.controller_epoch, self.config.to_dict(), fresh)
        self.handles[(topic.name, partition, replica)] = handle
        self.created_at[(topic.name, partition, replica)] = time.monotonic()
        return handle

    def _handle(self, key: Key):
        h = self.handles.get(key)
        if h is not None:
            return h
        try:
            h = ray.get_actor(replica_actor_name(*key), namespace=self.namespace)
        except ValueError:
            topic = self.state.topics.get(key[0])
            if topic is None:
                return None
            h = self._create_replica(topic, key[1], key[2], fresh=False)
        self.handles[key] = h
        return h

    # ---- internal topics and coordinators ------------------------------------------------------
    def _internal_topic_specs(self) -> list[tuple[str, int]]:
        from ..protocol import OFFSETS_TOPIC

        return [(TXN_STATE_TOPIC, self.config.transaction_coordinators),
                (OFFSETS_TOPIC, self.config.group_coordinators)]

    def _ensure_internal_topics(self) -> None:
        """Create the coordinators' replicated logs (RF up to 3, min ISR 2 when 3), then the coordinators."""
        for name, partitions in self._internal_topic_specs():
            while not self._stop.is_set():
                try:
                    with self.lock:
                        exists = name in self.state.topics
                    if not exists:
                        nodes = len(alive_node_ids())
                        limit = self.config.replication_factor_max if nodes <= 1 else nodes
                        rf = min(3, limit)
                        self.create_topic(name, partitions, rf,
                                          {"min.insync.replicas": 2 if rf >= 3 else 1, "segment.bytes": 1 << 20,
                                           "retention.ms": -1}, None, internal=True)
                    break
                except Exception:  # noqa: BLE001 - retried until it works
                    log.exception("creating internal topic %s", name)
                    time.sleep(1.0)
        self._internal_ready = True

    def _ensure_coordinators(self) -> None:
        """Coordinator actors exist (recreated if someone `ray.kill`ed them), are alive and loaded.

        A coordinator that restarted must resend the markers of decided transactions even if no
        client calls it, so it is pinged (which loads it) about once a second. A coordinator whose
        heartbeat goes unanswered for coordinator.session.timeout.ms (a paused or wedged process)
        is killed, and recreated on the next round: its replacement loads under a new coordinator
        epoch, which fences anything the old process might still try."""
        if not getattr(self, "_internal_ready", False):
            return
        from .group_coordinator_actor import GroupCoordinator, group_coordinator_options
        from .txn_coordinator_actor import TxnCoordinator, txn_coordinator_options

        specs = [(txn_coordinator_name(i), i, TxnCoordinator, txn_coordinator_options)
                 for i in range(self.config.transaction_coordinators)]
        specs += [(group_coordinator_name(i), i, GroupCoordinator, group_coordinator_options)
                  for i in range(self.config.group_coordinators)]
        ping_due = time.monotonic() - getattr(self, "_last_coordinator_ping", 0.0) >= COORDINATOR_PING_S
        if ping_due:
            self._last_coordinator_ping = time.monotonic()
        for name, index, actor_class, options in specs:
            try:
                handle = ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                actor_class.options(**options(name, self.namespace)).remote(index, self.namespace,
                                                                             self.config.to_dict())
                self._forget_heartbeat(name)
                self._heartbeats.seen(name, time.monotonic())
                continue
            if ping_due:
                self._pending_pushes.append(handle.ping.remote())
                self._check_coordinator_heartbeat(name, handle)

    def _forget_heartbeat(self, name: str) -> None:
        self._heartbeats.forget(name)
        self._heartbeat_refs.pop(name, None)

    def _check_coordinator_heartbeat(self, name: str, handle) -> None:
        now = time.monotonic()
        self._heartbeats.seen(name, now)
        outstanding = self._heartbeat_refs.pop(name, None)
        if outstanding is not None:
            done, _ = ray.wait([outstanding], timeout=0)
            if done:
                try:
                    ray.get(done[0])
                    self._heartbeats.answered(name, now)
                except Exception:  # noqa: BLE001 - died: Ray restarts it (or the name lookup recreates it)
                    self._heartbeats.died(name, now)
                outstanding = None
            elif self._heartbeats.hung(name, now):
                state = "answered no heartbeat" if self._heartbeats.started(name) else "did not start"
                log.warning("coordinator %s %s for %.1f s: replacing it", name, state,
                            self._heartbeats.silent_for(name, now))
                try:
                    ray.kill(handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                self._forget_heartbeat(name)
                return
        self._heartbeat_refs[name] = outstanding if outstanding is not None else handle.liveness.remote()

    def coordinator_identity(self, kind: str, index: int) -> tuple[int, int]:
        """(producer id, new coordinator epoch) for a coordinator (re)loading its state."""
        with self.lock:
            identity = self.state.next_coordinator_identity(kind, index)
            self._persist()
            return identity

    def cluster_info(self) -> dict:
        return {"transaction_coordinators": self.config.transaction_coordinators,
                "group_coordinators": self.config.group_coordinators,
                "controller_epoch": self.state.controller_epoch}

    # ---- reconcile loop ------------------------------------------------------------------------
    def _reconcile_loop(self) -> None:
        interval = self.config.replica_health_check_interval_ms / 1000.0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.reconcile_once()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("controller reconcile failed")
            self._wait_for_death_or(max(0.0, interval - (time.monotonic() - t0)))

    def _wait_for_death_or(self, timeout: float) -> None:
        """Sleep until the next round, or until a watched replica dies (then reconcile at once)."""
        refs = list(self._watches)
        if not refs:
            self._stop.wait(timeout)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        for ref in ready:
            key = self._watches.pop(ref, None)
            if key is not None and self._watched.get(key, (None, None))[1] == ref:
                del self._watched[key]
        if ready:
            self._stop.wait(0.02)   # a replica that keeps dying must not turn this into a busy loop

    def _arm_watches(self, keys) -> None:
        """Keep one never-answered `watch` call outstanding per replica: Ray fails it the moment the
        actor dies, which wakes the loop, so a killed leader is replaced without waiting for a ping."""
        live = set(keys)
        for key in [k for k in self._watched if k not in live]:
            _, ref = self._watched.pop(key)
            self._watches.pop(ref, None)
        for key in live:
            h = self.handles.get(key)
            if h is None or self._watched.get(key, (None, None))[0] is h:
                continue
            old = self._watched.pop(key, None)
            if old is not None:
                self._watches.pop(old[1], None)
            ref = h.watch.remote()
            self._watched[key] = (h, ref)
            self._watches[ref] = key

    def reconcile_once(self) -> None:
        with self.lock:
            keys = [(t.name, p, r) for t in self.state.topics.values()
                    for p, part in enumerate(t.partitions) for r in part.replicas]
            refs = {}
            for key in keys:
                try:
                    h = self._handle(key)
                except Exception:  # noqa: BLE001 - name still held by a dying actor; next round
                    h = None
                if h is not None:
                    refs[h.ping.remote()] = key
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PING_TIMEOUT_S) if refs else ([], [])
        reports: dict[Key, dict] = {}
        now = time.monotonic()
        for ref in ready:
            key = refs[ref]
            try:
                reports[key] = ray.get(ref)
                self.last_answer[key] = (now, reports[key])
            except (ActorDiedError, ActorUnschedulableError):
                self.handles.pop(key, None)      # gone for good (e.g. ray.kill): recreate next round
                self.last_answer.pop(key, None)
            except Exception:  # noqa: BLE001 - restarting or unreachable: not usable right now
                self.last_answer.pop(key, None)
        session_s = self.config.replica_session_timeout_ms / 1000.0
        slow = {}
        for ref in late:                         # alive as far as Ray knows, just not answering yet
            seen = self.last_answer.get(refs[ref])
            if seen is not None and now - seen[0] < session_s:
                slow[refs[ref]] = seen[1]
        self._check_nodes()
        with self.lock:
            self._decide_and_push(reports, slow)
            self._arm_watches(keys)
        self._ensure_coordinators()

    def _check_nodes(self) -> None:
        if time.monotonic() - self._last_node_check < NODE_CHECK_S:
            return
        self._last_node_check = time.monotonic()
        nodes = alive_node_ids()
        with self.lock:
            self._nodes = nodes
            if len(nodes) <= 1:
                return
            alive = set(nodes)
            changed = False
            for t in self.state.topics.values():
                for pi, p in enumerate(t.partitions):
                    for r, pl in p.placement.items():
                        if pl.node_id is None or pl.node_id in alive:
                            continue
                        used = {p.placement[o].node_id for o in p.replicas if o != r}
                        free = [n for n in nodes if n not in used]
                        if not free:
                            continue
                        load = {n: 0 for n in free}
                        for tt in self.state.topics.values():
                            for pp in tt.partitions:
                                for pl2 in pp.placement.values():
                                    if pl2.node_id in load:
                                        load[pl2.node_id] += 1
                        target = min(free, key=lambda n: (load[n], free.index(n)))
                        self.state.move_replica(t.name, pi, r, target)
                        changed = True
                        key = (t.name, pi, r)
                        old = self.handles.pop(key, None)
                        if old is not None:
                            try:
                                ray.kill(old)
                            except Exception:  # noqa: BLE001
                                pass
                        self.incarnations.pop(key, None)
                        self.seen_alive.discard(key)
            if changed:
                self._persist()

    def _starting(self, key: Key) -> bool:
        """A replica never seen alive since it (or this controller) started, and not yet overdue."""
        if key in self.seen_alive:
            return False
        return time.monotonic() - self.created_at.get(key, self.started) < STARTUP_GRACE_S

    def _decide_and_push(self, reports: dict[Key, dict], slow: dict[Key, dict] | None = None) -> None:
        """Decide with what answered plus the slow replicas' last answers; push to those that
        answered."""
        pushed = reports
        if slow:
            reports = {**slow, **reports}
        changed = False
        for t in self.state.topics.values():
            for pi, p in enumerate(t.partitions):
                alive = {r for r in p.replicas if (t.name, pi, r) in reports}
                for r in alive:
                    self.seen_alive.add((t.name, pi, r))
                usable = {r for r in alive if reports[(t.name, pi, r)]["eligible"]}
                starting = {r for r in p.replicas if r not in alive and self._starting((t.name, pi, r))}
                restarted = {r for r in alive
                             if self.incarnations.get((t.name, pi, r)) not in (None, reports[(t.name, pi, r)]["incarnation"])}
                changed |= self.state.reconcile_partition(t.name, pi, alive, usable, starting, restarted)
        if changed:
            self._persist()
        for key, rep in reports.items():
            self.incarnations[key] = rep["incarnation"]
        self.reports = reports
        self._push(pushed)

    def _push(self, reports: dict[Key, dict]) -> None:
        # forget finished pushes (their errors are visible in the next ping anyway)
        if self._pending_pushes:
            done, self._pending_pushes = ray.wait(self._pending_pushes, num_returns=len(self._pending_pushes),
                                                  timeout=0)
        ce = self.state.controller_epoch
        for (topic, pi, r), rep in reports.items():
            t = self.state.topics.get(topic)
            if t is None:
                continue
            p = t.partitions[pi]
            h = self.handles.get((topic, pi, r))
            if h is None:
                continue
            if r == p.leader:
                if (rep["role"] != "leader" or rep["leader_epoch"] != p.leader_epoch
                        or sorted(rep["isr"] or []) != sorted(p.isr)):
                    self._pending_pushes.append(
                        h.become_leader.remote(ce, p.leader_epoch, list(p.replicas), list(p.isr), t.schema, t.config))
            elif rep["role"] != "follower" or rep["leader_epoch"] != p.leader_epoch:
                self._pending_pushes.append(
                    h.become_follower.remote(ce, p.leader_epoch, p.leader, list(p.replicas), t.schema, t.config))

    # ---- API used by replicas ------------------------------------------------------------------
    def alter_isr(self, topic: str, partition: int, leader: int, leader_epoch: int, isr: list[int]) -> PartitionState:
        with self.lock:
            new_state = self.state.alter_isr(topic, partition, leader, leader_epoch, isr)
            self._persist()
            return new_state

    # ---- admin API -----------------------------------------------------------------------------
    def controller_epoch(self) -> int:
        return self.state.controller_epoch

    def ping(self) -> dict:
        return {"controller_epoch": self.state.controller_epoch, "topics": len(self.state.topics)}

    def create_topic(self, name: str, partitions: int | None = None, replication_factor: int | None = None,
                     config: dict | None = None, schema: bytes | None = None, internal: bool = False,
                     timeout_s: float = 60.0) -> TopicMetadata:
        partitions = self.config.num_partitions if partitions is None else partitions
        replication_factor = self.config.default_replication_factor if replication_factor is None else replication_factor
        with self.lock:
            nodes = alive_node_ids()
            topic_config, schema_bytes = self.state.validate_new_topic(
                name, partitions, replication_factor, config, schema_from_bytes(schema), len(nodes), internal)
            topic = self.state.add_topic(name, partitions, replication_factor, topic_config, schema_bytes,
                                         nodes, internal)
            self._persist()
            for pi, p in enumerate(topic.partitions):
                for r in p.replicas:
                    self._create_replica(topic, pi, r, fresh=True)
        self._wait_leaders(name, timeout_s)
        return self.get_metadata([name])[name]

    def _wait_leaders(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                t = self.state.topics.get(name)
                if t is None:
                    raise UnknownTopicOrPartitionError(f"topic {name!r} was deleted while being created")
                pending = [(pi, p.leader, p.leader_epoch) for pi, p in enumerate(t.partitions)]
            refs = {}
            for pi, leader, epoch in pending:
                h = self.handles.get((name, pi, leader)) if leader is not None else None
                if h is not None:
                    refs[h.ping.remote()] = epoch
            ok = 0
            try:
                for ref, epoch in refs.items():
                    rep = ray.get(ref, timeout=2.0)
                    ok += rep["role"] == "leader" and rep["leader_epoch"] == epoch
            except (RayActorError, GetTimeoutError):
                pass
            if ok == len(pending):
                return
            time.sleep(0.05)
        raise BrokerTimeoutError(f"topic {name!r}: partition leaders not ready after {timeout_s} s")

    def delete_topic(self, name: str) -> None:
        with self.lock:
            topic = self.state.topic(name)
            handles = []
            for pi, p in enumerate(topic.partitions):
                for r in p.replicas:
                    key = (name, pi, r)
                    h = self.handles.pop(key, None)
                    if h is None:
                        try:
                            h = ray.get_actor(replica_actor_name(*key), namespace=self.namespace)
                        except ValueError:
                            h = None
                    if h is not None:
                        handles.append(h)
                    self.incarnations.pop(key, None)
                    self.seen_alive.discard(key)
            self.state.remove_topic(name)
            self._persist()
        refs = [h.delete_log.remote() for h in handles]
        ray.wait(refs, num_returns=len(refs), timeout=10.0)
        for h in handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        import shutil

        shutil.rmtree(os.path.join(self.data_dir, "topics", name), ignore_errors=True)

    def list_topics(self, include_internal: bool = False) -> list[str]:
        with self.lock:
            return sorted(n for n, t in self.state.topics.items() if include_internal or not t.internal)

    def get_metadata(self, topics: list[str] | None = None) -> dict[str, TopicMetadata]:
        with self.lock:
            names = list(self.state.topics) if topics is None else topics
            return {n: self.state.topic(n).metadata() for n in names}

    def alter_topic_schema(self, name: str, schema: bytes) -> TopicMetadata:
        with self.lock:
            t = self.state.topic(name)
            if t.schema is None:
                raise SchemaMismatchError(f"topic {name!r} uses the default record model; it has no schema to evolve")
            new = check_schema_evolution(schema_from_bytes(t.schema), schema_from_bytes(schema))
            self.state.set_schema(name, schema_to_bytes(new))
            self._persist()
            handles = [self.handles[(name, pi, r)] for pi, p in enumerate(t.partitions) for r in p.replicas
                       if (name, pi, r) in self.handles]
            refs = [h.update_topic.remote(self.state.controller_epoch, t.schema, t.config) for h in handles]
            meta = t.metadata()
        # replicas that miss this (restarting) get the schema with their next role push
        ray.wait(refs, num_returns=len(refs), timeout=10.0)
        return meta

    def describe_topic(self, name: str) -> TopicDescription:
        with self.lock:
            t = self.state.topic(name)
            parts = [(pi, p.state(pi), self.handles.get((name, pi, p.leader)) if p.leader is not None else None)
                     for pi, p in enumerate(t.partitions)]
            meta = t.metadata()
        out = []
        for pi, st, h in parts:
            offsets = {"log_start_offset": -1, "high_watermark": -1, "last_stable_offset": -1}
            if h is not None:
                try:
                    rep = ray.get(h.ping.remote(), timeout=5.0)
                    offsets = {k: rep[k] for k in offsets}
                except (RayActorError, GetTimeoutError):
                    pass
            out.append(PartitionDescription(pi, st.leader, list(st.replicas), list(st.isr), st.leader_epoch, **offsets))
        return TopicDescription(meta.name, meta.topic_id, out, meta.config, schema_from_bytes(meta.schema),
                                meta.internal)

    def allocate_producer_ids(self, count: int = 1) -> int:
        with self.lock:
            first = self.state.allocate_producer_ids(count)
            self._persist()
            return first

    def status(self) -> dict:
        """Everything `ray-broker status` shows: nodes, replicas with role/ISR/offsets."""
        with self.lock:
            replicas = {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in self.reports.items()}
            topics = {n: t.metadata() for n, t in self.state.topics.items()}
        return {"controller_epoch": self.state.controller_epoch, "nodes": alive_node_ids(), "topics": topics,
                "replicas": replicas}

    def replica_reports(self) -> dict:
        refs = {}
        with self.lock:
            for key in list(self.handles):
                refs[self.handles[key].status.remote()] = key
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=2.0) if refs else ([], [])
        out = {}
        for ref in ready:
            try:
                out["/".join(map(str, refs[ref]))] = ray.get(ref)
            except RayActorError:
                pass
        return out

    def shutdown_broker(self) -> None:
        """Stop the reconcile loop and kill every broker actor but this one (data stays on disk)."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self.lock:
            names = [txn_coordinator_name(i) for i in range(self.config.transaction_coordinators)]
            names += [group_coordinator_name(i) for i in range(self.config.group_coordinators)]
            for name in names:
                try:
                    ray.kill(ray.get_actor(name, namespace=self.namespace), no_restart=True)
                except Exception:  # noqa: BLE001 - not running
                    pass
            # controlled shutdown first (HW, producer snapshot, clean-shutdown mark), then kill
            closing = [h.close_for_shutdown.remote() for h in self.handles.values()]
            if closing:
                ray.wait(closing, num_returns=len(closing), timeout=SHUTDOWN_CLOSE_S)
            for h in self.handles.values():
                try:
                    ray.kill(h, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            self.handles.clear()


def controller_options(namespace: str, head_node: str | None) -> dict:
    opts = broker_actor_options(CONTROLLER_NAME, namespace, max_concurrency=64)
    opts.update(pinned(head_node))
    return opts


Controller = ray.remote(ControllerActor)

"""Nemesis for `ray-broker verify`: injects faults on a seeded schedule, logging `Fault` start/end.

Fault kinds (each is logged as Fault(kind, target, "start") when injected and Fault(kind, target,
"end") once healed / recovered, or after a bounded wait):

  kill_leader           ray.kill a random partition leader replica (plain kill half the time: the
                        controller recreates it; a crash otherwise: Ray restarts it); end = a leader
                        is elected again.
  kill_follower         the same for a random follower replica.
  kill_txn_coordinator  crash `txn-coordinator/<n>` (Ray restarts it; it reloads __transaction_state).
  kill_group_coordinator crash `group-coordinator/<n>` (no workload uses groups yet: only liveness).
  kill_controller       crash the controller (Ray restarts it from data_dir/controller/metadata.json).
  kill_client           a transactional producer abandons its instance mid-transaction (no commit,
                        no abort) and a new instance with the same transactional.id takes over.
  pause                 SIGSTOP the worker process of a random leader replica, the txn coordinator
                        or the controller for 2-6 s (past the controller's 1 s ping timeout), then
                        SIGCONT. Needs the actor on this node (pid from Ray's GCS actor table).
  restart_broker        park every client; `shutdown_broker` (every replica killed), kill the
                        coordinators and the controller for good; redeploy the controller from the
                        same data dir (it recreates everything from disk); rebuild the clients.
  restart_cluster       embedded runs only (not in the defaults): like restart_broker but stops Ray
                        itself and `rb.connect(data_dir=...)`s again in the same driver process, on
                        the driver's main thread (from the nemesis thread, the driver was later
                        terminated by Ray: "Failed to connect to GCS within 60 seconds").

Only the actors of this run's topics are targeted.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from typing import Callable

from .history import Fault

log = logging.getLogger(__name__)

FAULT_KINDS = ("kill_leader", "kill_follower", "kill_txn_coordinator", "kill_group_coordinator",
               "kill_controller", "kill_client", "pause", "restart_broker", "restart_cluster",
               "remove_node", "add_node")
NODE_FAULTS = ("remove_node", "add_node")   # need `--nodes N` (a ray.cluster_utils.Cluster)
# restart_broker / restart_cluster are opt-in: each parks every client for ~30 s (restart_cluster is
# experimental); see docs/verification.md.
DEFAULT_FAULTS = ("kill_leader", "kill_follower", "kill_txn_coordinator", "kill_group_coordinator",
                  "kill_controller", "kill_client", "pause")


class Nemesis(threading.Thread):
    def __init__(self, ctx, kinds: list[str], seed: int, interval: float = 5.0, namespace: str = "ray_broker",
                 embedded: bool = True):
        super().__init__(name="verify-nemesis", daemon=True)
        unknown = [k for k in kinds if k not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown} (known: {', '.join(FAULT_KINDS)})")
        self.ctx = ctx
        self.kinds = list(kinds)
        if "restart_cluster" in self.kinds and not embedded:
            raise ValueError("restart_cluster needs an embedded cluster (no --address / RAY_ADDRESS)")
        self.rng = random.Random(seed)
        self.interval = interval
        self.namespace = namespace
        self.stop_event = threading.Event()
        self.injected: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.errors: list[str] = []
        self._paused: dict[int, str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ schedule
    def run(self) -> None:
        if not self.kinds:
            return
        while not self.stop_event.wait(self.rng.uniform(0.5, 1.5) * self.interval):
            if self.ctx.stop.is_set():
                break
            kind = self.rng.choice(self.kinds)
            try:
                done = getattr(self, f"_{kind}")()
            except Exception as exc:  # noqa: BLE001 - a failed injection is logged, not fatal
                msg = f"{kind}: {type(exc).__name__}: {exc}"
                log.warning("nemesis %s", msg)
                self.errors.append(msg[:300])
                done = False
            if done:
                self.injected[kind] = self.injected.get(kind, 0) + 1
            else:
                self.skipped[kind] = self.skipped.get(kind, 0) + 1

    def stop(self, timeout: float = 120.0) -> None:
        self.stop_event.set()
        self.join(timeout)
        self.heal_all()

    def heal_all(self) -> None:
        with self._lock:
            paused, self._paused = dict(self._paused), {}
        for pid, target in paused.items():
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass

    # ------------------------------------------------------------------ helpers
    def _start(self, kind: str, target: str) -> None:
        self.ctx.record(Fault(kind, target, "start"))

    def _end(self, kind: str, target: str) -> None:
        self.ctx.record(Fault(kind, target, "end"))

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return True
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)
        return False

    def _actor(self, name: str):
        import ray

        return ray.get_actor(name, namespace=self.namespace)

    def _partition(self):
        """(topic, partition, PartitionDescription) of a random partition of this run's topics."""
        tps = self.ctx.all_tps()
        topic, partition = self.rng.choice(tps)
        desc = self.ctx.cluster.admin().describe_topic(topic).partitions[partition]
        return topic, partition, desc

    def _leader_back(self, topic: str, partition: int, old_epoch: int | None = None) -> bool:
        admin = self.ctx.cluster.admin()

        def ok():
            d = admin.describe_topic(topic).partitions[partition]
            return d.leader is not None and (old_epoch is None or d.leader_epoch > old_epoch)
        return self._wait(ok, 30.0)

    def _kill(self, handle, crash: bool) -> None:
        import ray

        ray.kill(handle, no_restart=not crash)

    # ------------------------------------------------------------------ faults
    def _kill_leader(self) -> bool:
        from ..protocol import replica_actor_name

        topic, partition, d = self._partition()
        if d.leader is None:
            return False
        crash = self.rng.random() < 0.5
        target = f"{replica_actor_name(topic, partition, d.leader)} ({'crash' if crash else 'kill'})"
        handle = self._actor(replica_actor_name(topic, partition, d.leader))
        self._start("kill_leader", target)
        self._kill(handle, crash)
        self._leader_back(topic, partition, d.leader_epoch)
        self._end("kill_leader", target)
        return True

    def _kill_follower(self) -> bool:
        from ..protocol import replica_actor_name

        topic, partition, d = self._partition()
        followers = [r for r in d.replicas if r != d.leader]
        if not followers:
            return False
        r = self.rng.choice(followers)
        crash = self.rng.random() < 0.5
        target = f"{replica_actor_name(topic, partition, r)} ({'crash' if crash else 'kill'})"
        handle = self._actor(replica_actor_name(topic, partition, r))
        self._start("kill_follower", target)
        self._kill(handle, crash)
        admin = self.ctx.cluster.admin()
        self._wait(lambda: r in admin.describe_topic(topic).partitions[partition].isr, 20.0)
        self._end("kill_follower", target)
        return True

    def _coordinator_names(self, kind: str) -> list[str]:
        import ray

        from ..protocol import group_coordinator_name, txn_coordinator_name

        info = ray.get(self.ctx.cluster.controller.cluster_info.remote(), timeout=30)
        if kind == "txn":
            return [txn_coordinator_name(i) for i in range(info["transaction_coordinators"])]
        return [group_coordinator_name(i) for i in range(info["group_coordinators"])]

    def _kill_named(self, kind: str, name: str) -> bool:
        import ray

        handle = self._actor(name)
        self._start(kind, f"{name} (crash)")
        self._kill(handle, True)
        self._wait(lambda: ray.get(self._actor(name).ping.remote(), timeout=2) is not None, 30.0)
        self._end(kind, f"{name} (crash)")
        return True

    def _kill_txn_coordinator(self) -> bool:
        return self._kill_named("kill_txn_coordinator", self.rng.choice(self._coordinator_names("txn")))

    def _kill_group_coordinator(self) -> bool:
        return self._kill_named("kill_group_coordinator", self.rng.choice(self._coordinator_names("group")))

    def _kill_controller(self) -> bool:
        from ..protocol import CONTROLLER_NAME

        return self._kill_named("kill_controller", CONTROLLER_NAME)

    def _kill_client(self) -> bool:
        from .workloads import Copier, TxnProducer

        workers = [w for w in self.ctx.workers if isinstance(w, (TxnProducer, Copier)) and w.is_alive()]
        if not workers:
            return False
        w = self.rng.choice(workers)
        w.killed.clear()
        self._start("kill_client", w.transactional_id)
        w.kill_requested.set()
        ok = w.killed.wait(60.0)
        if not ok:
            w.kill_requested.clear()   # never reached the kill point: not injected after all
        self._end("kill_client", w.transactional_id if ok else f"{w.transactional_id} (not reached)")
        return ok

    def _pid_of(self, name: str) -> int | None:
        """Pid of a live actor's worker process on this node (None if unknown or elsewhere)."""
        import ray
        from ray._private import state

        handle = self._actor(name)
        info = state.actors(actor_id=handle._actor_id.hex())
        if not info or info.get("State") != "ALIVE":
            return None
        node = (info.get("Address") or {}).get("NodeID")
        if node and node != ray.get_runtime_context().get_node_id():
            return None
        pid = info.get("Pid")
        return int(pid) if pid else None

    def _pause(self) -> bool:
        from ..protocol import CONTROLLER_NAME, replica_actor_name

        choice = self.rng.random()
        if choice < 0.6:
            topic, partition, d = self._partition()
            if d.leader is None:
                return False
            name = replica_actor_name(topic, partition, d.leader)
        elif choice < 0.8:
            from .workloads import COPIER_OUTPUT

            uses_groups = COPIER_OUTPUT in self.ctx.topics     # only the copier has a group to disturb
            kind = "group" if uses_groups and self.rng.random() < 0.5 else "txn"
            name = self.rng.choice(self._coordinator_names(kind))
        else:
            name = CONTROLLER_NAME
        pid = self._pid_of(name)
        if pid is None:
            return False
        secs = round(self.rng.uniform(2.0, 6.0), 1)
        target = f"{name} pid {pid} for {secs}s"
        self._start("pause", target)
        with self._lock:
            os.kill(pid, signal.SIGSTOP)
            self._paused[pid] = name
        try:
            self.stop_event.wait(secs)
        finally:
            with self._lock:
                self._paused.pop(pid, None)
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
        self._end("pause", target)
        return True

    def _restart_broker(self) -> bool:
        import ray

        from ..actors.deployment import ensure_controller
        from ..protocol import CONTROLLER_NAME

        ctx = self.ctx
        with ctx.exclusive(timeout=90.0) as parked:
            if not parked:
                log.warning("restart_broker: clients did not park in time; restarting anyway")
            target = f"broker (generation {ctx.generation + 1})"
            self._start("restart_broker", target)
            names = self._coordinator_names("txn") + self._coordinator_names("group")
            controller = self._actor(CONTROLLER_NAME)
            try:
                ray.get(controller.shutdown_broker.remote(), timeout=60)
            except Exception as exc:  # noqa: BLE001 - kill it anyway
                log.warning("restart_broker: shutdown_broker: %s", exc)
            for name in names:
                try:
                    ray.kill(self._actor(name), no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            ray.kill(controller, no_restart=True)
            self._wait(lambda: _gone(CONTROLLER_NAME, self.namespace), 30.0)
            handle = ensure_controller(self.namespace)
            ray.get(handle.ping.remote(), timeout=120)
            ctx.cluster.controller = handle
            try:
                ctx.cluster._context._controller = None
            except Exception:  # noqa: BLE001
                pass
            ctx.generation += 1
            topics = [t for ts in ctx.topics.values() for t in ts]
            self._wait(lambda: all(p.leader is not None for t in topics
                                   for p in ctx.cluster.admin().describe_topic(t).partitions), 120.0)
            self._end("restart_broker", target)
        return True

    def _restart_cluster(self) -> bool:
        import ray

        ctx = self.ctx
        if ctx.connect is None:
            return False
        with ctx.exclusive(timeout=90.0) as parked:
            if not parked:
                log.warning("restart_cluster: clients did not park in time; restarting anyway")
            target = f"ray (generation {ctx.generation + 1})"
            self._start("restart_cluster", target)
            for w in ctx.workers:
                try:
                    w.close()
                except Exception:  # noqa: BLE001
                    pass
            old = ctx.cluster

            def restart():
                # on the driver's main thread: ray.init from another thread leaves the new session
                # half set up (the driver was later terminated: "Failed to connect to GCS")
                try:
                    old.shutdown()
                finally:
                    if ray.is_initialized():
                        ray.shutdown()
                return ctx.connect()

            ctx.cluster = ctx.call_in_main(restart, timeout=240.0)
            ctx.generation += 1
            self._wait(lambda: all(p.leader is not None for t in [t for ts in ctx.topics.values() for t in ts]
                                   for p in ctx.cluster.admin().describe_topic(t).partitions), 60.0)
            self._end("restart_cluster", target)
        return True


    # ------------------------------------------------------------------ nodes (ray.cluster_utils.Cluster)
    def _all_leaders(self, timeout: float) -> bool:
        admin = self.ctx.cluster.admin()
        topics = [t for ts in self.ctx.topics.values() for t in ts]
        return self._wait(lambda: all(p.leader is not None for t in topics
                                      for p in admin.describe_topic(t).partitions), timeout)

    def _remove_node(self) -> bool:
        """Hard-remove a random worker node (its raylet and every actor on it die at once, as when a
        machine is lost). At least two nodes stay, so RF-3 partitions keep a min.insync quorum."""
        nodes = self.ctx.node_cluster
        if nodes is None:
            return False
        workers = list(nodes.worker_nodes)
        if len(workers) + 1 <= 2:
            return False
        victim = self.rng.choice(workers)
        target = f"node {victim.node_id[:12]}"
        self._start("remove_node", target)
        self.ctx.call_in_main(lambda: nodes.remove_node(victim, allow_graceful=False))
        self._all_leaders(60.0)
        self._end("remove_node", target)
        return True

    def _add_node(self) -> bool:
        """Bring the cluster back to its size: the controller moves replicas that lost their node onto it."""
        nodes = self.ctx.node_cluster
        if nodes is None or len(nodes.worker_nodes) + 1 >= self.ctx.node_count:
            return False
        def add():
            node = nodes.add_node(num_cpus=1)
            nodes.wait_for_nodes()
            return node

        self._start("add_node", "new node")
        try:
            node = self.ctx.call_in_main(add)
        except Exception:
            self._end("add_node", "new node (failed)")
            raise
        self._end("add_node", f"node {node.node_id[:12]}")
        return True


def _gone(name: str, namespace: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=namespace)
        return False
    except ValueError:
        return True

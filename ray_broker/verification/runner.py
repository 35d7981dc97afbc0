"""Run a verification: set up topics, run workloads + nemesis for N seconds, final-read, check.

`run_verify(...)` is what `ray-broker verify` and `jobs/verify_job.py` call. It returns the report
dict (also written to `report_path`, with the history next to it as `<report>.history.jsonl`);
`report["valid"]` is False when the checker found any anomaly.

Embedded (no address, Ray not initialised): starts a local Ray + broker on `data_dir` (a fresh temp
dir by default); `restart_cluster` is available. Attached (address / RAY_ADDRESS / Ray already
initialised): uses the broker deployed there; topics get a run-id suffix so reruns do not collide.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from typing import Any

from .checker import check
from .history import History
from .nemesis import DEFAULT_FAULTS, FAULT_KINDS, NODE_FAULTS, Nemesis
from .workloads import WORKLOADS, final_read, make_workers, RunContext, setup_topics

log = logging.getLogger(__name__)

WARMUP_MAX_S = 90.0

# faster failure detection than the defaults, as in the integration tests
VERIFY_BROKER_CONFIG = {"replica.health.check.interval.ms": 250, "replica.lag.time.max.ms": 5000,
                        # below the longest pause (6 s): a paused coordinator or leader is replaced and
                        # resumes a zombie
                        "coordinator.session.timeout.ms": 4000, "replica.session.timeout.ms": 3000}


def parse_workloads(spec: str) -> list[str]:
    items = [w.strip() for w in spec.split(",") if w.strip()]
    out: list[str] = []
    for w in items:
        if w == "all":
            out.extend(WORKLOADS)
        elif w in WORKLOADS:
            out.append(w)
        else:
            raise ValueError(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)}, all)")
    return list(dict.fromkeys(out))


def parse_faults(spec: str | None, embedded: bool, workloads: list[str], nodes: int = 1) -> list[str]:
    if spec is None:
        kinds = list(DEFAULT_FAULTS) + (list(NODE_FAULTS) if nodes > 1 else [])
    elif spec.strip() in ("", "none"):
        kinds = []
    elif spec.strip() == "all":
        kinds = [k for k in FAULT_KINDS if (embedded or k != "restart_cluster")
                 and (nodes > 1 or k not in NODE_FAULTS)]
    else:
        kinds = [k.strip() for k in spec.split(",") if k.strip()]
        bad = [k for k in kinds if k not in FAULT_KINDS]
        if bad:
            raise ValueError(f"unknown fault kind(s) {bad} (known: {', '.join(FAULT_KINDS)})")
        if nodes < 3 and any(k in NODE_FAULTS for k in kinds):
            raise ValueError("remove_node / add_node need a multi-node run: --nodes 3 or more (embedded)")
    if "txn" not in workloads and "copier" not in workloads:
        kinds = [k for k in kinds if k != "kill_client"]
    if "copier" not in workloads and spec is None:
        kinds = [k for k in kinds if k != "kill_group_coordinator"]   # nothing uses a group
    return kinds


def start_node_cluster(nodes: int, namespace: str, data_dir: str):
    """A `ray.cluster_utils.Cluster` of `nodes` one-CPU nodes on this machine, this driver attached
    and the broker deployed on it (the node faults remove and add its worker nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    import ray_broker as rb

    node_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        node_cluster.add_node(num_cpus=1)
    node_cluster.wait_for_nodes()
    ray.init(address=node_cluster.address, namespace=namespace, logging_level="WARNING", log_to_driver=False)
    rb.deploy(namespace=namespace, data_dir=data_dir, config=VERIFY_BROKER_CONFIG)
    return node_cluster


def run_verify(workload: str = "all", seconds: float = 60.0, seed: int = 0, report_path: str | None = None,
               faults: str | None = None, data_dir: str | None = None, address: str | None = None,
               namespace: str = "ray_broker", fault_interval: float = 5.0, producers: int = 3,
               history_path: str | None = None, quiet: bool = False, nodes: int = 1) -> dict[str, Any]:
    import ray

    import ray_broker as rb

    workloads = parse_workloads(workload)
    address = address or os.environ.get("RAY_ADDRESS")
    embedded = not (address or ray.is_initialized())
    if nodes > 1 and not embedded:
        raise ValueError("--nodes starts its own multi-node cluster on this machine: drop --address / RAY_ADDRESS")
    kinds = parse_faults(faults, embedded, workloads, nodes)
    made_tmp = None
    if embedded and data_dir is None:
        data_dir = made_tmp = tempfile.mkdtemp(prefix="rb_verify_")
    run_id = uuid.uuid4().hex[:6]
    started = time.time()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[verify {time.time() - started:6.1f}s] {msg}", flush=True)

    node_cluster = None
    if nodes > 1:
        node_cluster = start_node_cluster(nodes, namespace, data_dir)

        def connect():
            return rb.connect(namespace=namespace, data_dir=data_dir)
    elif embedded:
        def connect():
            return rb.connect(namespace=namespace, data_dir=data_dir, config=VERIFY_BROKER_CONFIG)
    else:
        def connect():
            return rb.connect(address=address, namespace=namespace)
    say(f"connecting ({'embedded, data dir ' + data_dir if embedded else 'attached to ' + str(address or 'ray')})")
    cluster = connect()
    history = History()
    ctx = RunContext(cluster, history, seed, run_id, connect=connect if embedded and nodes == 1 else None)
    ctx.node_cluster, ctx.node_count = node_cluster, nodes
    settings = {"workload": workload, "workloads": workloads, "seconds": seconds, "seed": seed,
                "faults_requested": kinds, "fault_interval_s": fault_interval, "producers_per_workload": producers,
                "embedded": embedded, "nodes": nodes, "data_dir": data_dir, "namespace": namespace, "run_id": run_id,
                "topics": "2 per workload x 3 partitions, RF 3, min.insync.replicas 2",
                "broker_config": VERIFY_BROKER_CONFIG if embedded else "as deployed"}
    nemesis = None
    workers = []
    try:
        setup_topics(ctx, workloads)
        say(f"topics: {ctx.topics}")
        workers = make_workers(ctx, workloads, producers=producers)
        for w in workers:
            w.start()
        # the clock (and the faults) start once every client has done one operation: a slow start
        # (actor start-up on a loaded machine) must not eat the run
        warm_by = time.monotonic() + WARMUP_MAX_S
        while time.monotonic() < warm_by and not all(w.ops > 0 or not w.is_alive() for w in workers):
            ctx.run_main_calls()
            time.sleep(0.1)
        settings["warmup_s"] = round(WARMUP_MAX_S - max(0.0, warm_by - time.monotonic()), 1)
        say(f"clients warmed up in {settings['warmup_s']}s")
        nemesis = Nemesis(ctx, kinds, seed=seed + 1, interval=fault_interval, namespace=namespace,
                          embedded=embedded)
        nemesis.start()
        say(f"running {', '.join(workloads)} for {seconds:g}s with faults {kinds or 'none'}")
        deadline = time.monotonic() + seconds
        next_status = time.monotonic() + 15
        while time.monotonic() < deadline:
            ctx.run_main_calls()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= next_status:
                next_status += 15
                say(f"{len(history)} events, faults {dict(nemesis.injected)}")
        say("stopping nemesis")
        nemesis.stop_event.set()
        stop_by = time.monotonic() + 120
        while nemesis.is_alive() and time.monotonic() < stop_by:
            ctx.run_main_calls()       # a node fault in progress needs the main thread to finish
            nemesis.join(0.2)
        nemesis.stop()
        say("stopping clients")
        ctx.stop.set()
        for w in workers:
            w.join(timeout=90)
        say("final read")
        fr = final_read(ctx)
        say(f"final read: {fr['partitions']} partition reads, stable={fr['stable']}, failed={len(fr['failed'])}")
    except BaseException:
        ctx.stop.set()
        if nemesis is not None:
            nemesis.stop_event.set()
            nemesis.heal_all()
        try:
            ctx.cluster.shutdown()
        except Exception:  # noqa: BLE001
            pass
        if node_cluster is not None:
            ray.shutdown()
            node_cluster.shutdown()
        raise
    finally:
        ctx.stop.set()
        if nemesis is not None:
            nemesis.stop_event.set()
            nemesis.heal_all()
        hist_file = history_path or (report_path + ".history.jsonl" if report_path else None)
        if hist_file:
            history.save(hist_file)

    report = check(history)
    out = report.to_dict()
    out["settings"] = settings
    out["elapsed_s"] = round(time.time() - started, 1)
    out["faults_skipped"] = dict(nemesis.skipped) if nemesis else {}
    out["nemesis_errors"] = nemesis.errors[:20] if nemesis else []
    out["final_read"] = fr
    out["workers"] = {w.wid: {"ops": w.ops, "errors": w.errors, "last_error": w.last_error} for w in workers}
    out["history"] = hist_file
    if report_path:
        with open(report_path, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if not quiet:
        print(report.format_table(), flush=True)
        if report_path:
            print(f"report: {report_path}\nhistory: {hist_file}", flush=True)
    try:
        ctx.cluster.shutdown()
    except Exception:  # noqa: BLE001
        pass
    if node_cluster is not None:
        ray.shutdown()
        node_cluster.shutdown()
    if made_tmp and out["valid"]:
        import shutil

        shutil.rmtree(made_tmp, ignore_errors=True)
    return out

"""Memory: the extra PSS of a partition replica actor over a bare Ray actor, idle and under load.

    python benchmarks/bench_memory.py            # 10 s of load
    python benchmarks/bench_memory.py --smoke

PSS (proportional set size: private pages plus a share of shared ones) from
/proc/<pid>/smaps_rollup of the actor processes (same machine). Baseline: `BareActor`, a Ray actor
with one method and nothing imported (num_cpus=0, like the replicas). Measured on the leader
replica of a fresh topic (1 partition, `--replication-factor`, default 1):

- idle: after the topic was created and one record written (log open), median of `--samples` (5) samples;
- load: while one producer writes `--batch-rows`-row Arrow batches (16-byte key + 100-byte value)
  with send_batch back to back for `--seconds`, sampled every 0.25 s: max and median;
- after: `--after-seconds` (2) after the load stopped.

Also the driver's PSS before and after the load (the producer's memory is bounded by
buffer.memory, 64 MiB). Target (issue 7): a replica at most 80 MB PSS over a bare actor
(`extra_*_mb`, MB = MiB here).
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from ray_broker.protocol import replica_actor_name  # noqa: E402
from ray_broker.testing import datagen  # noqa: E402

FULL = {"seconds": 10.0, "replication_factor": 1, "batch_rows": 20_000, "settle_seconds": 1.0, "after_seconds": 2.0,
        "samples": 5}
SMOKE = {"seconds": 0.5, "replication_factor": 1, "batch_rows": 500, "settle_seconds": 0.1, "after_seconds": 0.2,
         "samples": 2}


def parser():
    ap = bl.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, help="load duration (default 10)")
    ap.add_argument("--replication-factor", type=int, help="replication factor (default 1)")
    ap.add_argument("--batch-rows", type=int, help="rows per batch under load (default 20000)")
    ap.add_argument("--samples", type=int, help="PSS samples (0.1 s apart) for idle and after figures (default 5)")
    ap.add_argument("--settle-seconds", type=float, help="wait before the idle samples (default 1)")
    ap.add_argument("--after-seconds", type=float, help="wait after the load before the last samples (default 2)")
    return ap


def samples(fn, n: int = 5, gap: float = 0.1) -> list[float]:
    out = []
    for _ in range(n):
        v = fn()
        if v is not None:
            out.append(v)
        time.sleep(gap)
    return out


def run(cluster, argv) -> dict:
    args = bl.finish_args(parser().parse_args(argv), FULL, SMOKE)
    t_start = time.perf_counter()
    bare = bl.BareActor.remote()
    bare_pid = ray.get(bare.pid.remote(), timeout=120)
    batches = [datagen.kv_batch(i * args.batch_rows, args.batch_rows) for i in range(4)]
    me = os.getpid()
    ok = True
    with bl.topic(cluster, "mem", 1, args.replication_factor) as name:
        producer = cluster.producer(acks="all")
        try:
            producer.send(name, b"v", b"k").result(timeout=60)
            leader = bl.wait_for_leader(cluster, name, 0)
            handle = ray.get_actor(replica_actor_name(name, 0, leader), namespace=cluster.namespace)
            rpid = bl.actor_pid(handle)
            time.sleep(args.settle_seconds)
            bare_idle = statistics.median(samples(lambda: bl.pss_mb(bare_pid), args.samples))
            rep_idle = statistics.median(samples(lambda: bl.pss_mb(rpid), args.samples))
            rep_rss_idle = bl.rss_mb(rpid)
            rep_idle_anon = bl.pss_parts_mb(rpid)["anon"]
            driver_before = bl.pss_mb(me)
            bl.log(f"memory: idle replica {rep_idle} MB PSS, bare actor {bare_idle} MB; load for {args.seconds} s ...")
            stop = threading.Event()
            sent = [0]

            def load():
                i = 0
                while not stop.is_set():
                    producer.send_batch(name, batches[i % len(batches)])
                    sent[0] += args.batch_rows
                    i += 1
                producer.flush(timeout=120)

            t = threading.Thread(target=load, daemon=True)
            with bl.Sampler(lambda: bl.pss_mb(rpid)) as rep_s, bl.Sampler(lambda: bl.pss_mb(bare_pid)) as bare_s, \
                    bl.Sampler(lambda: bl.pss_mb(me)) as drv_s, \
                    bl.Sampler(lambda: bl.pss_parts_mb(rpid)["anon"]) as anon_s:
                t.start()
                time.sleep(args.seconds)
                stop.set()
                t.join(timeout=180)
            driver_after = bl.pss_mb(me)
            time.sleep(args.after_seconds)
            rep_after = statistics.median(samples(lambda: bl.pss_mb(rpid), args.samples))
            rep_after_parts = bl.pss_parts_mb(rpid)
            bare_after = statistics.median(samples(lambda: bl.pss_mb(bare_pid), args.samples))
            size = cluster.admin().describe_topic(name).partitions[0].high_watermark
        finally:
            producer.close()
    ray.kill(bare)
    rep_load_max = max(rep_s.values) if rep_s.values else None
    rep_load_med = statistics.median(rep_s.values) if rep_s.values else None
    bare_load = statistics.median(bare_s.values) if bare_s.values else bare_idle
    res = {
        "bare_actor_pss_mb": bare_idle, "replica_idle_pss_mb": rep_idle, "replica_idle_rss_mb": rep_rss_idle,
        "extra_idle_mb": round(rep_idle - bare_idle, 1),
        "replica_load_pss_max_mb": rep_load_max, "replica_load_pss_median_mb": rep_load_med,
        "extra_load_max_mb": None if rep_load_max is None else round(rep_load_max - bare_load, 1),
        "replica_after_load_pss_mb": rep_after, "extra_after_load_mb": round(rep_after - bare_after, 1),
        # what the PSS under load is made of: the replica's own heap stays small; the rest is Ray's
        # object store (shmem: produce batches arrive through it) and segment page cache (file)
        "replica_idle_pss_anon_mb": rep_idle_anon,
        "replica_load_pss_anon_max_mb": max(anon_s.values, default=None),
        "replica_after_load_pss_parts_mb": rep_after_parts,
        "records_written_under_load": sent[0], "log_records": size,
        "driver_pss_before_mb": driver_before, "driver_pss_max_mb": max(drv_s.values) if drv_s.values else None,
        "driver_pss_after_mb": driver_after, "errors": 0,
    }
    ok = ok and rep_idle is not None and sent[0] > 0
    targets = [bl.target("Memory: replica idle <= 80 MB PSS over a bare actor", res["extra_idle_mb"], "<=", 80, "MB"),
               bl.target("Memory: replica under load <= 80 MB PSS over a bare actor", res["extra_load_max_mb"], "<=",
                         80, "MB")]
    settings = {"seconds": args.seconds, "replication_factor": args.replication_factor, "partitions": 1,
                "batch_rows": args.batch_rows, "source": "/proc/<pid>/smaps_rollup Pss", "unit": "MiB",
                "buffer_memory": 67108864}
    return bl.result("memory", "Memory", args, settings, {f"rf{args.replication_factor}": {"replica": res}},
                     targets, t_start, ok)


def main(argv=None) -> int:
    return bl.script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

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

The platform's share under load (`sink_*`): a `SinkActor` that receives the same batches through
Ray at the same rate and writes each to a file, keeping nothing, sampled the same way. Its growth
is what receiving Arrow batches through Ray's object store costs any actor; the replica's PSS
over it (`extra_load_max_over_sink_mb`) is the broker's own.

Also the driver's PSS before and after the load (the producer's memory is bounded by
buffer.memory, 64 MiB). Target (issue 7): a replica at most 80 MB PSS over a bare actor
(`extra_*_mb`, MB = MiB here).

Clients (`clients` in the JSON line; `--skip-clients` leaves them out): "the producer's and
consumer's memory stays bounded by buffer.memory and fetch limits, whatever the topic size". Each
client runs alone in a Ray actor of its own (`benchlib.ClientProcess`, a fresh process per
measurement) and its PSS is sampled from the driver every 0.05 s. For two amounts of data, 1x
(`--client-mb`, default 100 MiB of 116-byte records) and `--client-scale`x (default 4x), each on a
fresh `--client-partitions` (6) partition RF 1 topic:

- send_batch: a producer with buffer.memory `--client-buffer-mb` (16 MiB) writes the records in
  `--batch-rows`-row batches; its reserved bytes (`_used_bytes`, queued plus unacknowledged) are
  sampled every 5 ms inside the process;
- consume: a read_committed consumer with max.partition.fetch.bytes `--fetch-partition-mb` (1 MiB)
  and fetch.max.bytes `--fetch-max-mb` (8 MiB) reads the whole topic back;
- send: a producer with the same buffer.memory writes `--send-mb` (32 MiB: at 1x already twice
  buffer.memory, so both runs fill the buffer; 10 MiB did not, and the ratio compared a half-full
  buffer with a full one) x 1 or x scale of
  records with send() (appended to the same topic after the read).

Per run: PSS baseline (median after construction and a warm-up record), max during the run and
max minus baseline (`growth_mb`; also by kind: anon = heap, shmem = Ray's object store), next to
the configured bound. What matters: the growth does not grow with the data (targets: growth at
scale x / growth at 1x <= 1.5; producer's max reserved bytes / buffer.memory <= 1). Speed is not
asserted.
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

MiB = 1 << 20
RECORD_BYTES = 116   # 16-byte key + 100-byte value
FULL = {"seconds": 10.0, "replication_factor": 1, "batch_rows": 20_000, "settle_seconds": 1.0, "after_seconds": 2.0,
        "samples": 5, "client_mb": 100.0, "client_scale": 4, "send_mb": 32.0, "client_partitions": 6,
        "client_buffer_mb": 16.0, "fetch_partition_mb": 1.0, "fetch_max_mb": 8.0, "consume_passes": 4}
SMOKE = {"seconds": 0.5, "replication_factor": 1, "batch_rows": 500, "settle_seconds": 0.1, "after_seconds": 0.2,
         "samples": 2, "client_mb": 1.0, "client_scale": 4, "send_mb": 0.2, "client_partitions": 2,
         "client_buffer_mb": 1.0, "fetch_partition_mb": 0.0625, "fetch_max_mb": 0.5, "consume_passes": 2}


def parser():
    ap = bl.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, help="load duration (default 10)")
    ap.add_argument("--replication-factor", type=int, help="replication factor (default 1)")
    ap.add_argument("--batch-rows", type=int, help="rows per batch under load (default 20000)")
    ap.add_argument("--samples", type=int, help="PSS samples (0.1 s apart) for idle and after figures (default 5)")
    ap.add_argument("--settle-seconds", type=float, help="wait before the idle samples (default 1)")
    ap.add_argument("--after-seconds", type=float, help="wait after the load before the last samples (default 2)")
    ap.add_argument("--skip-clients", action="store_true", help="leave out the client (producer/consumer) section")
    ap.add_argument("--client-mb", type=float, help="clients: MiB of records at 1x (default 100)")
    ap.add_argument("--client-scale", type=int, help="clients: the larger amount, x 1x (default 4)")
    ap.add_argument("--send-mb", type=float, help="clients: MiB of records written with send() at 1x (default 32)")
    ap.add_argument("--client-partitions", type=int, help="clients: partitions of the topic (default 6)")
    ap.add_argument("--client-buffer-mb", type=float, help="clients: producer buffer.memory, MiB (default 16)")
    ap.add_argument("--fetch-partition-mb", type=float, help="clients: max.partition.fetch.bytes, MiB (default 1)")
    ap.add_argument("--fetch-max-mb", type=float, help="clients: fetch.max.bytes, MiB (default 8)")
    ap.add_argument("--consume-passes", type=int,
                    help="clients: reads of the scale-x topic by one consumer process (default 4)")
    return ap


def samples(fn, n: int = 5, gap: float = 0.1) -> list[float]:
    out = []
    for _ in range(n):
        v = fn()
        if v is not None:
            out.append(v)
        time.sleep(gap)
    return out


def _mb(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / MiB, 2)


def _measure(cluster, args, prepare: str, prepare_args: tuple, method: str, method_args: tuple) -> dict:
    """One client in a fresh `ClientProcess`: `prepare` (construction, warm-up), baseline PSS, then
    `method` while the driver samples the process's PSS; the method's figures plus the PSS ones."""
    actor = bl.ClientProcess.remote(cluster.namespace)
    try:
        pid = ray.get(actor.pid.remote(), timeout=120)
        ray.get(getattr(actor, prepare).remote(*prepare_args), timeout=120)
        time.sleep(args.settle_seconds)
        base = statistics.median(samples(lambda: bl.pss_mb(pid), args.samples))
        base_parts = bl.pss_parts_mb(pid)
        with bl.Sampler(lambda: bl.pss_mb(pid), 0.05) as pss_s, bl.Sampler(lambda: bl.pss_parts_mb(pid), 0.1) as parts_s:
            out = ray.get(getattr(actor, method).remote(*method_args), timeout=900)
        after = bl.pss_mb(pid)
    finally:
        ray.kill(actor)
    top = max(pss_s.values, default=base)
    out.update({"pss_baseline_mb": base, "pss_max_mb": top, "growth_mb": round(top - base, 1),
                "pss_after_mb": after, "pss_samples": len(pss_s.values)})
    for kind in ("anon", "shmem"):
        vals = [v[kind] for v in parts_s.values if v.get(kind) is not None]
        if vals and base_parts.get(kind) is not None:
            out[f"growth_{kind}_mb"] = round(max(vals) - base_parts[kind], 1)
    return out


def client_section(cluster, args) -> tuple[dict, list, bool, dict]:
    """The producer and consumer runs at 1x and scale x (see the module docstring):
    (results by size, targets, complete, settings)."""
    if args.client_scale < 2:
        raise SystemExit("--client-scale must be at least 2")
    parts = args.client_partitions
    buffer_memory = int(args.client_buffer_mb * MiB)
    fetch_partition = int(args.fetch_partition_mb * MiB)
    fetch_max = int(args.fetch_max_mb * MiB)
    pcfg = {"acks": "all", "buffer.memory": buffer_memory}
    ccfg = {"isolation.level": "read_committed", "auto.offset.reset": "earliest",
            "max.partition.fetch.bytes": fetch_partition, "fetch.max.bytes": fetch_max}
    sizes = {"1x": 1, f"{args.client_scale}x": args.client_scale}
    results: dict = {}
    ok = True
    for label, factor in sizes.items():
        batch_records = int(args.client_mb * factor * MiB // RECORD_BYTES)
        send_records = int(args.send_mb * factor * MiB // RECORD_BYTES)
        t0 = time.perf_counter()
        with bl.topic(cluster, "memc", parts, 1) as name:
            before = sum(bl.high_watermarks(cluster, name))
            prod = _measure(cluster, args, "open_producer", (name, pcfg, args.batch_rows), "produce",
                            (name, batch_records, False))
            written = sum(bl.high_watermarks(cluster, name)) - before
            prod["log_records"] = written
            cons = _measure(cluster, args, "open_consumer", (name, parts, ccfg), "consume",
                            (name, parts, ccfg, RECORD_BYTES))
            sent = _measure(cluster, args, "open_producer", (name, pcfg, args.batch_rows), "produce",
                            (name, send_records, True))
            sent["log_records"] = sum(bl.high_watermarks(cluster, name)) - before - written
            if factor == args.client_scale:
                passes = _measure(cluster, args, "open_consumer", (name, parts, ccfg), "consume_passes",
                                  (name, parts, ccfg, RECORD_BYTES, args.consume_passes))
                ok = ok and passes["complete"] and \
                    passes["records_per_pass"][0] == sum(bl.high_watermarks(cluster, name)) - before
        largest = cons.get("largest_batch_bytes") or 0
        for r in (prod, sent):
            r.update({"mb": round(r["records"] * RECORD_BYTES / MiB, 1), "buffer_memory_mb": _mb(buffer_memory),
                      "max_used_mb": _mb(r["max_used_bytes"])})
            ok = ok and r["errors"] == 0 and r["log_records"] == r["records"] + 2   # + the 2 warm-up records
        cons.update({"mb": round(cons["records"] * RECORD_BYTES / MiB, 1),
                     # held between polls: one fetch result per partition (a fetch returns at least one
                     # whole stored batch, so a batch above max.partition.fetch.bytes comes alone)
                     "held_bound_mb": _mb(parts * max(fetch_partition, largest)),
                     "poll_bound_mb": _mb(fetch_max), "max_held_mb": _mb(cons["max_held_bytes"]),
                     "max_poll_mb": _mb(cons["max_poll_bytes"]), "largest_batch_mb": _mb(largest)})
        ok = ok and cons["complete"] and cons["records"] == written
        results[label] = {"send_batch": prod, "consume": cons, "send": sent}
        bl.log(f"memory/clients {label}: send_batch {prod['mb']} MiB growth {prod['growth_mb']} MB, consume growth "
               f"{cons['growth_mb']} MB, send() {sent['mb']} MiB growth {sent['growth_mb']} MB "
               f"({time.perf_counter() - t0:.1f} s)")
    small, big = results["1x"], results[f"{args.client_scale}x"]
    targets = []
    for mode, what in (("send_batch", "producer send_batch"), ("send", "producer send()"),
                       ("consume", "read_committed consumer")):
        g1, g2 = small[mode]["growth_mb"], big[mode]["growth_mb"]
        ratio = round(g2 / g1, 2) if g1 and g1 > 0 else None
        targets.append(bl.target(f"Memory: {what} PSS growth, {args.client_scale}x data / 1x data <= 1.5",
                                 ratio, "<=", 1.5))
    base = passes["pss_baseline_mb"]
    growth = [round(p - base, 1) if p is not None else None for p in passes["pss_peak_per_pass_mb"]]
    passes.update({"growth_per_pass_mb": growth, "mb_per_pass": round(passes["records_per_pass"][0] * RECORD_BYTES / MiB, 1)})
    if None not in growth and growth[0] > 0:
        targets.append(bl.target(f"Memory: read_committed consumer PSS growth in one process, after reading the "
                                 f"{args.client_scale}x topic {len(growth)} times / once <= 1.5",
                                 round(max(growth) / growth[0], 2), "<=", 1.5))
    used = max(r[m]["max_used_bytes"] for r in results.values() for m in ("send_batch", "send"))
    results["consume_passes"] = passes
    targets.append(bl.target("Memory: producer reserved bytes (sampled max) / buffer.memory <= 1",
                             round(used / buffer_memory, 3), "<=", 1.0))
    settings = {"client_partitions": parts, "client_replication_factor": 1, "client_sizes_mib":
                {k: args.client_mb * f for k, f in sizes.items()},
                "client_send_mib": {k: args.send_mb * f for k, f in sizes.items()},
                "producer_config": pcfg, "consumer_config": ccfg, "client_pss_sample_s": 0.05}
    return results, targets, ok, settings


def sink_phase(args, batches: list, batches_per_s: float) -> dict:
    """The platform baseline under load: a `SinkActor` receives the same batches at the rate the
    replica took them (at most 5 calls in flight, as the producer's max.in.flight), sampled like the
    replica. What it gains under load is what receiving Arrow batches through Ray costs any actor."""
    sink = bl.SinkActor.remote()
    try:
        pid = ray.get(sink.pid.remote(), timeout=120)
        ray.get(sink.take.remote(batches[0]), timeout=120)        # pyarrow imported, as in a replica
        time.sleep(args.settle_seconds)
        idle = statistics.median(samples(lambda: bl.pss_mb(pid), args.samples))
        idle_parts = bl.pss_parts_mb(pid)
        gap = 1.0 / max(batches_per_s, 1e-3)
        inflight: list = []
        sent = 0
        with bl.Sampler(lambda: bl.pss_mb(pid)) as pss_s, bl.Sampler(lambda: bl.pss_parts_mb(pid)) as parts_s:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                if len(inflight) >= 5:
                    ray.get(inflight.pop(0), timeout=120)
                inflight.append(sink.take.remote(batches[sent % len(batches)]))
                sent += 1
                time.sleep(max(0.0, t0 + sent * gap - time.perf_counter()))
            ray.get(inflight, timeout=120)
        ray.get(sink.close.remote(), timeout=60)
    finally:
        ray.kill(sink)
    shmem = [v["shmem"] for v in parts_s.values if v.get("shmem") is not None]
    return {"sink_idle_pss_mb": idle, "sink_load_pss_max_mb": max(pss_s.values, default=None),
            "sink_idle_pss_shmem_mb": idle_parts.get("shmem"), "sink_load_pss_shmem_max_mb": max(shmem, default=None),
            "sink_batches": sent, "sink_batches_per_s": round(batches_per_s, 1)}


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
    sink = sink_phase(args, batches, sent[0] / args.batch_rows / args.seconds)
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
        # the platform baseline: a bare actor receiving the same batches at the same rate
        **sink,
        "extra_load_max_over_sink_mb": None if rep_load_max is None or sink["sink_load_pss_max_mb"] is None
        else round(rep_load_max - sink["sink_load_pss_max_mb"], 1),
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
    clients = None
    if not args.skip_clients:
        clients, client_targets, client_ok, client_settings = client_section(cluster, args)
        targets += client_targets
        settings.update(client_settings)
        ok = ok and client_ok
    out = bl.result("memory", "Memory", args, settings, {f"rf{args.replication_factor}": {"replica": res}},
                    targets, t_start, ok)
    if clients is not None:
        out["clients"] = clients
    return out


def main(argv=None) -> int:
    return bl.script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

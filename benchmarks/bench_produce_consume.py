"""Produce/consume throughput and latency of ray_broker (in the spirit of kafka-producer-perf-test).

    python benchmarks/bench_produce_consume.py            # full run (about a minute on 2 cores)
    python benchmarks/bench_produce_consume.py --smoke    # tiny counts, 1 partition, RF 1: seconds plus Ray start-up

Setup: an embedded broker (`rb.connect`, data in a fresh temp dir), one topic of 6 partitions per
replication factor (1 and 3; min.insync.replicas 1), records of a 16-byte key and a 100-byte value,
producer acks=all with default batching (batch.size 1 MiB, linger.ms 5).

Measured per replication factor:
- send_batch: Arrow RecordBatches of `--batch-rows` rows (built before timing) handed to
  `send_batch`; throughput = records / (last acknowledgement - first call); latency per call =
  acknowledgement time (future completion callback) - call time.
- send: `--send-records` records one by one with `send()`; latency per record the same way. Calls are
  issued back to back (like `--throughput -1`), so latency includes time queued behind earlier records.
- send_batch_1_in_flight / send_1_in_flight: `--latency-calls` calls, each waiting for its
  acknowledgement before the next: latency without queueing (linger.ms included for send()).
- consume: a read_committed consumer reads every record of the topic back from offset 0.

Prints progress to stderr and ONE JSON line of figures to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import threading
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a checkout
import benchlib as bl  # noqa: E402
import ray_broker as rb  # noqa: E402
from ray_broker.testing import datagen  # noqa: E402

KEY_BYTES = 16
VALUE_BYTES = 100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(samples: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(samples) * 1000.0, q)), 3) if samples else None


def make_batch(start: int, rows: int) -> pa.RecordBatch:
    return datagen.kv_batch(start, rows, KEY_BYTES, VALUE_BYTES)


class Latencies:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.samples: list[float] = []
        self.last_done = 0.0
        self.errors = 0

    def callback(self, started: float):
        def done(fut) -> None:
            now = time.perf_counter()
            with self.lock:
                self.samples.append(now - started)
                self.last_done = max(self.last_done, now)
                if fut.exception(0) is not None:
                    self.errors += 1
        return done


def bench_send_batch(producer, topic: str, records: int, batch_rows: int) -> dict:
    batches = [make_batch(s, min(batch_rows, records - s)) for s in range(0, records, batch_rows)]
    lat = Latencies()
    t0 = time.perf_counter()
    for b in batches:
        producer.send_batch(topic, b).add_done_callback(lat.callback(time.perf_counter()))
    producer.flush(timeout=600)
    elapsed = max(lat.last_done, time.perf_counter() if not lat.last_done else lat.last_done) - t0
    return summarize(records, len(batches), elapsed, lat)


def bench_send(producer, topic: str, records: int) -> dict:
    keys, values = datagen.kv_lists(0, records, KEY_BYTES, VALUE_BYTES, prefix=b"s", fill=b"s")
    lat = Latencies()
    t0 = time.perf_counter()
    for k, v in zip(keys, values):
        producer.send(topic, value=v, key=k).add_done_callback(lat.callback(time.perf_counter()))
    producer.flush(timeout=600)
    elapsed = (lat.last_done or time.perf_counter()) - t0
    return summarize(records, records, elapsed, lat)


def bench_one_in_flight(producer, topic: str, calls: int, rows: int) -> dict:
    """Closed loop: each call waits for its acknowledgement before the next (latency without queueing).
    rows == 1 uses send(), otherwise send_batch() of `rows` rows."""
    batch = make_batch(10**9, rows) if rows > 1 else None
    lkeys, lvalues = datagen.kv_lists(0, calls, KEY_BYTES, VALUE_BYTES, prefix=b"l", fill=b"l")
    lat = Latencies()
    t0 = time.perf_counter()
    for i in range(calls):
        started = time.perf_counter()
        if batch is None:
            fut = producer.send(topic, value=lvalues[i], key=lkeys[i])
        else:
            fut = producer.send_batch(topic, batch)
        fut.result(timeout=120)
        lat.callback(started)(fut)
    elapsed = time.perf_counter() - t0
    return summarize(calls * rows, calls, elapsed, lat)


def summarize(records: int, calls: int, elapsed: float, lat: Latencies) -> dict:
    return {"records": records, "calls": calls, "seconds": round(elapsed, 3),
            "records_per_s": round(records / elapsed, 1), "mb_per_s": round(records * (KEY_BYTES + VALUE_BYTES)
                                                                            / elapsed / 1e6, 2),
            "p50_ms": pct(lat.samples, 50), "p99_ms": pct(lat.samples, 99), "errors": lat.errors}


def bench_consume(cluster, topic: str, partitions: int, expect: int, timeout_s: float = 300.0) -> dict:
    tps = [rb.TopicPartition(topic, p) for p in range(partitions)]
    consumer = cluster.consumer({"isolation_level": "read_committed", "auto_offset_reset": "earliest"})
    consumer.assign(tps)
    got = 0
    nbytes = 0
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while got < expect and time.monotonic() < deadline:
        for _, batch in consumer.poll(timeout=1.0).items():
            got += batch.num_rows
            nbytes += batch.nbytes
    elapsed = time.perf_counter() - t0
    consumer.close()
    return {"records": got, "expected": expect, "seconds": round(elapsed, 3),
            "records_per_s": round(got / elapsed, 1),
            "mb_per_s": round(got * (KEY_BYTES + VALUE_BYTES) / elapsed / 1e6, 2),
            "arrow_mb_per_s": round(nbytes / elapsed / 1e6, 2)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny counts: checks the benchmark runs, in seconds")
    ap.add_argument("--records", type=int, default=300_000, help="records per send_batch run (default 300000)")
    ap.add_argument("--send-records", type=int, default=30_000, help="records per send() run (default 30000)")
    ap.add_argument("--batch-rows", type=int, default=10_000, help="rows per Arrow batch (default 10000)")
    ap.add_argument("--latency-calls", type=int, default=30,
                    help="calls of each kind in the one-in-flight latency runs (default 30)")
    ap.add_argument("--partitions", type=int, default=None, help="partitions per topic (default 6; smoke: 1)")
    ap.add_argument("--replication-factors", default=None, help="comma-separated (default 1,3; smoke: 1)")
    ap.add_argument("--data-dir", default=None, help="broker data dir (default: a fresh temp dir, removed after)")
    return ap


def run(cluster, argv) -> dict:
    """The benchmark on a broker given to it (see benchlib's script protocol); returns the JSON object."""
    args = parser().parse_args(argv)
    if args.smoke:
        args.records, args.send_records, args.batch_rows, args.latency_calls = 2_000, 300, 500, 5
    if args.partitions is None:
        args.partitions = 1 if args.smoke else 6  # smoke: fewer replica actors to start
    if args.replication_factors is None:
        args.replication_factors = "1" if args.smoke else "1,3"   # smoke: W1 covers RF 3
    rfs = [int(x) for x in args.replication_factors.split(",") if x.strip()]
    t_start = time.perf_counter()
    results = {}
    for rf in rfs:
        with bl.topic(cluster, f"bench-rf{rf}", args.partitions, rf, {"min.insync.replicas": 1}) as topic:
            producer = cluster.producer({"acks": "all"})
            try:
                log(f"rf={rf}: send_batch {args.records} records ...")
                r_batch = bench_send_batch(producer, topic, args.records, args.batch_rows)
                log(f"rf={rf}: send() {args.send_records} records ...")
                r_send = bench_send(producer, topic, args.send_records)
                log(f"rf={rf}: one call in flight: {args.latency_calls} x send_batch({args.batch_rows}), "
                    f"{args.latency_calls} x send() ...")
                r_batch1 = bench_one_in_flight(producer, topic, args.latency_calls, args.batch_rows)
                r_send1 = bench_one_in_flight(producer, topic, args.latency_calls, 1)
            finally:
                producer.close()
            log(f"rf={rf}: consume ...")
            total = args.records + args.send_records + args.latency_calls * (args.batch_rows + 1)
            r_cons = bench_consume(cluster, topic, args.partitions, total)
            results[f"rf{rf}"] = {"send_batch": r_batch, "send": r_send, "send_batch_1_in_flight": r_batch1,
                                  "send_1_in_flight": r_send1, "consume": r_cons}
    errors = sum(r[m].get("errors", 0) for r in results.values() for m in r)
    short = sum(r["consume"]["records"] != r["consume"]["expected"] for r in results.values())
    env = bl.machine()
    return {
        "benchmark": "produce_consume",
        "workload": "W1/W3/W4 (non-transactional)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "ok": not errors and not short,
        "settings": {"partitions": args.partitions, "replication_factors": rfs, "key_bytes": KEY_BYTES,
                     "value_bytes": VALUE_BYTES, "acks": "all", "records": args.records,
                     "send_records": args.send_records, "batch_rows": args.batch_rows,
                     "latency_calls": args.latency_calls,
                     "isolation_level": "read_committed", "min_insync_replicas": 1},
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": env["ray"],
                        "pyarrow": env["pyarrow"], "ray_broker": rb.__version__, **env},
        "results": results,
        "targets": [],
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def main(argv=None) -> int:
    return bl.script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

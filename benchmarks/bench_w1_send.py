"""W1: per-record `producer.send()` from one Python thread, idempotent, acks=all, RF 1 and 3.

    python benchmarks/bench_w1_send.py            # 10 s per replication factor
    python benchmarks/bench_w1_send.py --smoke

One topic per replication factor (`--partitions`, default 6; min.insync.replicas min(2, RF)); records
of a 16-byte key and a 100-byte value (`datagen.kv_lists`, distinct keys, pre-built), sent one by
one with `send()` for `--seconds` (or `--max-records`), then `flush()`. The producer uses the
defaults (acks=all, so idempotent; linger.ms 5, batch.size 1 MiB).

Figures per RF: records_per_s = records / (first send -> flush returned); send_calls_per_s = records
/ duration of the send loop alone (what the caller's thread sustains); acked = sum of the partitions'
high watermarks afterwards (must equal records). Target (issue 7): >= 300k records/s.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from ray_broker.testing import datagen  # noqa: E402

FULL = {"seconds": 10.0, "max_records": 5_000_000, "partitions": 6, "replication_factors": "1,3", "pool": 200_000}
SMOKE = {"seconds": 0.3, "max_records": 1_000, "partitions": 1, "replication_factors": "1,3", "pool": 2_000}


def parser():
    ap = bl.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, help="send for this long per RF (default 10)")
    ap.add_argument("--max-records", type=int, help="stop earlier after this many records (default 5M)")
    ap.add_argument("--partitions", type=int, help="partitions (default 6)")
    ap.add_argument("--replication-factors", help="comma-separated (default 1,3)")
    ap.add_argument("--pool", type=int, help="distinct pre-built records, cycled (default 200000)")
    return ap


def send_loop(producer, topic: str, keys: list, values: list, seconds: float, max_records: int) -> tuple[int, float]:
    send = producer.send
    n = 0
    pool = len(keys)
    t0 = time.perf_counter()
    end = t0 + seconds
    while n < max_records:
        i = n % pool
        j = min(pool, i + 1000, i + max_records - n)
        for k, v in zip(keys[i:j], values[i:j]):
            send(topic, v, k)
        n += j - i
        if time.perf_counter() >= end:
            break
    return n, time.perf_counter() - t0


def run(cluster, argv) -> dict:
    args = bl.finish_args(parser().parse_args(argv), FULL, SMOKE)
    t_start = time.perf_counter()
    rfs = bl.ints(args.replication_factors)
    keys, values = datagen.kv_lists(0, args.pool)
    rec_bytes = datagen.record_bytes()
    results, targets, ok = {}, [], True
    for rf in rfs:
        with bl.topic(cluster, f"w1-rf{rf}", args.partitions, rf) as name:
            producer = cluster.producer(acks="all")
            try:
                assert producer.idempotence.enabled, "acks=all must make the producer idempotent"
                producer.send(name, b"warm-up", b"warm-up").result(timeout=60)   # metadata, producer id
                base = sum(bl.high_watermarks(cluster, name))
                bl.log(f"W1 rf={rf}: send() for {args.seconds} s ...")
                t0 = time.perf_counter()
                n, loop_s = send_loop(producer, name, keys, values, args.seconds, args.max_records)
                producer.flush(timeout=300)
                elapsed = time.perf_counter() - t0
            finally:
                producer.close()
            acked = sum(bl.high_watermarks(cluster, name)) - base
            r = {"records": n, "acked": acked, "seconds": bl.r3(elapsed), "records_per_s": bl.rate(n, elapsed),
                 "mb_per_s": bl.mb_per_s(n * rec_bytes, elapsed), "send_loop_seconds": bl.r3(loop_s),
                 "send_calls_per_s": bl.rate(n, loop_s), "errors": n - acked}
            ok = ok and acked == n
            results[f"rf{rf}"] = {"send": r}
            bl.log(f"W1 rf={rf}: {r}")
            targets.append(bl.target(f"W1 send() rf{rf} >= 300k records/s", r["records_per_s"], ">=", 300_000,
                                     "records/s"))
    settings = {"partitions": args.partitions, "replication_factors": rfs, "seconds": args.seconds,
                "max_records": args.max_records, "key_bytes": datagen.KEY_BYTES,
                "value_bytes": datagen.VALUE_BYTES, "acks": "all", "idempotent": True, "linger_ms": 5,
                "batch_size": 1048576, "min_insync_replicas": "min(2, RF)", "threads": 1}
    return bl.result("w1_send", "W1", args, settings, results, targets, t_start, ok)


def main(argv=None) -> int:
    return bl.script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

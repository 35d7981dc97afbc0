"""W2: per-record `producer.send()` from one Python thread, transactional, a commit every 100 ms.

    python benchmarks/bench_w2_txn_send.py            # 10 s per replication factor
    python benchmarks/bench_w2_txn_send.py --smoke

One topic per replication factor (`--replication-factors`, default 1; `--partitions` 6); records of
a 16-byte key and a 100-byte value, pre-built. A transactional producer (acks=all, linger.ms 5,
batch.size 1 MiB) loops: begin_transaction(); send() records for `--commit-interval-ms`;
commit_transaction() (which flushes first); for `--seconds`.

Figures per RF: records_per_s = committed records / wall time (commit time included), commit call
latency p50/p99/max (flush of the transaction's records included), commits. Every commit succeeded
means every record was acknowledged. Target (issue 7): >= 300k records/s.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from ray_broker.testing import datagen  # noqa: E402

FULL = {"seconds": 10.0, "partitions": 6, "replication_factors": "1", "commit_interval_ms": 100, "pool": 200_000}
SMOKE = {"seconds": 0.5, "partitions": 1, "replication_factors": "1", "commit_interval_ms": 100, "pool": 1_000}


def parser():
    ap = bl.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, help="run this long per RF (default 10)")
    ap.add_argument("--partitions", type=int, help="partitions (default 6)")
    ap.add_argument("--replication-factors", help="comma-separated (default 1)")
    ap.add_argument("--commit-interval-ms", type=int, help="transaction length (default 100)")
    ap.add_argument("--pool", type=int, help="distinct pre-built records, cycled (default 200000)")
    return ap


def run(cluster, argv) -> dict:
    args = bl.finish_args(parser().parse_args(argv), FULL, SMOKE)
    t_start = time.perf_counter()
    rfs = bl.ints(args.replication_factors)
    keys, values = datagen.kv_lists(0, args.pool)
    rec_bytes = datagen.record_bytes()
    results, targets = {}, []
    for rf in rfs:
        with bl.topic(cluster, f"w2-rf{rf}", args.partitions, rf) as name:
            producer = cluster.producer(acks="all", transactional_id=bl.unique("w2"))
            try:
                producer.init_transactions()
                with producer.transaction():
                    producer.send(name, b"warm-up", b"warm-up")
                pos = [0]
                pool = len(keys)
                send = producer.send

                def step() -> int:
                    i = pos[0] % pool
                    j = min(pool, i + 200)
                    for k, v in zip(keys[i:j], values[i:j]):
                        send(name, v, k)
                    pos[0] += j - i
                    return j - i

                loop = bl.TxnLoop(producer, args.commit_interval_ms / 1000.0)
                bl.log(f"W2 rf={rf}: transactional send() for {args.seconds} s ...")
                loop.run(step, args.seconds)
            finally:
                producer.close()
            r = loop.figures(rec_bytes)
            r["errors"] = 0
            results[f"rf{rf}"] = {"txn_send": r}
            bl.log(f"W2 rf={rf}: {r}")
            targets.append(bl.target(f"W2 txn send() rf{rf} >= 300k records/s", r["records_per_s"], ">=", 300_000,
                                     "records/s"))
    settings = {"partitions": args.partitions, "replication_factors": rfs, "seconds": args.seconds,
                "commit_interval_ms": args.commit_interval_ms, "key_bytes": datagen.KEY_BYTES,
                "value_bytes": datagen.VALUE_BYTES, "acks": "all", "transactional": True, "linger_ms": 5,
                "batch_size": 1048576, "threads": 1}
    return bl.result("w2_txn_send", "W2", args, settings, results, targets, t_start)


def main(argv=None) -> int:
    return bl.script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

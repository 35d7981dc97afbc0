"""W6: a topic with a declared Arrow schema (16 float32 features + an int32 label): produce and consume MB/s.

    python benchmarks/bench_w6_schema.py            # 10 s of producing
    python benchmarks/bench_w6_schema.py --smoke

One topic (`--partitions` 6, `--replication-factor` 1) created with `schema=datagen.feature_schema(16)`
(68 bytes per row). Produce: pre-built batches of `--batch-rows` rows (default 100,000 = 6.8 MB)
handed to `send_batch()` back to back for `--seconds` by an idempotent acks=all producer (no key
column: the sticky partitioner sends each batch to one partition), then flush. Consume: one
read_committed consumer reads everything back. MB/s = rows x 68 bytes / seconds (the column data;
arrow_mb_per_s also counts the offset and timestamp columns the consumer receives).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from ray_broker.testing import datagen  # noqa: E402

FULL = {"seconds": 10.0, "partitions": 6, "replication_factor": 1, "batch_rows": 100_000, "features": 16}
SMOKE = {"seconds": 0.5, "partitions": 1, "replication_factor": 1, "batch_rows": 1_000, "features": 16}


def parser():
    ap = bl.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, help="produce for this long (default 10)")
    ap.add_argument("--partitions", type=int, help="partitions (default 6)")
    ap.add_argument("--replication-factor", type=int, help="replication factor (default 1)")
    ap.add_argument("--batch-rows", type=int, help="rows per batch (default 100000)")
    ap.add_argument("--features", type=int, help="float32 feature columns (default 16)")
    return ap


def run(cluster, argv) -> dict:
    args = bl.finish_args(parser().parse_args(argv), FULL, SMOKE)
    t_start = time.perf_counter()
    schema = datagen.feature_schema(args.features)
    row_bytes = 4 * args.features + 4
    batches = [datagen.feature_batch(i * args.batch_rows, args.batch_rows, args.features) for i in range(4)]
    results, ok = {}, True
    with bl.topic(cluster, "w6", args.partitions, args.replication_factor, schema=schema) as name:
        producer = cluster.producer(acks="all")
        try:
            producer.send_batch(name, batches[0].slice(0, 1)).result(timeout=60)   # warm-up
            base = sum(bl.high_watermarks(cluster, name))
            bl.log(f"W6: send_batch({args.batch_rows} feature rows) for {args.seconds} s ...")
            rows = 0
            futs = []
            t0 = time.perf_counter()
            end = t0 + args.seconds
            i = 0
            while time.perf_counter() < end:
                futs.append(producer.send_batch(name, batches[i % len(batches)]))
                rows += args.batch_rows
                i += 1
            producer.flush(timeout=300)
            elapsed = time.perf_counter() - t0
            errors = sum(1 for f in futs if f.exception(0) is not None)
        finally:
            producer.close()
        acked = sum(bl.high_watermarks(cluster, name)) - base
        prod = {"records": rows, "acked": acked, "seconds": bl.r3(elapsed), "records_per_s": bl.rate(rows, elapsed),
                "mb_per_s": bl.mb_per_s(rows * row_bytes, elapsed), "batches": i, "errors": errors}
        bl.log(f"W6 produce: {prod}")
        cons = bl.consume_all(cluster, name, args.partitions, "read_committed", record_bytes=row_bytes)
        cons["expected"] = acked + 1
        bl.log(f"W6 consume: {cons}")
        ok = errors == 0 and acked == rows and cons["records"] == acked + 1
        results[f"rf{args.replication_factor}"] = {"produce": prod, "consume": cons}
    settings = {"partitions": args.partitions, "replication_factor": args.replication_factor,
                "seconds": args.seconds, "batch_rows": args.batch_rows, "features": args.features,
                "schema": "f0..f{} float32, label int32".format(args.features - 1), "row_bytes": row_bytes,
                "batch_arrow_bytes": batches[0].nbytes, "acks": "all", "idempotent": True,
                "isolation_level": "read_committed"}
    return bl.result("w6_schema", "W6", args, settings, results, [], t_start, ok)


def main(argv=None) -> int:
    return bl.script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

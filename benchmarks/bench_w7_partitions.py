"""W7: throughput as partitions grow (1, 3, 6, 12) on this machine.

    python benchmarks/bench_w7_partitions.py            # per count: 6 s of producing, then 6 s of the floor
    python benchmarks/bench_w7_partitions.py --smoke

Per partition count: a fresh topic (`--replication-factor` 1), the W3 loop (transactional
send_batch of `--batch-rows`-row keyed batches, default 50,000, a commit every 100 ms) for `--seconds`, then one
read_committed consumer reads the topic back (W4's consumer). The topic is deleted before the next
count. Figures: produce and consume records/s per count, and each relative to 1 partition.
Target (issue 7): no throughput drop as partitions grow (reported: the lowest ratio to the best
count at or below it, which must be >= 0.9 to count as "no drop"). After each count's produce
run, the platform floor (`benchlib.PlatformFloor`, see W3) at that count: does the platform itself
drop as partitions (actor processes) grow, and how far is the broker from it at each count.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from bench_w3_send_batch import produce_txn_batches  # noqa: E402
from ray_broker.testing import datagen  # noqa: E402

# 50,000 rows (7.2 MB): a 60,000-row batch to ONE partition encodes above the 8 MiB max.message.bytes and
# send_batch does not split it (a client bug, see RESULTS.md)
FULL = {"partition_counts": "1,3,6,12", "seconds": 6.0, "replication_factor": 1, "batch_rows": 50_000,
        "floor_seconds": None}
SMOKE = {"partition_counts": "1,2", "seconds": 0.5, "replication_factor": 1, "batch_rows": 500, "floor_seconds": 0.3}


def parser():
    ap = bl.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--partition-counts", help="comma-separated (default 1,3,6,12)")
    ap.add_argument("--seconds", type=float, help="produce for this long per count (default 6)")
    ap.add_argument("--replication-factor", type=int, help="replication factor (default 1)")
    ap.add_argument("--batch-rows", type=int, help="rows per Arrow batch (default 50000)")
    ap.add_argument("--floor-seconds", type=float,
                    help="after each count's produce run, the platform floor (benchlib.PlatformFloor) at that "
                         "count for this long, 0 = not at all (default: --seconds)")
    return ap


def min_ratio_to_best_so_far(rates: list[float]) -> float | None:
    return min((r / max(rates[:i + 1]) for i, r in enumerate(rates) if max(rates[:i + 1]) > 0), default=None)


def run(cluster, argv) -> dict:
    args = bl.finish_args(parser().parse_args(argv), FULL, SMOKE)
    t_start = time.perf_counter()
    counts = bl.ints(args.partition_counts)
    rec_bytes = datagen.record_bytes()
    floor_s = args.seconds if args.floor_seconds is None else args.floor_seconds
    batches = [datagen.kv_batch(i * args.batch_rows, args.batch_rows) for i in range(6)]
    results, ok = {}, True
    for n in counts:
        with bl.topic(cluster, f"w7-p{n}", n, args.replication_factor) as name:
            bl.log(f"W7 partitions={n}: produce {args.seconds} s, then consume ...")
            loop = produce_txn_batches(cluster, name, batches, args.seconds, 0.1, prefix="w7")
            prod = loop.figures(rec_bytes)
            floor = None
            if floor_s > 0:
                pf = bl.PlatformFloor(batches, n, args.replication_factor)
                try:
                    floor = bl.floor_figures(prod["records_per_s"], [pf.run(floor_s)])
                finally:
                    pf.close()
            bl.wait_stable(cluster, name)
            cons = bl.consume_all(cluster, name, n, "read_committed", record_bytes=rec_bytes)
            cons["expected"] = loop.records
            ok = ok and cons["records"] == loop.records
            results[f"p{n}"] = {"txn_send_batch": prod, "consume": cons, **(floor or {})}
            bl.log(f"W7 partitions={n}: produce {prod['records_per_s']:,.0f}/s consume {cons['records_per_s']:,.0f}/s"
                   + (f" floor {floor['platform_floor']['records_per_s']:,.0f}/s" if floor else ""))
    targets = []
    for mode in ("txn_send_batch", "consume"):
        rates = [results[f"p{n}"][mode]["records_per_s"] for n in counts]
        base = rates[0]
        for n, r in zip(counts, rates):
            results[f"p{n}"][mode]["vs_1st_count"] = round(r / base, 3) if base else None
        worst = min_ratio_to_best_so_far(rates)
        targets.append(bl.target(f"W7 {mode}: no drop as partitions grow (min ratio to best so far >= 0.9)",
                                 None if worst is None else round(worst, 3), ">=", 0.9, "ratio"))
    settings = {"partition_counts": counts, "seconds": args.seconds, "replication_factor": args.replication_factor,
                "batch_rows": args.batch_rows, "commit_interval_ms": 100, "key_bytes": datagen.KEY_BYTES,
                "value_bytes": datagen.VALUE_BYTES, "isolation_level": "read_committed", "floor_seconds": floor_s}
    out = bl.result("w7_partitions", "W7", args, settings, results, targets, t_start, ok)
    if floor_s > 0:   # does the platform itself drop as partitions grow?
        worst = min_ratio_to_best_so_far([results[f"p{n}"]["platform_floor"]["records_per_s"] for n in counts])
        out["platform_floor"] = {"min_ratio_to_best_so_far": None if worst is None else bl.r3(worst)}
    return out


def main(argv=None) -> int:
    return bl.script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

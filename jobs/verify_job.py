"""Verification as a Ray job: run the Jepsen-style workloads + nemesis against a deployed broker.

    ray job submit --address http://head:8265 --working-dir . -- \\
        python jobs/verify_job.py --workload all --seconds 300 --seed 7 --report /tmp/verify.json
    RAY_ADDRESS=host:6379 python jobs/verify_job.py --seconds 120     # driver outside the cluster
    python jobs/verify_job.py --seconds 60                             # no cluster: embedded Ray + broker

On an existing cluster (RAY_ADDRESS set, as `ray job submit` does) it attaches to the broker in
`--namespace` and creates fresh `verify-<run id>-*` topics; `restart_cluster` is not available
there (the job would stop its own cluster). Prints the anomaly table, writes the report JSON (and
the history next to it) and exits with status 1 on any anomaly. See docs/verification.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ray_broker.verification.runner import run_verify  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="all", help="queue, txn or all")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", default="verify_report.json")
    ap.add_argument("--history", default=None)
    ap.add_argument("--faults", default=None,
                    help="comma-separated fault kinds, 'all' or 'none' (default: every kind but "
                         "kill_group_coordinator, restart_broker, restart_cluster)")
    ap.add_argument("--fault-interval", type=float, default=5.0)
    ap.add_argument("--producers", type=int, default=3)
    ap.add_argument("--namespace", default="ray_broker")
    ap.add_argument("--data-dir", default=None, help="embedded runs only (default: a temp dir)")
    args = ap.parse_args(argv)
    out = run_verify(workload=args.workload, seconds=args.seconds, seed=args.seed, report_path=args.report,
                     faults=args.faults, data_dir=args.data_dir, namespace=args.namespace,
                     fault_interval=args.fault_interval, producers=args.producers, history_path=args.history)
    return 0 if out["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())

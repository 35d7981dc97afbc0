"""Run every benchmarks/bench_*.py script and print a table of its figures.

    python benchmarks/run_all.py            # full runs
    python benchmarks/run_all.py --smoke    # each script in --smoke mode
    python benchmarks/run_all.py --json out.jsonl   # also keep the raw JSON lines

Each script prints progress to stderr and ONE JSON line to stdout; this runner collects those lines.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def scripts() -> list[str]:
    return sorted(glob.glob(os.path.join(HERE, "bench_*.py")))


def rows_for(result: dict) -> list[list[str]]:
    rows = []
    for setting, modes in result.get("results", {}).items():
        for mode, r in modes.items():
            rows.append([result.get("benchmark", "?"), setting, mode, f"{r.get('records_per_s', 0):,.0f}",
                         f"{r.get('mb_per_s', 0):,.2f}",
                         "-" if r.get("p50_ms") is None else f"{r['p50_ms']:.2f}",
                         "-" if r.get("p99_ms") is None else f"{r['p99_ms']:.2f}"])
    return rows


def print_table(rows: list[list[str]]) -> None:
    header = ["benchmark", "setting", "mode", "records/s", "MB/s", "p50 ms", "p99 ms"]
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) if j >= 3 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="run each benchmark in --smoke mode")
    ap.add_argument("--list", action="store_true", help="list the benchmark scripts and exit")
    ap.add_argument("--json", metavar="FILE", help="append each script's JSON line to FILE")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per script")
    args = ap.parse_args(argv)
    if args.list:
        for s in scripts():
            print(os.path.relpath(s, os.path.dirname(HERE)))
        return 0
    rows, failed = [], []
    for script in scripts():
        name = os.path.basename(script)
        print(f"running {name} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, script] + (["--smoke"] if args.smoke else [])
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            failed.append(f"{name}: timed out")
            continue
        lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
        if p.returncode != 0 or not lines:
            failed.append(f"{name}: exit {p.returncode}")
            if not lines:
                continue
        result = json.loads(lines[-1])
        if args.json:
            with open(args.json, "a") as f:
                f.write(lines[-1] + "\n")
        rows += rows_for(result)
    print_table(rows)
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

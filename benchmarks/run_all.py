"""Run every benchmarks/bench_*.py script and print a table of its figures.

    python benchmarks/run_all.py                    # full runs, each script in its own process (own Ray)
    python benchmarks/run_all.py --smoke            # each in --smoke mode, all in THIS process on ONE Ray
    python benchmarks/run_all.py --json out.jsonl   # also keep the raw JSON lines
    python benchmarks/run_all.py --only w1,w5       # scripts whose name contains one of these
    python benchmarks/run_all.py --format md        # the tables as Markdown (for RESULTS.md)
    python benchmarks/run_all.py --list

Each script prints progress to stderr and ONE JSON line to stdout; this runner collects those lines
(or, in-process, the objects its `run(cluster, argv)` returns) and prints a table of figures and
one of issue 7's targets (met / missed). `bench_peer.py` (the side-by-side peer run; it installs
packages) is only included when RB_BENCH_PEER=1, and always as a separate process.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = "bench_peer.py"

# per-mode figures shown in the "other" column, in this order, when present
EXTRA_KEYS = ["send_calls_per_s", "commits", "commit_p50_ms", "commit_p99_ms", "visibility_p99_ms",
              "achieved_rate", "received", "arrow_mb_per_s", "vs_1st_count", "kills", "isr_recovery_p50_ms",
              "bare_actor_pss_mb", "replica_idle_pss_mb", "extra_idle_mb", "replica_load_pss_max_mb",
              "extra_load_max_mb", "driver_pss_max_mb", "broker_over_floor", "aborted_transactions", "errors"]


def all_scripts() -> list[str]:
    return sorted(glob.glob(os.path.join(HERE, "bench_*.py")))


def scripts(only: str | None = None, include_peer: bool | None = None) -> list[str]:
    if include_peer is None:
        include_peer = os.environ.get("RB_BENCH_PEER") == "1"
    out = []
    for s in all_scripts():
        name = os.path.basename(s)
        if name == PEER and not include_peer:
            continue
        if only and not any(o.strip() and o.strip() in name for o in only.split(",")):
            continue
        out.append(s)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def rows_for(result: dict) -> list[list[str]]:
    rows = []
    for setting, modes in result.get("results", {}).items():
        if not isinstance(modes, dict):
            continue
        for mode, r in modes.items():
            if not isinstance(r, dict):
                continue
            extra = " ".join(f"{k}={_fmt(r[k])}" for k in EXTRA_KEYS
                             if k in r and r[k] is not None
                             and not (k in ("errors", "aborted_transactions") and r[k] == 0))
            rows.append([result.get("benchmark", "?"), setting, mode,
                         "-" if r.get("records_per_s") is None else f"{r['records_per_s']:,.0f}",
                         "-" if r.get("mb_per_s") is None else f"{r['mb_per_s']:,.2f}",
                         "-" if r.get("p50_ms") is None else f"{r['p50_ms']:.2f}",
                         "-" if r.get("p99_ms") is None else f"{r['p99_ms']:.2f}",
                         "-" if r.get("max_ms") is None else f"{r['max_ms']:.2f}",
                         extra])
    return rows


def target_rows(result: dict) -> list[list[str]]:
    out = []
    for t in result.get("targets", []):
        met = {True: "met", False: "MISSED", None: "n/a"}[t.get("met")]
        out.append([t["target"], _fmt(t.get("value")), f"{t['op']} {_fmt(t['threshold'])} {t.get('unit', '')}".strip(),
                    met])
    return out


HEADER = ["benchmark", "setting", "mode", "records/s", "MB/s", "p50 ms", "p99 ms", "max ms", "other"]
NUMERIC_FROM = 3


def print_table(rows: list[list[str]], header: list[str] | None = None, fmt: str = "text",
                numeric_cols: set[int] | None = None) -> None:
    header = header or HEADER
    if numeric_cols is None:
        numeric_cols = set(range(NUMERIC_FROM, len(header) - 1)) if header is HEADER else set()
    if fmt == "md":
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---:" if i in numeric_cols else "---" for i in range(len(header))) + "|")
        for r in rows:
            print("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
        print()
        return
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) if j in numeric_cols else c.ljust(w)
                        for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()


def load_script(path: str):
    name = os.path.splitext(os.path.basename(path))[0]
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_subprocess(script: str, smoke: bool, timeout: float, extra: list[str]) -> tuple[dict | None, str | None, str]:
    name = os.path.basename(script)
    cmd = [sys.executable, script] + (["--smoke"] if smoke else []) + extra
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"{name}: timed out", ""
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        return None, f"{name}: exit {p.returncode}, no JSON line", ""
    failure = f"{name}: exit {p.returncode}" if p.returncode != 0 else None
    return json.loads(lines[-1]), failure, lines[-1]


def run_in_process(paths: list[str], smoke: bool, extra: list[str], on_result) -> list[str]:
    """Every script's `run(cluster, argv)` on ONE embedded Ray + broker started here."""
    import benchlib as bl

    failed = []
    t0 = time.perf_counter()
    cluster, tmp = bl.start_embedded()
    bl.log(f"embedded Ray + broker started in {time.perf_counter() - t0:.1f} s")
    try:
        for path in paths:
            name = os.path.basename(path)
            t1 = time.perf_counter()
            print(f"running {name} (in-process) ...", file=sys.stderr, flush=True)
            try:
                mod = load_script(path)
                result = mod.run(cluster, (["--smoke"] if smoke else []) + extra)
            except Exception:  # noqa: BLE001 - report and carry on with the next workload
                failed.append(f"{name}: {traceback.format_exc(limit=8)}")
                continue
            if not result.get("ok", True):
                failed.append(f"{name}: ok=false")
            bl.log(f"{name} done in {time.perf_counter() - t1:.1f} s")
            on_result(result, json.dumps(result))
    finally:
        bl.stop_embedded(cluster, tmp)
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="run each benchmark in --smoke mode")
    ap.add_argument("--list", action="store_true", help="list the benchmark scripts and exit")
    ap.add_argument("--json", metavar="FILE", help="append each script's JSON line to FILE")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per script (subprocess mode)")
    ap.add_argument("--only", metavar="NAMES", help="comma-separated substrings of script names (e.g. w1,w5)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--in-process", dest="in_process", action="store_true", default=None,
                      help="all scripts in this process on one Ray (default with --smoke)")
    mode.add_argument("--subprocess", dest="in_process", action="store_false",
                      help="each script in its own process with its own Ray (default for full runs)")
    ap.add_argument("--format", choices=["text", "md"], default="text", help="table format")
    ap.add_argument("--script-args", default="", help="extra arguments for every script (quoted string)")
    args = ap.parse_args(argv)
    if args.list:
        for s in all_scripts():
            note = "  (only with RB_BENCH_PEER=1)" if os.path.basename(s) == PEER else ""
            print(os.path.relpath(s, os.path.dirname(HERE)) + note)
        return 0
    in_process = args.smoke if args.in_process is None else args.in_process
    paths = scripts(args.only)
    extra = args.script_args.split()
    rows, trows, failed = [], [], []

    def on_result(result: dict, line: str) -> None:
        nonlocal rows, trows
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
        rows += rows_for(result)
        trows += target_rows(result)

    t0 = time.perf_counter()
    peer = [p for p in paths if os.path.basename(p) == PEER]
    local = [p for p in paths if os.path.basename(p) != PEER]
    if in_process and local:
        failed += run_in_process(local, args.smoke, extra, on_result)
    else:
        peer = paths
    for script in peer:
        print(f"running {os.path.basename(script)} ...", file=sys.stderr, flush=True)
        result, failure, line = run_subprocess(script, args.smoke, args.timeout, extra)
        if failure:
            failed.append(failure)
        if result is not None:
            on_result(result, line)
    print_table(rows, fmt=args.format)
    if trows:
        print_table(trows, ["target (issue 7)", "value", "wanted", "status"], fmt=args.format, numeric_cols={1})
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

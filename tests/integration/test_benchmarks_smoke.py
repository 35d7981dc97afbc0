"""The benchmark runs in --smoke mode and prints one JSON line with the expected keys (no speed checks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # own session: on a timeout the whole group (driver and the local Ray it started) is killed
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} timed out after {timeout} s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_bench_produce_consume_smoke():
    p = _run([sys.executable, "benchmarks/bench_produce_consume.py", "--smoke"], timeout=140)
    assert p.returncode == 0, p.stderr[-3000:]
    # Ray itself may print warnings (e.g. worker start-up) to stdout; the figures are the one JSON line
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout
    out = json.loads(lines[0])
    assert out["benchmark"] == "produce_consume" and out["smoke"] is True
    assert {"partitions", "replication_factors", "key_bytes", "value_bytes", "acks"} <= set(out["settings"])
    assert set(out["results"]) == {f"rf{rf}" for rf in out["settings"]["replication_factors"]}
    for res in out["results"].values():
        for mode in ("send_batch", "send", "send_batch_1_in_flight", "send_1_in_flight"):
            assert {"records_per_s", "mb_per_s", "p50_ms", "p99_ms"} <= set(res[mode])
            assert res[mode]["errors"] == 0
        assert {"records_per_s", "mb_per_s"} <= set(res["consume"])
        assert res["consume"]["records"] == res["consume"]["expected"]


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_run_all_lists_benchmarks():
    p = _run([sys.executable, "benchmarks/run_all.py", "--list"], timeout=25)
    assert p.returncode == 0, p.stderr
    assert "bench_produce_consume.py" in p.stdout

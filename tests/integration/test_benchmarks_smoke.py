"""Every benchmark script runs in --smoke mode and reports its figures (no speed checks).

All workloads run in ONE subprocess (`run_all.py --smoke`: one embedded Ray, every script's
`run(cluster, argv)` in turn), so the whole check costs one Ray start-up plus a few seconds per
workload. The peer benchmark is never run here (it installs packages); only its opt-in guard is.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# benchmark name -> {setting: {mode: keys that must be there}}
COUNT = {"records_per_s", "records"}
EXPECTED = {
    "produce_consume": {"rf1": {"send_batch", "send", "send_batch_1_in_flight", "send_1_in_flight", "consume"}},
    "w1_send": {"rf1": {"send"}, "rf3": {"send"}},
    "w2_txn_send": {"rf1": {"txn_send"}},
    "w3_send_batch": {"rf1": {"txn_send_batch", "platform_floor"}},   # smoke: RF 1 (W1 and W8 cover RF 3)
    "w4_consume": {"rf1": {"produce_setup", "consume_read_committed"}},
    "w5_latency": {"rf1": {"idempotent", "transactional"}},     # smoke: RF 1 (W1/W3 cover RF 3)
    "w6_schema": {"rf1": {"produce", "consume"}},
    "w7_partitions": {"p1": {"txn_send_batch", "consume", "platform_floor"},
                      "p2": {"txn_send_batch", "consume", "platform_floor"}},
    "w8_failover": {"rf3": {"failover"}},
    "memory": {"rf1": {"replica"}},
}


def _run(cmd: list[str], timeout: float, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RB_BENCH_PEER", None)
    env.update(extra_env or {})
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


def _check_mode(bench: str, setting: str, mode: str, r: dict) -> None:
    where = f"{bench}/{setting}/{mode}"
    if bench == "w8_failover":
        assert r["kills"] >= 1 and r["p50_ms"] > 0 and r["errors"] == 0, (where, r)
        return
    if bench == "memory":
        assert r["bare_actor_pss_mb"] > 0 and r["replica_idle_pss_mb"] > 0, (where, r)
        assert r["extra_idle_mb"] is not None and r["replica_load_pss_max_mb"] > 0, (where, r)
        assert r["records_written_under_load"] > 0, (where, r)
        return
    if mode == "platform_floor":
        assert r["records_per_s"] > 0 and r["broker_over_floor"] > 0, (where, r)
        assert r["runs"] and all(run["records"] > 0 and run["calls"] > 0 for run in r["runs"]), (where, r)
        return
    if bench == "w5_latency":
        assert r["sent"] > 0 and r["received"] == r["sent"] - r.get("aborted_records", 0), (where, r)
        assert {"p50_ms", "p99_ms", "max_ms"} <= set(r) and r["p50_ms"] > 0, (where, r)
        if mode == "transactional":
            assert r["commits"] > 0 and r["commit_p50_ms"] > 0, (where, r)
            assert r["visibility_p99_ms"] is not None and r["transactions_seen"] > 0, (where, r)
        return
    assert COUNT <= set(r), (where, r)
    assert r["records"] > 0 and r["records_per_s"] > 0, (where, r)
    assert r.get("errors", 0) == 0, (where, r)
    if "expected" in r:
        assert r["records"] == r["expected"], (where, r)
    if mode in ("txn_send", "txn_send_batch") or (bench == "w4_consume" and mode == "produce_setup"):
        assert r["commits"] > 0 and r["commit_p50_ms"] > 0, (where, r)
    if bench == "w1_send":
        assert r["acked"] == r["records"], (where, r)
    if bench in ("w6_schema",) or mode in ("consume_read_committed",):
        assert r["mb_per_s"] > 0, (where, r)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_all_benchmarks_smoke_in_one_process(tmp_path):
    out_file = tmp_path / "bench.jsonl"
    p = _run([sys.executable, "benchmarks/run_all.py", "--smoke", "--json", str(out_file)], timeout=280)
    assert p.returncode == 0, p.stderr[-5000:]
    results = [json.loads(line) for line in out_file.read_text().splitlines() if line.strip()]
    by_name = {r["benchmark"]: r for r in results}
    assert set(by_name) == set(EXPECTED), sorted(by_name)
    scripts = {os.path.basename(s) for s in glob.glob(os.path.join(REPO, "benchmarks", "bench_*.py"))}
    assert len(scripts - {"bench_peer.py"}) == len(EXPECTED), scripts     # a new script needs an entry above
    for name, out in by_name.items():
        assert out["smoke"] is True and out["ok"] is True, (name, out)
        assert out["settings"] and out["environment"], name
        assert set(out["results"]) == set(EXPECTED[name]), (name, sorted(out["results"]))
        for setting, modes in EXPECTED[name].items():
            assert set(out["results"][setting]) == modes, (name, setting, sorted(out["results"][setting]))
            for mode in modes:
                _check_mode(name, setting, mode, out["results"][setting][mode])
        for t in out.get("targets", []):
            assert {"target", "value", "threshold", "met"} <= set(t), (name, t)
    assert by_name["w7_partitions"]["platform_floor"]["min_ratio_to_best_so_far"] > 0
    # the runner's table has a row per (benchmark, setting, mode)
    for name in EXPECTED:
        assert name in p.stdout, p.stdout


@pytest.mark.timeout(30)
def test_run_all_lists_benchmarks():
    p = _run([sys.executable, "benchmarks/run_all.py", "--list"], timeout=25)
    assert p.returncode == 0, p.stderr
    for script in ("bench_produce_consume.py", "bench_w1_send.py", "bench_w2_txn_send.py", "bench_w3_send_batch.py",
                   "bench_w4_consume.py", "bench_w5_latency.py", "bench_w6_schema.py", "bench_w7_partitions.py",
                   "bench_w8_failover.py", "bench_memory.py", "bench_peer.py"):
        assert script in p.stdout, p.stdout


@pytest.mark.timeout(30)
def test_peer_benchmark_runs_only_when_asked():
    """Without RB_BENCH_PEER=1 the peer script installs and starts nothing: one 'skipped' JSON line."""
    p = _run([sys.executable, "benchmarks/bench_peer.py", "--smoke"], timeout=25)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout
    out = json.loads(lines[0])
    assert out["benchmark"] == "peer" and out["skipped"] is True and out["quirks"]


def test_shared_record_generator():
    """ray_broker.testing.datagen: exact sizes, the benchmark record format, stamps round-trip."""
    import pyarrow as pa

    from ray_broker.testing import datagen

    b = datagen.kv_batch(7, 3)
    assert b.schema.names == ["key", "value"] and b.num_rows == 3
    assert b.column("key").to_pylist()[0] == b"k%015d" % 7
    assert b.column("value").to_pylist()[2] == b"%012d" % 9 + b"v" * 88
    keys, values = datagen.kv_lists(0, 2)
    assert [len(k) for k in keys] == [16, 16] and [len(v) for v in values] == [100, 100]
    vals = pa.array([datagen.stamped_value(123, 4), datagen.stamped_value(2 ** 62, -1)])
    ts, seq = datagen.decode_stamps(vals.slice(1))
    assert ts.tolist() == [2 ** 62] and seq.tolist() == [-1]
    ts, seq = datagen.decode_stamps(vals)
    assert ts.tolist() == [123, 2 ** 62] and seq.tolist() == [4, -1]
    f = datagen.feature_batch(0, 5)
    assert f.schema == datagen.feature_schema(16) and f.num_rows == 5
    assert datagen.account_keys(pa.array([3]).to_numpy()).to_pylist() == [b"acct-00003"]

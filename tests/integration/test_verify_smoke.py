"""`ray-broker verify` end to end: a short run of both workloads with faults must find no anomaly.

Runs the CLI in a subprocess with its own embedded Ray and data dir (RAY_ADDRESS removed), so it
neither uses nor disturbs the session's Ray.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]


def test_verify_all_with_faults_finds_no_anomaly(tmp_path):
    report = tmp_path / "report.json"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "ray_broker.cli.main", "verify", "--workload", "all", "--seconds", "30",
           "--seed", "1", "--faults", "kill_leader,kill_follower,kill_txn_coordinator,kill_client",
           "--fault-interval", "5", "--producers", "2", "--data-dir", str(tmp_path / "data"),
           "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=330)
    tail = (proc.stdout[-4000:], proc.stderr[-4000:])
    assert report.exists(), tail
    r = json.loads(report.read_text())
    for key in ("valid", "operations", "faults", "anomalies", "stats", "settings", "final_read", "workers"):
        assert key in r, (key, list(r))
    assert r["settings"]["seed"] == 1 and r["settings"]["workloads"] == ["queue", "txn", "copier"]
    assert r["operations"] > 0, tail
    assert sum(r["faults"].values()) > 0, (r["faults"], r["faults_skipped"], r["nemesis_errors"])
    assert r["stats"]["values_sent"] > 0 and r["stats"]["transactions"] > 0, r["stats"]
    assert r["final_read"]["partitions"] == 18 and not r["final_read"]["failed"], r["final_read"]
    # copier offset commits, when the copiers got that far in 30 s (a loaded CI box may delay their
    # group join), must be judgeable against the output's final read
    assert r["stats"].get("copier_checkable", True), r["stats"]
    bad = {k: v for k, v in r["anomalies"].items() if v["count"]}
    assert not bad, json.dumps(bad, indent=1)[:4000]
    assert r["valid"] and proc.returncode == 0, tail
    assert os.path.exists(r["history"])

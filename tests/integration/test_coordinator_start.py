"""A coordinator whose process is slow to start is waited for, not replaced over and over.

Runs in a subprocess with its own Ray: the failpoint is armed through RB_FAILPOINTS, so every
coordinator process of that cluster takes longer to start than coordinator.session.timeout.ms,
as actor start-up does on a loaded machine (CI saw no transaction coordinator for minutes).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SCRIPT = textwrap.dedent("""
    import sys, time
    import ray_broker as rb
    from tests.helpers import read_partition, wait_for

    cluster = rb.connect(data_dir=sys.argv[1], config={"coordinator.session.timeout.ms": 2000,
                                                       "replica.health.check.interval.ms": 250})
    cluster.admin().create_topic("t", replication_factor=1)
    producer = cluster.producer(transactional_id="slow-start")
    t0 = time.monotonic()
    producer.init_transactions(timeout=120)
    print(f"INIT-OK after {time.monotonic() - t0:.1f}s", flush=True)
    producer.begin_transaction()
    producer.send("t", value=b"committed", partition=0)
    producer.commit_transaction(timeout=60)
    # commit returns once the decision is logged; the marker that makes it readable follows
    wait_for(lambda: [v for _, _, v in read_partition(cluster, "t", 0)] == [b"committed"], timeout=60,
             what="the committed record readable")
    print("SLOW-START-OK", flush=True)
    cluster.shutdown()
""")


def test_slow_starting_coordinator_is_not_replaced_before_it_can_answer(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env["RB_FAILPOINTS"] = "coordinator.start=delay:6000"      # 3x the session timeout
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=220, cwd=repo, env=env)
    out = proc.stdout + proc.stderr[-6000:]
    assert "INIT-OK" in proc.stdout, out
    assert proc.returncode == 0 and "SLOW-START-OK" in proc.stdout, out

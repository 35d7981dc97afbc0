"""jobs/scale_job.py against three Ray nodes on one machine: actors spread, figures per node, counts exact.

A subprocess owns a `ray.cluster_utils.Cluster` (head + 2 workers) with a deployed broker and runs
`python jobs/scale_job.py --address <cluster> --smoke` against it, as a user would on a real cluster.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "jobs", "scale_job.py")

SCRIPT = textwrap.dedent("""
    import subprocess, sys
    import ray
    from ray.cluster_utils import Cluster
    import ray_broker as rb

    job, data_dir = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="ray_broker", log_to_driver=False)
    try:
        rb.deploy(data_dir=data_dir)
        proc = subprocess.run([sys.executable, job, "--address", cluster.address, "--smoke", "--producers", "2",
                               "--consumers", "2", "--partitions", "2", "--replication-factor", "2",
                               "--timeout", "120"], capture_output=True, text=True, timeout=250)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr[-4000:])
        rc = proc.returncode
    finally:
        ray.shutdown()
        cluster.shutdown()
    sys.exit(rc)
""")


def test_scale_job_spreads_actors_over_nodes_and_reads_back_every_record_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, JOB, str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=290)
    diag = proc.stdout[-6000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    result = [ln for ln in lines if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and result and result[-1].endswith(" OK"), diag
    figures = json.loads(next(ln for ln in lines if ln.startswith('{"job"')))   # Ray may print warnings too
    check = figures["check"]
    assert check["produced"] == check["consumed"] > 0, check
    assert check["duplicates"] == check["missing"] == check["unexpected"] == 0, check
    assert result[-1] == (f"RESULT produced={check['produced']} consumed={check['consumed']} duplicates=0 "
                          "missing=0 OK"), result
    assert figures["cluster"]["nodes"] == 3, figures["cluster"]

    producer_nodes = {p["node_id"] for p in figures["producers"]}
    assert len(producer_nodes) >= 2, figures["producers"]
    assert sum(p["records"] for p in figures["producers"]) == check["produced"]
    for node in producer_nodes:
        n = figures["nodes"][node]
        assert n["producers"] >= 1 and n["produce_records"] > 0 and n["produce_records_per_s"] > 0, n
    for c in figures["consumers"]:
        assert c["complete"] and figures["nodes"][c["node_id"]]["consume_records_per_s"] > 0, c
    assert sorted(p for c in figures["consumers"] for p in c["partitions"]) == [0, 1]
    assert figures["produce"]["records_per_s"] > 0 and figures["consume"]["records_per_s"] > 0

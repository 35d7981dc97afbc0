"""Producer state survives a whole-cluster restart; expired producer ids recover without duplicates.

Runs in a subprocess with its own Ray (restart + a short producer.id.expiration.ms).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = textwrap.dedent("""
    import glob, json, os, sys, time
    import ray
    import ray_broker as rb
    from tests.helpers import read_partition, replica, stored_batch

    def produce_to_leader(admin, batch, pid):
        # the same (pid, epoch, seq) each attempt: a retry after a leader move is deduplicated
        deadline = time.monotonic() + 60
        while True:
            leader_id = admin.describe_topic("t").partitions[0].leader
            try:
                if leader_id is None:
                    raise rb.NotLeaderOrFollowerError("no leader yet")
                return leader_id, ray.get(replica("t", 0, leader_id).produce.remote(batch, -1, 10000, pid, 0, 0))
            except Exception as exc:
                err = getattr(exc, "cause", None) or exc
                if not (isinstance(err, rb.BrokerError) and err.retriable) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    data_dir = sys.argv[1]
    # a restart takes seconds: the dedup part must not race producer-id expiry
    cfg = {"producer.id.expiration.ms": 600000}
    cluster = rb.connect(data_dir=data_dir, config=cfg)
    admin = cluster.admin()
    admin.create_topic("t", replication_factor=2)
    pid = ray.get(cluster.controller.allocate_producer_ids.remote(1))
    batch = stored_batch([b"a", b"b"])
    leader_id, first = produce_to_leader(admin, batch, pid)
    cluster.shutdown()

    cluster = rb.connect(data_dir=data_dir, config=cfg)
    admin = cluster.admin()
    deadline = time.monotonic() + 60
    while admin.describe_topic("t").partitions[0].high_watermark < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    leader_id, retry = produce_to_leader(admin, batch, pid)
    assert retry.duplicate and retry.base_offset == first.base_offset, (first, retry)
    assert ray.get(cluster.controller.allocate_producer_ids.remote(1)) > pid   # ids never reused
    print("RESTART-DEDUP-OK", flush=True)
    cluster.shutdown()

    # producer-id expiry: the producer idles past producer.id.expiration.ms, then sends again
    cluster = rb.connect(data_dir=data_dir, config={"producer.id.expiration.ms": 3000})
    admin = cluster.admin()
    deadline = time.monotonic() + 60
    while admin.describe_topic("t").partitions[0].leader is None and time.monotonic() < deadline:
        time.sleep(0.2)
    leader_id = admin.describe_topic("t").partitions[0].leader
    producer = cluster.producer(linger_ms=0)
    producer.send("t", value=b"before").result(60)
    old_pid = producer.idempotence.producer_id
    time.sleep(5.0)
    state = ray.get(replica("t", 0, leader_id).producer_state.remote())
    assert old_pid not in state["producers"], state
    snapshots = sorted(glob.glob(os.path.join(ray.get(replica("t", 0, leader_id).status.remote())["log_dir"],
                                              "*.snapshot")))
    from ray_broker.storage.producer_state import ProducerStateManager
    with open(snapshots[-1], "rb") as f:
        snap, _ = ProducerStateManager.from_bytes(f.read())
    assert old_pid not in snap.producers, "expired producer still in the latest snapshot"
    producer.send("t", value=b"after-1").result(60)
    producer.send("t", value=b"after-2").result(60)
    assert producer.idempotence.producer_id != old_pid
    values = [v for _, _, v in read_partition(cluster, "t", 0)]
    assert values == [b"a", b"b", b"before", b"after-1", b"after-2"], values
    cluster.shutdown()
    print("EXPIRY-OK", flush=True)
""")


def test_producer_state_survives_restart_and_expired_ids_recover(tmp_path):
    import os

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=290, cwd=repo)
    out = proc.stdout + proc.stderr[-6000:]
    assert "RESTART-DEDUP-OK" in proc.stdout, out
    assert proc.returncode == 0 and "EXPIRY-OK" in proc.stdout, out

"""A follower whose log is corrupted in the middle detects it on restart and is rebuilt from the leader."""
from __future__ import annotations

import glob
import os

import pyarrow as pa
import pytest
import ray

from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)


def _replica(topic, partition, replica):
    return ray.get_actor(f"replica/{topic}/{partition}/{replica}", namespace="ray_broker")


def test_corrupt_middle_segment_on_follower_is_rebuilt_from_leader(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=2, config={"segment.bytes": 64 * 1024})
    producer = broker.producer()
    for i in range(10):
        batch = pa.table({"key": [b"k%d" % j for j in range(200)], "value": [os.urandom(100) for _ in range(200)]})
        producer.send_batch(topic_name, batch, partition=0).result(timeout=60)
    leader = admin.describe_topic(topic_name).partitions[0].leader
    follower = 1 - leader
    fh = _replica(topic_name, 0, follower)
    wait_for(lambda: ray.get(fh.status.remote())["log_end_offset"] == 2000, what="follower caught up")
    log_dir = ray.get(fh.status.remote())["log_dir"]
    segments = sorted(glob.glob(os.path.join(log_dir, "*.arrow")))
    assert len(segments) >= 3, segments
    victim = segments[len(segments) // 2]
    with open(victim, "r+b") as f:          # flip one byte in the middle of a middle segment
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    ray.kill(fh, no_restart=False)          # crash: Ray restarts it, recovery opens the log

    def rebuilt():
        try:
            st = ray.get(_replica(topic_name, 0, follower).status.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - restarting
            return None
        return st if st["corruption"] and st["log_end_offset"] == 2000 else None

    st = wait_for(rebuilt, timeout=60, what="follower rebuilt after corruption")
    assert os.path.basename(victim) in st["corruption"] or "offset" in st["corruption"]
    leader_log = ray.get(_replica(topic_name, 0, leader).read_all_frames.remote())
    wait_for(lambda: ray.get(_replica(topic_name, 0, follower).read_all_frames.remote()) == leader_log,
             what="follower identical to leader")
    wait_for(lambda: sorted(admin.describe_topic(topic_name).partitions[0].isr) == [0, 1], what="back in ISR")

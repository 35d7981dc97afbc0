"""Whole-cluster restart: ray.shutdown() then rb.connect(data_dir=same) brings everything back.

Runs in a subprocess with its own Ray, so it does not disturb the session's shared cluster.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = textwrap.dedent("""
    import sys, time
    import pyarrow as pa
    import ray_broker as rb

    data_dir = sys.argv[1]
    cluster = rb.connect(data_dir=data_dir)
    import ray
    from ray_broker.protocol import RAY_SYSTEM_CONFIG
    node_config = ray._private.worker._global_node._ray_params._system_config   # what Ray was started with
    assert all(node_config.get(k) == v for k, v in RAY_SYSTEM_CONFIG.items()), node_config
    admin = cluster.admin()
    admin.create_topic("orders", partitions=2, replication_factor=3, config={"min.insync.replicas": 2})
    admin.create_topic("features", schema=pa.schema([("x", pa.float32())]))
    producer = cluster.producer()
    for i in range(5000):
        producer.send("orders", value=b"o%d" % i, key=b"k%d" % (i % 7))
    producer.send_batch("features", pa.record_batch({"x": pa.array([1.5, 2.5], pa.float32())})).result(60)
    producer.flush(60)
    cluster.shutdown()                       # stops the embedded Ray entirely

    cluster = rb.connect(data_dir=data_dir)  # a brand-new Ray; the broker comes back from disk
    admin = cluster.admin()
    assert admin.list_topics() == ["features", "orders"], admin.list_topics()
    consumer = cluster.consumer(auto_offset_reset="earliest")
    tps = [rb.TopicPartition("orders", 0), rb.TopicPartition("orders", 1), rb.TopicPartition("features", 0)]
    consumer.assign(tps)
    deadline = time.monotonic() + 60
    end = {}
    while time.monotonic() < deadline:
        end = consumer.end_offsets(tps)
        if sum(end.values()) == 5002:
            break
        time.sleep(0.2)
    assert sum(end.values()) == 5002, end
    values = []
    while sum(consumer.position(tp) for tp in tps) < 5002 and time.monotonic() < deadline:
        for tp, batch in consumer.poll(1.0).items():
            if tp.topic == "orders":
                values.extend(batch.column("value").to_pylist())
            else:
                assert batch.column("x").to_pylist() == [1.5, 2.5]
    assert sorted(values) == sorted(b"o%d" % i for i in range(5000)), len(values)
    producer = cluster.producer()
    meta = producer.send("orders", value=b"after", partition=0).result(60)
    assert meta.offset == end[rb.TopicPartition("orders", 0)]
    cluster.shutdown()
    print("RESTART-OK")
""")


def test_whole_cluster_restart_brings_back_topics_and_records(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0 and "RESTART-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]

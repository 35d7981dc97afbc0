"""Three Ray nodes on one machine: replicas on distinct nodes; a node removed; replicas re-placed.

Runs in a subprocess with its own `ray.cluster_utils.Cluster`.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = textwrap.dedent("""
    import sys, time
    import ray
    from ray.cluster_utils import Cluster
    import ray_broker as rb

    def wait_for(pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.3)
        raise AssertionError("timed out waiting for " + what)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="ray_broker", log_to_driver=False)
    try:
        rb.deploy(data_dir=sys.argv[1], config={"replica.health.check.interval.ms": 200})
        broker = rb.connect()
        admin = broker.admin()
        try:
            admin.create_topic("too-wide", replication_factor=4)
            raise AssertionError("replication factor above the node count was accepted")
        except rb.InvalidReplicationFactorError as exc:
            assert "nodes" in str(exc)
        admin.create_topic("t", partitions=3, replication_factor=2)

        def placement():
            out = {}
            for p in range(3):
                for r in range(2):
                    h = ray.get_actor(f"replica/t/{p}/{r}", namespace="ray_broker")
                    out[(p, r)] = ray.get(h.ping.remote(), timeout=10)["node_id"]
            return out

        where = placement()
        for p in range(3):
            assert where[(p, 0)] != where[(p, 1)], where
        producer = broker.producer(delivery_timeout_ms=120000)
        for i in range(3000):
            producer.send("t", value=b"a%d" % i, partition=i % 3)
        producer.flush(60)

        victim = workers[0]
        victim_id = victim.node_id
        assert victim_id in where.values()
        cluster.remove_node(victim, allow_graceful=False)
        # keeps serving from the surviving replicas
        for i in range(3000):
            producer.send("t", value=b"b%d" % i, partition=i % 3)
        producer.flush(120)

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        def replaced():
            try:
                w = placement()
            except Exception:
                return False
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            ok = all(node in alive for node in w.values()) and all(w[(p, 0)] != w[(p, 1)] for p in range(3))
            isr_ok = all(sorted(pp.isr) == [0, 1] for pp in admin.describe_topic("t").partitions)
            return ok and isr_ok
        try:
            wait_for(replaced, 180, "replicas moved off the removed node and back in the ISR")
        except AssertionError:
            print("partitions:", admin.describe_topic("t").partitions, flush=True)
            print("alive nodes:", [n["NodeID"] for n in ray.nodes() if n["Alive"]], "removed:", victim_id, flush=True)
            raise

        consumer = broker.consumer(auto_offset_reset="earliest")
        tps = [rb.TopicPartition("t", p) for p in range(3)]
        consumer.assign(tps)
        values = []
        deadline = time.monotonic() + 60
        while len(values) < 6000 and time.monotonic() < deadline:
            for batch in consumer.poll(1.0).values():
                values.extend(batch.column("value").to_pylist())
        expected = {b"a%d" % i for i in range(3000)} | {b"b%d" % i for i in range(3000)}
        assert expected <= set(values), len(expected - set(values))
        print("MULTINODE-OK")
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_replicas_on_distinct_nodes_and_moved_off_a_removed_node(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=290)
    assert proc.returncode == 0 and "MULTINODE-OK" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]

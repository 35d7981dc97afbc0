"""Replication under failure: leader killed twice under acks=all load; replicas converge."""
from __future__ import annotations

import threading
import time

import pytest
import ray

import ray_broker as rb
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(240)


def _leader(admin, topic, partition=0):
    return admin.describe_topic(topic).partitions[partition]


def _replica(topic, partition, replica):
    return ray.get_actor(f"replica/{topic}/{partition}/{replica}", namespace="ray_broker")


def _consume_all(cluster, topic, partitions, isolation="read_committed"):
    consumer = cluster.consumer(isolation_level=isolation, auto_offset_reset="earliest")
    tps = [rb.TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    end = consumer.end_offsets(tps)
    out = {tp: [] for tp in tps}
    deadline = time.monotonic() + 60
    while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
        for tp, batch in consumer.poll(timeout=1.0).items():
            out[tp].append(batch)
    consumer.close()
    return out, end


def test_leader_killed_twice_under_acks_all_loses_nothing(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=3, config={"min.insync.replicas": 2})
    producer = broker.producer(acks="all", linger_ms=1, delivery_timeout_ms=90_000, retry_backoff_ms=50)
    acked: list[bytes] = []
    failed: list[tuple[bytes, BaseException]] = []
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            window = []
            for _ in range(50):
                value = f"v-{i:08d}".encode()
                window.append((value, producer.send(topic_name, value=value, key=b"k")))
                i += 1
            for value, fut in window:
                try:
                    fut.result(timeout=120)
                    acked.append(value)
                except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                    failed.append((value, exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    epochs = []
    for _ in range(2):
        wait_for(lambda: len(acked) > (len(epochs) + 1) * 500, timeout=60, what="records acknowledged")
        before = _leader(admin, topic_name)
        epochs.append(before.leader_epoch)
        ray.kill(_replica(topic_name, 0, before.leader))          # plain kill: Ray will not restart it
        wait_for(lambda: _leader(admin, topic_name).leader not in (None, before.leader)
                 and _leader(admin, topic_name).leader_epoch > before.leader_epoch, timeout=30, what="new leader")
        count = len(acked)
        wait_for(lambda: len(acked) > count + 200, timeout=60, what="writes acknowledged by the new leader")
    stop.set()
    thread.join(timeout=120)
    producer.flush(timeout=60)
    # the new leader takes acks=all writes
    meta = producer.send(topic_name, value=b"final", key=b"k").result(timeout=60)
    acked.append(b"final")
    assert not failed, failed[:3]
    # killed replicas were recreated by the controller, caught up and rejoined the ISR
    wait_for(lambda: sorted(_leader(admin, topic_name).isr) == [0, 1, 2], timeout=60, what="full ISR")

    batches, end = _consume_all(broker, topic_name, 1)
    tp = rb.TopicPartition(topic_name, 0)
    assert end[tp] == meta.offset + 1
    offsets = [o for b in batches[tp] for o in b.column("offset").to_pylist()]
    values = [v for b in batches[tp] for v in b.column("value").to_pylist()]
    assert offsets == list(range(end[tp])), "offsets must be contiguous"
    missing = set(acked) - set(values)
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {sorted(missing)[:5]}"

    # every replica holds the same bytes once caught up
    def logs():
        return [ray.get(_replica(topic_name, 0, r).read_all_frames.remote(), timeout=30) for r in range(3)]

    wait_for(lambda: len({x for x in logs()}) == 1, timeout=60, what="identical replica logs")


def test_follower_rejoins_isr_after_restart_and_catches_up(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=3, config={"min.insync.replicas": 2})
    producer = broker.producer(linger_ms=1)
    leader = _leader(admin, topic_name).leader
    follower = next(r for r in range(3) if r != leader)
    ray.kill(_replica(topic_name, 0, follower), no_restart=False)   # a crash: Ray restarts it
    for i in range(2000):
        producer.send(topic_name, value=f"{i}".encode())
    producer.flush(timeout=60)
    wait_for(lambda: sorted(_leader(admin, topic_name).isr) == [0, 1, 2], timeout=60, what="follower back in ISR")
    hw = _leader(admin, topic_name).high_watermark
    assert hw == 2000
    st = ray.get(_replica(topic_name, 0, follower).status.remote())
    assert st["log_end_offset"] == 2000 and st["role"] == "follower"


def test_followers_learn_the_high_watermark_without_further_writes(broker, topic_name):
    # the HW rides the next data push; with no next push it must still reach the followers
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=3, config={"min.insync.replicas": 2})
    wait_for(lambda: len(_leader(admin, topic_name).isr) == 3, timeout=60, what="full ISR")
    producer = broker.producer(acks="all")
    producer.send(topic_name, value=b"only", partition=0).result(30)
    producer.close()
    leader = _leader(admin, topic_name).leader
    followers = [_replica(topic_name, 0, r) for r in range(3) if r != leader]
    wait_for(lambda: all(ray.get(f.ping.remote())["high_watermark"] == 1 for f in followers), timeout=10,
             what="followers' high watermark 1")


@ray.remote(num_cpus=0)
class _Unplaceable:
    def produce(self, *args):
        raise AssertionError("never runs: its node does not exist")


def test_internal_writer_replaces_a_leader_handle_pinned_to_a_gone_node(broker, topic_name):
    """Coordinators append to internal partitions through a cached leader handle; a leader re-created
    after its node was removed leaves that handle unschedulable (ActorUnschedulableError, not a
    RayActorError): the append must look the leader up again, not fail."""
    import asyncio

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_broker.actors.coordinator_base import InternalPartitionWriter
    from ray_broker.protocol import CONTROLLER_NAME

    broker.admin().create_topic(topic_name, partitions=1, replication_factor=1)
    wait_for(lambda: broker.admin().describe_topic(topic_name).partitions[0].leader is not None, 30, "a leader")
    controller = ray.get_actor(CONTROLLER_NAME, namespace="ray_broker")
    producer_id = ray.get(controller.allocate_producer_ids.remote(1))
    writer = InternalPartitionWriter("ray_broker", topic_name, 0, producer_id, 0)
    writer._leader = _Unplaceable.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id="ab" * 28, soft=False)).remote()
    assert asyncio.run(writer.append([(b"k", b"v")])) == 0
    assert asyncio.run(writer.read_all()) == [(b"k", b"v")]


def test_end_offsets_never_go_back_while_a_new_leader_learns_the_high_watermark(broker, topic_name):
    """KIP-207: a new leader learns the high watermark from its followers, so for a moment it trails
    the log. "latest" must not report that lower HW: a reader would stop short of acknowledged
    records, and a coordinator loading its internal partition would load only part of it."""
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=3, config={"min.insync.replicas": 2})
    wait_for(lambda: len(_leader(admin, topic_name).isr) == 3, timeout=60, what="full ISR")
    old = _leader(admin, topic_name).leader
    # the leader dies just before it would push the new HW alone: the followers keep HW 0
    ray.get(_replica(topic_name, 0, old).arm_failpoint.remote("replica.before_hw_push", "crash"))
    # the new leader's first sync of the other follower stalls, so its HW stays behind meanwhile
    for r in range(3):
        if r != old:
            ray.get(_replica(topic_name, 0, r).arm_failpoint.remote("follower.get_log_state", "delay", 4000))
    producer = broker.producer(acks="all", linger_ms=20)
    futures = [producer.send(topic_name, value=b"%d" % i, partition=0) for i in range(10)]
    producer.flush(timeout=30)
    assert [f.result(0).offset for f in futures] == list(range(10))
    wait_for(lambda: _leader(admin, topic_name).leader not in (None, old), timeout=30, what="a new leader")
    tp = rb.TopicPartition(topic_name, 0)
    for isolation in ("read_uncommitted", "read_committed"):
        consumer = broker.consumer(isolation_level=isolation)
        assert consumer.end_offsets([tp])[tp] == 10, isolation
        consumer.close()
    batches, _ = _consume_all(broker, topic_name, 1)
    assert [v for b in batches[tp] for v in b.column("value").to_pylist()] == [b"%d" % i for i in range(10)]
    producer.close()

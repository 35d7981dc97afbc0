"""Controller: comes back from persisted metadata when killed; a stale controller epoch is fenced."""
from __future__ import annotations

import pytest
import ray

import ray_broker as rb
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)


def _controller():
    return ray.get_actor("controller", namespace="ray_broker")


def test_killed_controller_is_recreated_from_its_metadata(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=2, replication_factor=2)
    producer = broker.producer()
    for i in range(100):
        producer.send(topic_name, value=b"x%d" % i, partition=i % 2)
    producer.flush(30)
    epoch = ray.get(_controller().controller_epoch.remote())
    # coordinators loaded against this controller (a fresh coordinator asks it for producer ids lazily)
    def coordinators_loaded():
        try:
            return [admin._coordinator_call(name, "ping", timeout=30) for name in admin._txn_coordinator_names()]
        except Exception:  # noqa: BLE001 - not created yet
            return False

    wait_for(coordinators_loaded, timeout=60, what="transaction coordinators loaded")
    ray.kill(_controller())          # plain kill: Ray does not restart it; the broker recreates it

    def new_epoch():
        try:
            return ray.get(_controller().controller_epoch.remote(), timeout=5) > epoch
        except Exception:  # noqa: BLE001 - not back yet
            return False

    wait_for(new_epoch, timeout=60, what="controller recreated with a new epoch")
    assert topic_name in admin.list_topics()
    desc = admin.describe_topic(topic_name)
    assert [p.replicas for p in desc.partitions] == [[0, 1], [0, 1]]
    for i in range(100):
        producer.send(topic_name, value=b"y%d" % i, partition=i % 2)
    producer.flush(60)
    wait_for(lambda: sum(p.high_watermark for p in admin.describe_topic(topic_name).partitions) == 200,
             timeout=30, what="all 200 records committed")
    # coordinators reach the new controller (producer-id blocks, metadata for markers), not the dead one
    txn = broker.producer(transactional_id=f"{topic_name}-tx")
    txn.init_transactions()
    txn.begin_transaction()
    txn.send(topic_name, value=b"txn", partition=0)
    txn.commit_transaction()
    wait_for(lambda: admin.describe_transaction(f"{topic_name}-tx").state == "COMPLETE_COMMIT", timeout=30,
             what="markers written through the new controller's metadata")


def test_stale_controller_epoch_is_refused(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=1)
    part = admin.describe_topic(topic_name).partitions[0]
    replica = ray.get_actor(f"replica/{topic_name}/0/0", namespace="ray_broker")
    epoch = ray.get(_controller().controller_epoch.remote())
    with pytest.raises(rb.StaleControllerEpochError, match="controller epoch"):
        ray.get(replica.become_follower.remote(epoch - 1, part.leader_epoch + 5, None, [0]))
    # nothing changed: still the leader at the same epoch
    status = ray.get(replica.status.remote())
    assert status["role"] == "leader" and status["leader_epoch"] == part.leader_epoch


def test_slow_leader_keeps_its_role_a_hung_one_loses_it(broker, topic_name):
    """A leader that answers no poll for a moment (a busy process) keeps leading; one silent for
    longer than replica.session.timeout.ms (4 s in the session broker) is replaced."""
    import os
    import signal
    import time

    from tests.helpers import leader_of, replica

    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=2)
    wait_for(lambda: len(admin.describe_topic(topic_name).partitions[0].isr) == 2, timeout=30, what="a full ISR")
    before = admin.describe_topic(topic_name).partitions[0]
    pid = int(ray.get(replica(topic_name, 0, before.leader).__ray_call__.remote(lambda self: os.getpid()),
                      timeout=30))
    os.kill(pid, signal.SIGSTOP)          # several polls time out (1 s each, every 250 ms)
    try:
        time.sleep(2.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(0.5)
    same = admin.describe_topic(topic_name).partitions[0]
    assert (same.leader, same.leader_epoch) == (before.leader, before.leader_epoch), (before, same)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: leader_of(admin, topic_name) not in (None, before.leader), timeout=30,
                 what="the hung leader to be replaced")
        waited = admin.describe_topic(topic_name).partitions[0]
        assert waited.leader_epoch > before.leader_epoch
    finally:
        os.kill(pid, signal.SIGCONT)
    producer = broker.producer(acks="all")
    producer.send(topic_name, b"after", b"k", partition=0).result(timeout=60)   # the new leader serves
    producer.close()

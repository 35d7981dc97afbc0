"""Idempotent producer: retries are appended once, in order, also across leader failover."""
from __future__ import annotations

import collections
import threading
import time

import pyarrow as pa
import pytest
import ray

import ray_broker as rb
from tests.helpers import leader_of, read_partition, replica, stored_batch, wait_for

pytestmark = pytest.mark.timeout(300)


def test_resent_batch_is_appended_once_with_original_offsets(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name)
    leader = replica(topic_name, 0, 0)
    pid = ray.get(broker.controller.allocate_producer_ids.remote(1))
    batch = stored_batch([b"a", b"b", b"c"])
    first = ray.get(leader.produce.remote(batch, -1, 5000, pid, 0, 0))
    again = ray.get(leader.produce.remote(batch, -1, 5000, pid, 0, 0))     # the retry after a lost answer
    assert (again.base_offset, again.duplicate) == (first.base_offset, True)
    assert ray.get(leader.list_offset.remote("latest")) == 3
    assert ray.get(leader.producer_state.remote())["duplicates_dropped"] == 1


def test_a_new_producers_second_batch_arriving_first_waits_for_the_first(broker, topic_name):
    # Ray does not keep call order on async actors: a brand-new producer's pipelined batches can
    # reach the leader out of order. The second (sequence 2) must wait for sequence 0, not be
    # refused as an unknown producer (which aborted a new transactional producer's first transaction).
    admin = broker.admin()
    admin.create_topic(topic_name)
    leader = replica(topic_name, 0, 0)
    pid = ray.get(broker.controller.allocate_producer_ids.remote(1))
    second = leader.produce.remote(stored_batch([b"c"]), -1, 5000, pid, 0, 2)
    time.sleep(0.1)                                   # the second is already waiting at the leader
    first = leader.produce.remote(stored_batch([b"a", b"b"]), -1, 5000, pid, 0, 0)
    r1, r2 = ray.get([first, second], timeout=30)
    assert (r1.base_offset, r2.base_offset) == (0, 2)
    assert [v for _, _, v in read_partition(broker, topic_name, 0)] == [b"a", b"b", b"c"]


def test_client_retry_after_lost_response_is_deduplicated(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, replication_factor=3, config={"min.insync.replicas": 2})
    leader = replica(topic_name, 0, leader_of(admin, topic_name))
    # the batch is appended, then the answer is lost: the client sees a timeout and resends it
    ray.get(leader.arm_failpoint.remote("replica.after_append", "raise", "BrokerTimeoutError", 1))
    producer = broker.producer(linger_ms=0, retry_backoff_ms=10)
    meta = producer.send(topic_name, value=b"once", key=b"k").result(timeout=60)
    assert meta.offset == 0
    assert ray.get(leader.failpoint_hits.remote("replica.before_append")) == 2      # sent twice
    assert ray.get(leader.producer_state.remote())["duplicates_dropped"] == 1
    assert [v for _, _, v in read_partition(broker, topic_name, 0)] == [b"once"]


def test_five_in_flight_with_second_failing_keep_send_order(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name)
    leader = replica(topic_name, 0, 0)
    # the second produce call fails (retriable, before append); three more are in flight behind it
    ray.get(leader.arm_failpoint.remote("replica.before_append", "raise", "NotEnoughReplicasError", 1, 1))
    producer = broker.producer(linger_ms=0, batch_size=1024, retry_backoff_ms=20,
                               max_in_flight_requests_per_connection=5)   # one produce call per batch
    futures = []
    for i in range(5):
        batch = pa.table({"value": [b"b%d-%d" % (i, j) for j in range(100)]})
        futures.append(producer.send_batch(topic_name, batch, partition=0))
    metas = [f.result(timeout=60) for f in futures]
    assert ray.get(leader.failpoint_hits.remote("replica.before_append")) >= 6      # 5 calls + 1 retry
    values = [v for _, _, v in read_partition(broker, topic_name, 0)]
    assert values == [b"b%d-%d" % (i, j) for i in range(5) for j in range(100)]
    assert [int(m.offsets[0]) for m in metas] == [0, 100, 200, 300, 400]


def test_old_epoch_is_fenced_and_sequence_gap_refused(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name)
    leader = replica(topic_name, 0, 0)
    pid = ray.get(broker.controller.allocate_producer_ids.remote(1))
    ray.get(leader.produce.remote(stored_batch([b"x"]), -1, 5000, pid, 1, 0))
    with pytest.raises(rb.InvalidProducerEpochError, match="epoch 0 is older than the current epoch 1"):
        ray.get(leader.produce.remote(stored_batch([b"old"]), -1, 5000, pid, 0, 1))
    with pytest.raises(rb.OutOfOrderSequenceError, match="expected sequence 1, got 5"):
        ray.get(leader.produce.remote(stored_batch([b"gap"]), -1, 5000, pid, 1, 5))
    assert ray.get(leader.list_offset.remote("latest")) == 1


def test_200k_keyed_records_exactly_once_while_leader_killed_twice(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=2, replication_factor=3, config={"min.insync.replicas": 2})
    producer = broker.producer(linger_ms=5, delivery_timeout_ms=120_000, retry_backoff_ms=50)
    total, keys = 200_000, 50
    progress = {"sent": 0}
    errors = []

    def produce():
        futures = collections.deque()
        for i in range(total):
            k = i % keys
            futures.append(producer.send(topic_name, value=b"%d:%d" % (k, i // keys), key=b"key-%d" % k))
            progress["sent"] = i
            while len(futures) > 20_000:
                try:
                    futures.popleft().result(timeout=180)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
        for f in futures:
            try:
                f.result(timeout=180)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    for n in (1, 2):
        wait_for(lambda: progress["sent"] > n * total // 3, timeout=120, what="progress")
        before = admin.describe_topic(topic_name).partitions[0]
        ray.kill(replica(topic_name, 0, before.leader))
        wait_for(lambda: admin.describe_topic(topic_name).partitions[0].leader_epoch > before.leader_epoch
                 and admin.describe_topic(topic_name).partitions[0].leader is not None, timeout=30, what="election")
    thread.join(timeout=240)
    assert not thread.is_alive() and not errors, errors[:3]
    seen = collections.Counter()
    last_index: dict[bytes, int] = {}
    for p in range(2):
        for _, key, value in read_partition(broker, topic_name, p):
            seen[value] += 1
            k, idx = value.split(b":")
            assert int(idx) > last_index.get(k, -1), f"per-key order broken for {k!r} at {idx!r}"
            last_index[k] = int(idx)
    assert len(seen) == total, f"{total - len(seen)} records missing"
    dups = [v for v, c in seen.items() if c > 1]
    assert not dups, f"{len(dups)} duplicated, e.g. {dups[:5]}"

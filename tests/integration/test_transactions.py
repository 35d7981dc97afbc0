"""Transactions: atomic multi-partition writes, read_committed isolation, coordinator and client faults."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest
import ray

import ray_broker as rb
from tests.helpers import leader_of, read_partition, replica, stored_batch, wait_for

pytestmark = pytest.mark.timeout(240)


def committed_values(cluster, topic, partitions):
    """Everything a read_committed consumer sees, once the LSO has caught up with the HW."""
    out = []
    for p in range(partitions):
        out.extend(v for _, _, v in read_partition(cluster, topic, p))
    return out


def wait_stable(admin, topic):
    """Markers land moments after commit returns: wait for LSO == HW on every partition."""
    wait_for(lambda: all(p.last_stable_offset == p.high_watermark for p in admin.describe_topic(topic).partitions),
             timeout=60, what="last stable offset to reach the high watermark")


def coordinator():
    return ray.get_actor("txn-coordinator/0", namespace="ray_broker")


def test_commit_is_atomic_across_topics_and_abort_hides_everything(broker, topic_name):
    admin = broker.admin()
    topics = [f"{topic_name}-{i}" for i in range(3)]
    for t in topics:
        admin.create_topic(t, partitions=2, replication_factor=2)
    producer = broker.producer(transactional_id=f"{topic_name}-tx")
    producer.init_transactions()
    producer.begin_transaction()
    for t in topics:
        for p in range(2):
            producer.send(t, value=f"c-{t}-{p}".encode(), partition=p)
    producer.commit_transaction()
    producer.begin_transaction()
    for t in topics:
        for p in range(2):
            producer.send(t, value=f"a-{t}-{p}".encode(), partition=p)
    producer.flush()
    producer.abort_transaction()
    producer.begin_transaction()
    producer.send(topics[0], value=b"after", partition=0)
    producer.commit_transaction()
    for t in topics:
        wait_stable(admin, t)
    for t in topics:
        values = committed_values(broker, t, 2)
        expected = [f"c-{t}-{p}".encode() for p in range(2)] + ([b"after"] if t == topics[0] else [])
        assert sorted(values) == sorted(expected), (t, values)
    # read_uncommitted sees the aborted records too (they are in the log)
    raw = [v for _, _, v in read_partition(broker, topics[1], 0, isolation="read_uncommitted")]
    assert raw == [f"c-{topics[1]}-0".encode(), f"a-{topics[1]}-0".encode()]


def test_interleaved_producers_half_committed_half_aborted(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=3, replication_factor=2)
    rng = random.Random(7)
    producers = [broker.producer(transactional_id=f"{topic_name}-p{i}") for i in range(4)]
    for p in producers:
        p.init_transactions()
    committed, per_partition = set(), {}
    for round_ in range(6):
        for p in producers:
            p.begin_transaction()
        staged = {id(p): [] for p in producers}
        for _ in range(rng.randint(20, 80)):
            p = rng.choice(producers)
            value = f"r{round_}-{rng.random():.12f}".encode()
            part = rng.randrange(3)
            p.send(topic_name, value=value, partition=part)
            staged[id(p)].append((part, value))
        for i, p in enumerate(producers):
            if (i + round_) % 2 == 0:
                p.commit_transaction()
                for part, value in staged[id(p)]:
                    committed.add(value)
                    per_partition.setdefault(part, []).append(value)
            else:
                p.abort_transaction()
    wait_stable(admin, topic_name)
    seen = []
    for part in range(3):
        values = [v for _, _, v in read_partition(broker, topic_name, part)]
        seen.extend(values)
        # per-partition order of each producer's committed records is preserved
        order = {v: i for i, v in enumerate(values)}
        mine = [v for v in per_partition.get(part, [])]
        assert [v for v in sorted(mine, key=order.__getitem__)] == [v for v in values if v in set(mine)]
    assert sorted(seen) == sorted(committed)
    assert len(seen) == len(set(seen))


def test_calls_out_of_order_raise_and_change_nothing(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name)
    producer = broker.producer(transactional_id=f"{topic_name}-tx")
    with pytest.raises(rb.InvalidTxnStateError):
        producer.begin_transaction()                 # before init_transactions
    producer.init_transactions()
    with pytest.raises(rb.InvalidTxnStateError):
        producer.commit_transaction()                # commit without begin
    with pytest.raises(rb.InvalidTxnStateError):
        producer.send(topic_name, value=b"x")        # send outside a transaction
    producer.begin_transaction()
    with pytest.raises(rb.InvalidTxnStateError):
        producer.begin_transaction()                 # begin twice
    producer.send(topic_name, value=b"ok")
    producer.commit_transaction()
    wait_stable(admin, topic_name)
    assert committed_values(broker, topic_name, 1) == [b"ok"]


def test_new_instance_fences_the_old_one(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=2)
    tid = f"{topic_name}-tx"
    old = broker.producer(transactional_id=tid)
    old.init_transactions()
    old.begin_transaction()
    old.send(topic_name, value=b"zombie-1", partition=0)
    old.flush()
    new = broker.producer(transactional_id=tid)
    new.init_transactions()                      # bumps the epoch and aborts the old transaction
    with pytest.raises((rb.ProducerFencedError, rb.InvalidProducerEpochError)):
        old.send(topic_name, value=b"zombie-2", partition=1).result(timeout=30)
    with pytest.raises((rb.ProducerFencedError, rb.InvalidProducerEpochError)):
        old.commit_transaction()
    new.begin_transaction()
    new.send(topic_name, value=b"fresh", partition=0)
    new.commit_transaction()
    wait_stable(admin, topic_name)
    assert committed_values(broker, topic_name, 2) == [b"fresh"]


def test_killed_producer_is_aborted_after_its_timeout(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=2)
    script = textwrap.dedent(f"""
        import os, ray_broker as rb
        c = rb.connect()                          # RAY_ADDRESS: the test session's cluster
        p = c.producer(transactional_id="{topic_name}-tx", transaction_timeout_ms=2000)
        p.init_transactions()
        p.begin_transaction()
        for i in range(100):
            p.send("{topic_name}", value=b"doomed-%d" % i, partition=i % 2)
        p.flush()
        print("SENT", flush=True)
        os._exit(9)                               # dies mid-transaction
    """)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "SENT" in proc.stdout, proc.stderr[-3000:]
    assert max(p.high_watermark for p in admin.describe_topic(topic_name).partitions) > 0
    wait_stable(admin, topic_name)               # the coordinator aborted it: the LSO moves on
    assert committed_values(broker, topic_name, 2) == []
    desc = admin.describe_transaction(f"{topic_name}-tx")
    assert desc.state in ("COMPLETE_ABORT", "PREPARE_ABORT")


@pytest.mark.parametrize("failpoint", ["txn.before_markers", "txn.after_first_marker"])
def test_coordinator_crash_after_decision_completes_as_decided(broker, topic_name, failpoint):
    admin = broker.admin()
    topics = [f"{topic_name}-a", f"{topic_name}-b"]
    for t in topics:
        admin.create_topic(t, partitions=2)
    producer = broker.producer(transactional_id=f"{topic_name}-tx", delivery_timeout_ms=60_000)
    producer.init_transactions()
    producer.begin_transaction()
    for t in topics:
        for p in range(2):
            producer.send(t, value=f"{t}-{p}".encode(), partition=p)
    producer.flush()
    ray.get(coordinator().arm_failpoint.remote(failpoint, "crash"))
    producer.commit_transaction()                # the coordinator dies mid-commit; Ray restarts it
    for t in topics:
        wait_stable(admin, t)
    for t in topics:
        assert sorted(committed_values(broker, t, 2)) == [f"{t}-0".encode(), f"{t}-1".encode()]
    wait_for(lambda: admin.describe_transaction(f"{topic_name}-tx").state == "COMPLETE_COMMIT", timeout=30,
             what="transaction completed")


def test_markers_from_an_older_coordinator_epoch_are_refused(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name)
    producer = broker.producer(transactional_id=f"{topic_name}-tx")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic_name, value=b"v")
    producer.commit_transaction()
    wait_stable(admin, topic_name)
    leader = replica(topic_name, 0, leader_of(admin, topic_name))
    pid = producer.idempotence.producer_id
    epoch = ray.get(coordinator().ping.remote())["coordinator_epoch"]
    with pytest.raises(rb.TransactionCoordinatorFencedError):
        ray.get(leader.write_txn_markers.remote([(pid, 99, False, epoch - 1)]))
    hw = admin.describe_topic(topic_name).partitions[0].high_watermark
    assert committed_values(broker, topic_name, 1) == [b"v"] and hw == 2


def test_paused_coordinator_is_replaced_and_its_process_cannot_act(broker, topic_name):
    """SIGSTOP the coordinator mid-transaction: the controller misses its heartbeats for
    coordinator.session.timeout.ms, kills it and starts a replacement under a new coordinator epoch,
    which completes the commit. The paused process, resumed, is gone or fenced: the result holds."""
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=2, replication_factor=2)
    tid = f"{topic_name}-tx"
    producer = broker.producer(transactional_id=tid)
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(20):
        producer.send(topic_name, value=b"v%d" % i, partition=i % 2)
    producer.flush()
    old = coordinator()
    old_epoch = ray.get(old.ping.remote())["coordinator_epoch"]
    old_pid = ray.get(old.liveness.remote())
    os.kill(old_pid, signal.SIGSTOP)
    try:
        producer.commit_transaction()   # retried until the replacement answers
    finally:
        try:
            os.kill(old_pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    new = coordinator()
    assert ray.get(new.liveness.remote()) != old_pid
    assert ray.get(new.ping.remote())["coordinator_epoch"] > old_epoch
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(old.liveness.remote(), timeout=30)
    wait_stable(admin, topic_name)
    wait_for(lambda: admin.describe_transaction(tid).state == "COMPLETE_COMMIT", timeout=30,
             what="the replacement completed the commit")
    assert sorted(committed_values(broker, topic_name, 2)) == sorted(b"v%d" % i for i in range(20))
    # the next transaction of the same producer runs on the replacement
    producer.begin_transaction()
    producer.send(topic_name, value=b"after", partition=0)
    producer.commit_transaction()
    wait_stable(admin, topic_name)
    assert committed_values(broker, topic_name, 2).count(b"after") == 1


def test_exhausted_epoch_rotates_to_a_new_producer_id(broker, topic_name):
    """A transactional id whose durable state sits at the last usable epoch (written to
    __transaction_state as the coordinator writes it; reaching it by 32k commits would take minutes):
    after a reload, the producer commits at that epoch, gets a new producer id, and keeps working."""
    from ray_broker.actors.txn_coordinator_actor import records_batch
    from ray_broker.protocol import TXN_STATE_TOPIC
    from ray_broker.txn.metadata import EXHAUSTED_PRODUCER_EPOCH
    from ray_broker.txn.records import TxnLogValue, txn_record
    from ray_broker.txn.state import TxnState

    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=2)
    tid = f"{topic_name}-tx"
    worn_pid = ray.get(broker.controller.allocate_producer_ids.remote(1))
    now = int(time.time() * 1000)
    record = txn_record(tid, TxnLogValue(worn_pid, EXHAUSTED_PRODUCER_EPOCH - 1, -1, -1, -1, 60_000,
                                         TxnState.COMPLETE_COMMIT, frozenset(), -1, now))
    state_leader = replica(TXN_STATE_TOPIC, 0, leader_of(admin, TXN_STATE_TOPIC, 0))
    ray.get(state_leader.produce.remote(records_batch([record]), -1, 10_000))
    old_pid = ray.get(coordinator().liveness.remote())
    ray.kill(coordinator())          # the replacement loads the crafted state from the log

    def reloaded():
        try:
            return ray.get(coordinator().liveness.remote(), timeout=5) != old_pid
        except Exception:  # noqa: BLE001 - not recreated yet
            return False

    wait_for(reloaded, timeout=60, what="coordinator recreated")
    producer = broker.producer(transactional_id=tid)
    producer.init_transactions()
    assert producer.idempotence.producer_id == worn_pid
    assert producer.idempotence.producer_epoch == EXHAUSTED_PRODUCER_EPOCH
    producer.begin_transaction()
    producer.send(topic_name, value=b"at-the-last-epoch")
    producer.commit_transaction()
    assert producer.idempotence.producer_id != worn_pid and producer.idempotence.producer_epoch == 0
    producer.begin_transaction()
    producer.send(topic_name, value=b"with-the-new-id")
    producer.commit_transaction()
    wait_stable(admin, topic_name)
    assert committed_values(broker, topic_name, 1) == [b"at-the-last-epoch", b"with-the-new-id"]


def test_partition_leader_killed_during_commit(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=2, replication_factor=3, config={"min.insync.replicas": 2})
    producer = broker.producer(transactional_id=f"{topic_name}-tx", delivery_timeout_ms=90_000)
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(200):
        producer.send(topic_name, value=b"v%d" % i, partition=i % 2)
    producer.flush()
    old = leader_of(admin, topic_name, 0)
    ray.get(replica(topic_name, 0, old).arm_failpoint.remote("replica.before_marker", "crash"))
    producer.commit_transaction()
    wait_for(lambda: leader_of(admin, topic_name, 0) not in (None, old), timeout=30, what="new leader")
    # no wait for the new leader's HW here: end offsets must not go back meanwhile (KIP-207)
    wait_stable(admin, topic_name)
    assert sorted(committed_values(broker, topic_name, 2)) == sorted(b"v%d" % i for i in range(200))


def test_admin_and_cli_show_and_abort_a_hanging_transaction(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name)
    tid = f"{topic_name}-tx"
    producer = broker.producer(transactional_id=tid)
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic_name, value=b"hanging")
    producer.flush()
    assert admin.describe_transaction(tid).state == "ONGOING"
    assert tid in [d.transactional_id for d in admin.list_transactions()]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    out = subprocess.run([sys.executable, "-m", "ray_broker.cli.main", "transactions", "list"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0 and tid in out.stdout and "ONGOING" in out.stdout, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "ray_broker.cli.main", "transactions", "abort", tid],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    wait_stable(admin, topic_name)           # the LSO no longer hangs on the open transaction
    assert committed_values(broker, topic_name, 1) == []
    with pytest.raises((rb.ProducerFencedError, rb.InvalidProducerEpochError)):
        producer.commit_transaction()


def test_adds_from_many_partition_leaders_share_one_coordinator_append(broker, topic_name):
    """Six leaders each add their partition to the transaction (KIP-890): the ones arriving while
    the coordinator's first append is in flight are decided together and logged in ONE append."""
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=6, replication_factor=1)
    tid = f"{topic_name}-tx"
    producer = broker.producer(transactional_id=tid)
    producer.init_transactions()
    pid, epoch = producer.idempotence.producer_id, producer.idempotence.producer_epoch
    before = ray.get(coordinator().ping.remote())["log_appends"]
    # the first add's append stalls (the coordinator's event loop with it) while the other five
    # arrive; the leaders' calls are made here directly (the producer adds all six ahead in one call)
    ray.get(coordinator().arm_failpoint.remote("coordinator.before_append", "delay", 1500))
    ray.get([coordinator().add_partitions_from_leader.remote(tid, pid, epoch, [(topic_name, p)]) for p in range(6)])
    assert ray.get(coordinator().ping.remote())["log_appends"] - before == 2
    assert set(admin.describe_transaction(tid).partitions) == {(topic_name, p) for p in range(6)}
    producer.begin_transaction()
    for p in range(6):
        producer.send(topic_name, value=f"v{p}".encode(), partition=p)
    producer.flush()
    assert ray.get(coordinator().ping.remote())["log_appends"] - before == 2      # all added already
    producer.commit_transaction()
    wait_stable(admin, topic_name)
    assert sorted(committed_values(broker, topic_name, 6)) == [f"v{p}".encode() for p in range(6)]
    described = admin.describe_transaction(f"{topic_name}-tx")
    assert described.state in ("COMPLETE_COMMIT", "EMPTY"), described


def _first_transaction_with_a_stalled_marker(broker, topic_name, **producer_config):
    """Two partitions; a transaction that wrote b"first" to partition 0 is flushed, not committed,
    and partition 0's next marker will stall 1.5 s, so an add of the next transaction (partition
    1) waits for it. Returns (admin, transactional id, producer)."""
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=2, replication_factor=1)
    wait_stable(admin, topic_name)
    tid = f"{topic_name}-tx"
    producer = broker.producer(transactional_id=tid, **producer_config)
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic_name, value=b"first", partition=0)
    producer.flush()
    ray.get(replica(topic_name, 0, leader_of(admin, topic_name, 0)).arm_failpoint.remote(
        "replica.before_marker", "delay", 1500))
    return admin, tid, producer


def test_the_next_transactions_add_rides_with_the_previous_completion(broker, topic_name):
    """An add waiting for the previous transaction's markers is logged together with its
    completion: one coordinator append (PREPARE_COMMIT -> ONGOING) instead of COMPLETE then ONGOING."""
    admin, tid, producer = _first_transaction_with_a_stalled_marker(broker, topic_name)
    before = ray.get(coordinator().ping.remote())["log_appends"]
    producer.commit_transaction()
    producer.begin_transaction()
    producer.send(topic_name, value=b"second", partition=1)
    producer.flush()                                   # acknowledged: partition 1 is in the transaction
    assert ray.get(coordinator().ping.remote())["log_appends"] - before == 2   # PREPARE_COMMIT, then ONGOING
    described = admin.describe_transaction(tid)
    assert (described.state, described.partitions) == ("ONGOING", ((topic_name, 1),)), described
    producer.commit_transaction()
    wait_stable(admin, topic_name)
    assert sorted(committed_values(broker, topic_name, 2)) == [b"first", b"second"]


def test_coordinator_crash_before_the_completion_that_carries_a_waiting_add(broker, topic_name):
    """The next transaction's add waits for the previous one's markers, to ride its completion
    append; the coordinator dies right before that append. The restarted coordinator completes the
    previous transaction from its PREPARE record, the leader's add is retried and lands, and every
    record is committed once."""
    admin, tid, producer = _first_transaction_with_a_stalled_marker(broker, topic_name,
                                                                    delivery_timeout_ms=60_000)
    epoch = ray.get(coordinator().ping.remote())["coordinator_epoch"]
    ray.get(coordinator().arm_failpoint.remote("txn.before_complete", "crash"))
    producer.commit_transaction()
    producer.begin_transaction()
    producer.send(topic_name, value=b"second", partition=1)
    producer.flush()                 # its add waited for the markers, then for the restarted coordinator
    assert ray.get(coordinator().ping.remote())["coordinator_epoch"] > epoch, "the coordinator did not restart"
    # its first produce call died with the coordinator while the add waited in it; a retry landed
    # (more than one when a retry reaches the coordinator before it has reloaded its log)
    leader1 = replica(topic_name, 1, leader_of(admin, topic_name, 1))
    assert ray.get(leader1.failpoint_hits.remote("replica.before_append")) >= 2
    producer.commit_transaction()
    wait_stable(admin, topic_name)
    assert sorted(committed_values(broker, topic_name, 2)) == [b"first", b"second"]
    wait_for(lambda: admin.describe_transaction(tid).state == "COMPLETE_COMMIT", timeout=30,
             what="transaction completed")


def test_the_producer_adds_its_partitions_ahead_of_its_produce_calls(broker, topic_name):
    """Kafka's AddPartitionsToTxn: once the producer knows the partitions of its transaction it adds
    them to it in one coordinator call, before its produce calls reach the leaders (held here 3 s
    before they write, and before they would add their partition themselves)."""
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=3, replication_factor=1)
    wait_stable(admin, topic_name)
    tid = f"{topic_name}-tx"
    producer = broker.producer(transactional_id=tid, linger_ms=100)   # the three sends drain together
    producer.init_transactions()
    leaders = [replica(topic_name, p, leader_of(admin, topic_name, p)) for p in range(3)]
    ray.get([r.arm_failpoint.remote("replica.before_append", "delay", 3000) for r in leaders])
    before = ray.get(coordinator().ping.remote())["log_appends"]
    producer.begin_transaction()
    for p in range(3):
        producer.send(topic_name, value=f"v{p}".encode(), partition=p)
    wait_for(lambda: set(admin.describe_transaction(tid).partitions) == {(topic_name, p) for p in range(3)},
             timeout=2.5, what="the transaction's partitions added while the leaders are held")
    assert ray.get(coordinator().ping.remote())["log_appends"] - before == 1     # one add for all three
    producer.commit_transaction()
    wait_stable(admin, topic_name)
    assert sorted(committed_values(broker, topic_name, 3)) == [b"v0", b"v1", b"v2"]


def test_admin_waits_for_a_restarting_coordinator(broker, topic_name):
    """Admin calls to a coordinator Ray is restarting are retried, not raised (ActorUnavailableError)."""
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1)
    producer = broker.producer(transactional_id=f"{topic_name}-tx")
    producer.init_transactions()
    with producer.transaction():
        producer.send(topic_name, value=b"v", partition=0)
    ray.kill(coordinator(), no_restart=False)      # Ray restarts it; it reloads its log lazily
    desc = admin.describe_transaction(f"{topic_name}-tx")
    assert desc.state in ("COMPLETE_COMMIT", "PREPARE_COMMIT"), desc
    assert any(d.transactional_id == f"{topic_name}-tx" for d in admin.list_transactions())


def test_a_retried_marker_answers_only_once_it_is_replicated(broker, topic_name):
    """A marker write that timed out waiting for the ISR is retried by the coordinator; the retry
    finds the marker already in the leader's log and must still wait for it to be replicated, or
    the coordinator would complete a transaction whose marker a leader change could lose."""
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=2)
    wait_for(lambda: len(admin.describe_topic(topic_name).partitions[0].isr) == 2, timeout=30, what="a full ISR")
    lid = leader_of(admin, topic_name)
    leader, follower = replica(topic_name, 0, lid), replica(topic_name, 0, 1 - lid)
    ray.get(follower.arm_failpoint.remote("follower.before_append", "delay", 3000), timeout=30)
    marker = [(987_654, 5, False, 0)]     # a producer new to the partition: any coordinator epoch
    with pytest.raises(rb.BrokerError):
        ray.get(leader.write_txn_markers.remote(marker, 300), timeout=30)     # the ISR is slow: times out
    assert ray.get(leader.write_txn_markers.remote(marker, 20_000), timeout=30) == [-1]   # already written
    assert admin.describe_topic(topic_name).partitions[0].high_watermark == 1, "answered before replication"

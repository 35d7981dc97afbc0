"""Consumer groups on a real broker: assignment, failover, cooperative rebalances, offsets, coordinator restart."""
from __future__ import annotations

import threading
import time

import pytest
import ray

import ray_broker as rb
from ray_broker.errors import (IllegalGenerationError, NonEmptyGroupError, TransactionCoordinatorFencedError,
                               UnknownMemberIdError, UnstableOffsetCommitError)
from ray_broker.group.state import GroupState
from ray_broker.protocol import group_coordinator_name
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(300)

SESSION_MS = 3000
GROUP_CFG = dict(auto_offset_reset="earliest", session_timeout_ms=SESSION_MS, heartbeat_interval_ms=300,
                 max_poll_interval_ms=30_000)


def coordinator(broker, group_id):
    from ray_broker.client.partitioner import murmur2, to_positive

    n = ray.get(broker.controller.cluster_info.remote())["group_coordinators"]
    name = group_coordinator_name(to_positive(murmur2(group_id.encode())) % n)

    def find():
        try:
            return ray.get_actor(name, namespace="ray_broker")
        except ValueError:      # internal topics still being created, or being recreated
            return None
    return wait_for(find, timeout=90, what=f"actor {name}")


def describe(broker, group_id):
    return ray.get(coordinator(broker, group_id).describe_group.remote(group_id), timeout=60)


def create_topic(broker, name, partitions):
    """Create a topic; on a loaded machine the leaders may take longer than the controller waits."""
    admin = broker.admin()
    try:
        admin.create_topic(name, partitions=partitions)
    except rb.BrokerTimeoutError:
        wait_for(lambda: all(p.leader is not None for p in admin.describe_topic(name).partitions),
                 timeout=200, what=f"leaders of {name}")


@pytest.fixture(scope="module")
def six_partitions(broker):
    """One 6-partition topic with 5 records per partition, shared by the membership tests (each
    uses its own group): creating replica actors is the slow part of these tests."""
    name = "groups-six-partitions"
    create_topic(broker, name, 6)
    produce(broker, name, 6)
    return name


def produce(broker, topic, partitions, per_partition=5):
    producer = broker.producer(linger_ms=0)
    for p in range(partitions):
        for i in range(per_partition):
            producer.send(topic, value=b"%d-%d" % (p, i), partition=p)
    producer.flush(timeout=60)
    producer.close()


class Member:
    """A group consumer polling in its own thread; records callbacks, assignment and records."""

    def __init__(self, broker, group_id, topic, assignor="range", name="", **cfg):
        self.name = name
        self.consumer = broker.consumer(group_id=group_id, client_id=name, **{**GROUP_CFG, **cfg})
        self.lock = threading.Lock()
        self.assigned: list[list] = []
        self.revoked: list[list] = []
        self.lost: list[list] = []
        self.assignment: frozenset = frozenset()
        self.values: list[bytes] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.consumer.subscribe([topic], on_assign=lambda tps: self._log(self.assigned, tps),
                                on_revoke=lambda tps: self._log(self.revoked, tps),
                                on_lost=lambda tps: self._log(self.lost, tps), assignor=assignor)
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"member-{name}")
        self.thread.start()

    def _log(self, target, tps):
        with self.lock:
            target.append(list(tps))

    def _run(self):
        try:
            while not self.stop.is_set():
                out = self.consumer.poll(0.2)
                with self.lock:
                    self.assignment = frozenset(self.consumer.assignment())
                    for batch in out.values():
                        self.values.extend(batch.column("value").to_pylist())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def close(self, leave_group=True):
        self.stop.set()
        self.thread.join(timeout=30)
        self.consumer.close(leave_group=leave_group)


def owners(members):
    """{tp: [names]} over the members' current assignments."""
    out: dict = {}
    for m in members:
        assert m.error is None, f"{m.name}: {m.error!r}"
        for tp in m.assignment:
            out.setdefault(tp, []).append(m.name)
    return out


def balanced(members, partitions, topic, group_id, broker):
    """Every partition owned by exactly one member, the group STABLE, loads within one."""
    o = owners(members)
    if set(o) != {rb.TopicPartition(topic, p) for p in range(partitions)}:
        return False
    if any(len(v) != 1 for v in o.values()):
        return False
    loads = [len(m.assignment) for m in members]
    if max(loads) - min(loads) > 1:
        return False
    d = describe(broker, group_id)
    if d.state is not GroupState.STABLE or len(d.members) != len(members):
        return False
    return {mm.member_id: set(mm.assignment) for mm in d.members} == {
        m.consumer.group_metadata().member_id: set(m.assignment) for m in members}


def test_three_members_share_six_partitions_and_a_dead_members_partitions_move(broker, six_partitions):
    topic_name = six_partitions
    group = "g-three-members"
    members = [Member(broker, group, topic_name, name=f"m{i}") for i in range(3)]
    try:
        wait_for(lambda: balanced(members, 6, topic_name, group, broker), timeout=60, what="3-way assignment")
        assert sorted(len(m.assignment) for m in members) == [2, 2, 2]
        wait_for(lambda: sum(len(m.values) for m in members) >= 30, timeout=30, what="all records consumed")
        gen = describe(broker, group).generation_id

        dead, alive = members[0], members[1:]
        orphaned = set(dead.assignment)
        dead.close(leave_group=False)           # stops heartbeating, never leaves: a crash
        t0 = time.monotonic()
        wait_for(lambda: balanced(alive, 6, topic_name, group, broker), timeout=SESSION_MS / 1000 + 15,
                 what="dead member's partitions moved")
        elapsed = time.monotonic() - t0
        assert elapsed < SESSION_MS / 1000 + 5, elapsed
        assert orphaned <= set().union(*(m.assignment for m in alive))
        assert describe(broker, group).generation_id > gen
        # eager ("range"): survivors gave everything back before rejoining, then got the new set
        assert all(m.revoked for m in alive)
    finally:
        for m in members[1:]:
            m.close()
    assert describe(broker, group).state is GroupState.EMPTY


def test_cooperative_sticky_new_member_gets_a_fair_share_without_needless_revocations(broker, six_partitions):
    topic_name = six_partitions
    group = "g-cooperative"
    members = [Member(broker, group, topic_name, assignor="cooperative-sticky", name=f"c{i}") for i in range(3)]
    try:
        wait_for(lambda: balanced(members, 6, topic_name, group, broker), timeout=60, what="3-way assignment")
        before = {tp: names[0] for tp, names in owners(members).items()}
        for m in members:
            with m.lock:
                assert not m.revoked, (m.name, m.revoked)   # first assignment revokes nothing
                m.revoked.clear()
        newcomer = Member(broker, group, topic_name, assignor="cooperative-sticky", name="c3")
        members.append(newcomer)
        wait_for(lambda: balanced(members, 6, topic_name, group, broker), timeout=60, what="4-way assignment")
        assert sorted(len(m.assignment) for m in members) == [1, 1, 2, 2]
        after = {tp: names[0] for tp, names in owners(members).items()}
        moved = {tp for tp in after if after[tp] != before[tp]}
        assert moved == set(newcomer.assignment)
        revoked = [tp for m in members for call in m.revoked for tp in call]
        assert sorted(revoked) == sorted(moved), "only partitions that moved are revoked, each once"
        assert not newcomer.revoked and not any(m.lost for m in members)
    finally:
        for m in members:
            m.close()


def test_commit_committed_round_trip_and_reset_refused_while_members_live(broker, topic_name):
    create_topic(broker, topic_name, 2)
    produce(broker, topic_name, 2, per_partition=10)
    group = f"g-{topic_name}"
    tp0, tp1 = rb.TopicPartition(topic_name, 0), rb.TopicPartition(topic_name, 1)
    c = broker.consumer(group_id=group, **GROUP_CFG)
    c.subscribe(topic_name)
    seen = 0
    deadline = time.monotonic() + 30
    while seen < 20 and time.monotonic() < deadline:
        seen += sum(b.num_rows for b in c.poll(0.5).values())
    assert seen == 20 and c.assignment() == {tp0, tp1}
    assert c.committed([tp0, tp1]) == {tp0: None, tp1: None}
    c.commit()                                               # current positions
    assert c.committed([tp0, tp1]) == {tp0: 10, tp1: 10}
    c.commit({tp0: 3})
    assert c.committed([tp0]) == {tp0: 3}
    meta = c.group_metadata()
    assert meta.group_id == group and meta.generation_id >= 1 and meta.member_id

    gc = coordinator(broker, group)
    with pytest.raises(NonEmptyGroupError, match="live member"):
        ray.get(gc.reset_offsets.remote(group, {tp0: 0}))
    c.close()
    assert describe(broker, group).state is GroupState.EMPTY
    assert ray.get(gc.reset_offsets.remote(group, {tp0: 7, tp1: 1})) == {tp0: 7, tp1: 1}

    # a new member starts from the committed (reset) offsets
    c2 = broker.consumer(group_id=group, **GROUP_CFG)
    c2.subscribe([topic_name])
    got = {}
    deadline = time.monotonic() + 30
    while sum(len(v) for v in got.values()) < 12 and time.monotonic() < deadline:
        for tp, b in c2.poll(0.5).items():
            got.setdefault(tp, []).extend(b.column("offset").to_pylist())
    assert got[tp0] == list(range(7, 10)) and got[tp1] == list(range(1, 10))
    c2.close()

    # a manually assigned consumer commits as a "simple" group (generation -1, no member)
    m = broker.consumer(group_id=group, **GROUP_CFG)
    m.assign([tp0])
    m.commit({tp0: 9})
    assert m.committed([tp0]) == {tp0: 9} and m.group_metadata().generation_id == -1
    m.close()


def test_auto_commit_and_max_poll_interval(broker, topic_name):
    create_topic(broker, topic_name, 1)
    produce(broker, topic_name, 1, per_partition=4)
    group = f"g-{topic_name}"
    tp = rb.TopicPartition(topic_name, 0)
    lost = []
    # a long session: the member must leave on its own (LeaveGroup), not by missing heartbeats
    c = broker.consumer(group_id=group, enable_auto_commit=True, auto_commit_interval_ms=200,
                        **{**GROUP_CFG, "max_poll_interval_ms": 1500, "session_timeout_ms": 60_000})
    c.subscribe([topic_name], on_lost=lost.append)
    n = 0
    deadline = time.monotonic() + 30
    while n < 4 and time.monotonic() < deadline:
        n += sum(b.num_rows for b in c.poll(0.3).values())
    time.sleep(0.3)
    c.poll(0)                                    # auto-commits the positions of what poll returned
    assert c.committed([tp]) == {tp: 4}
    member = c.group_metadata().member_id
    time.sleep(3.0)                              # no poll for > max.poll.interval.ms: the member leaves
    wait_for(lambda: not describe(broker, group).members, timeout=10, what="member left after poll timeout")
    deadline = time.monotonic() + 20
    while c.group_metadata().member_id in (None, member) and time.monotonic() < deadline:
        c.poll(0.3)                                  # reports the loss, rejoins as a new member
    assert lost == [[tp]] and c.group_metadata().member_id not in (None, member)
    c.close()


def test_group_coordinator_killed_is_recreated_with_offsets_and_membership(broker, six_partitions):
    topic_name = six_partitions
    group = "g-coordinator-killed"
    members = [Member(broker, group, topic_name, name=f"k{i}") for i in range(2)]
    try:
        wait_for(lambda: balanced(members, 6, topic_name, group, broker), timeout=60, what="assignment")
        gc = coordinator(broker, group)
        tps = [rb.TopicPartition(topic_name, p) for p in range(6)]
        other = f"{group}-other"                 # a group with offsets only
        ray.get(coordinator(broker, other).reset_offsets.remote(other, {tps[0]: 5}))
        offsets = {tp: 1 + tp.partition for tp in tps}
        before = describe(broker, group)
        owner = {tp: m for m in members for tp in m.assignment}
        for tp, off in offsets.items():
            md = owner[tp].consumer.group_metadata()
            ray.get(gc.commit_offsets.remote(group, md.generation_id, md.member_id, {tp: off}))
        epoch = ray.get(gc.ping.remote())["coordinator_epoch"]

        ray.kill(gc)
        def reloaded():
            try:
                return ray.get(coordinator(broker, group).ping.remote(), timeout=10)["coordinator_epoch"] > epoch
            except Exception:  # noqa: BLE001 - not recreated yet
                return False
        wait_for(reloaded, timeout=60, what="group coordinator recreated")
        after = describe(broker, group)
        assert after.generation_id == before.generation_id and after.state is GroupState.STABLE
        assert {m.member_id: m.assignment for m in after.members} == {
            m.member_id: m.assignment for m in before.members}
        assert {tp: om.offset for tp, om in after.offsets.items()} == offsets
        assert members[0].consumer.committed(tps) == offsets
        assert {tp: om.offset for tp, om in describe(broker, other).offsets.items()} == {tps[0]: 5}
        # the members keep heartbeating the new incarnation: no rebalance, nobody expires
        time.sleep(SESSION_MS / 1000 + 1)
        final = describe(broker, group)
        assert final.generation_id == before.generation_id and len(final.members) == 2
        assert all(not m.lost and m.error is None for m in members)
        groups = {g.group_id for g in ray.get(coordinator(broker, group).list_groups.remote())}
        assert group in groups
    finally:
        for m in members:
            m.close()


def test_txn_offsets_pending_until_marker_and_zombie_generation_refused(broker, topic_name):
    create_topic(broker, topic_name, 1)
    produce(broker, topic_name, 1, per_partition=6)
    group = f"g-{topic_name}"
    tp = rb.TopicPartition(topic_name, 0)
    gc = coordinator(broker, group)
    pid = ray.get(broker.controller.allocate_producer_ids.remote(1))
    # a simple group (no members): generation -1 is accepted; the offsets stay pending
    ray.get(gc.txn_offset_commit.remote("tx-a", pid, 0, group, -1, None, {tp: 2}))
    with pytest.raises(UnstableOffsetCommitError):
        ray.get(gc.fetch_offsets.remote(group, [tp]))
    assert ray.get(gc.fetch_offsets.remote(group, [tp], False)) == {tp: None}
    # a new owner does not start until the transaction ends (require_stable), then at its offset
    c = broker.consumer(group_id=group, **GROUP_CFG)
    c.subscribe([topic_name])
    for _ in range(8):
        assert not c.poll(0.25)
    assert c.assignment() == {tp}
    ray.get(gc.write_txn_marker.remote(pid, 0, True, 0))
    ray.get(gc.write_txn_marker.remote(pid, 0, True, 0))              # retried marker: harmless
    with pytest.raises(TransactionCoordinatorFencedError):
        ray.get(gc.write_txn_marker.remote(pid, 0, True, -1))         # an older coordinator's marker
    offsets = []
    deadline = time.monotonic() + 30
    while len(offsets) < 4 and time.monotonic() < deadline:
        for b in c.poll(0.5).values():
            offsets.extend(b.column("offset").to_pylist())
    assert offsets == [2, 3, 4, 5]
    # KIP-447: a zombie with a stale generation / unknown member cannot add offsets; an abort drops them
    meta = c.group_metadata()
    with pytest.raises(IllegalGenerationError):
        ray.get(gc.txn_offset_commit.remote("tx-a", pid, 1, group, meta.generation_id - 1, meta.member_id, {tp: 5}))
    with pytest.raises(UnknownMemberIdError):
        ray.get(gc.txn_offset_commit.remote("tx-a", pid, 1, group, meta.generation_id, "zombie", {tp: 5}))
    ray.get(gc.txn_offset_commit.remote("tx-a", pid, 1, group, meta.generation_id, meta.member_id, {tp: 6}))
    ray.get(gc.write_txn_marker.remote(pid, 1, False, 0))
    assert c.committed([tp]) == {tp: 2}
    c.close()

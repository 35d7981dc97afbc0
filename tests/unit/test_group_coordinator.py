"""GroupCoordinatorShard: append/apply contract, records, replay == live, snapshots, admin ops."""
from __future__ import annotations

import pytest

from ray_broker.errors import BrokerError, ErrorCode
from ray_broker.group.coordinator import CoordinatorResult, GroupCoordinatorShard
from ray_broker.group.offsets import OffsetAndMetadata
from ray_broker.group.records import (GroupMetadataRecord, OffsetCommitRecord, TxnMarkerRecord, TxnOffsetRecord,
                                      decode_record, offset_commit_record, txn_marker_record, txn_offset_record)
from ray_broker.group.state import GroupState
from ray_broker.records import TopicPartition as TP

T0, T1 = TP("t", 0), TP("t", 1)
SESSION, REBALANCE = 10_000, 30_000


class Harness:
    """Plays the actor: append the records to a 'log', then apply; keeps the log for replay."""

    def __init__(self, protocol="range", partitions=4):
        self.shard = GroupCoordinatorShard(protocol, {"t": partitions})
        self.log: list = []

    def run(self, result: CoordinatorResult):
        self.log.extend(result.records)
        self.shard.apply(result)
        return result.response

    def join(self, group="g", member=None, now=0, topics=("t",)):
        return self.run(self.shard.handle_join(group, member, list(topics), SESSION, REBALANCE, now))

    def sync(self, member, gen, group="g", now=0):
        return self.run(self.shard.handle_sync(group, member, gen, now))


def rebuilt(records, protocol="range", partitions=4):
    s = GroupCoordinatorShard(protocol, {"t": partitions})
    for k, v in records:
        s.replay(k, v)
    return s


def code_of(fn, *args, **kw):
    with pytest.raises(BrokerError) as e:
        fn(*args, **kw)
    return e.value.code


def test_state_changes_only_after_apply():
    h = Harness()
    res = h.shard.handle_join("g", None, ["t"], SESSION, REBALANCE, 0)
    assert res.response.ready and len(res.records) == 1
    assert h.shard.group("g") is None and h.shard.list_groups() == []   # not applied yet
    h.run(res)
    g = h.shard.group("g")
    assert g.state is GroupState.STABLE and res.response.member_id in g.members
    mid, gen = res.response.member_id, res.response.generation_id
    commit = h.shard.handle_offset_commit("g", gen, mid, {T0: 5}, 10)
    assert h.shard.fetch_offsets("g") == {}
    h.run(commit)
    assert h.shard.fetch_offsets("g") == {T0: OffsetAndMetadata(5, "", 10)}


def test_dropped_result_changes_nothing():
    h = Harness()
    m = h.join().member_id
    before = h.shard.durable_state()
    h.shard.handle_join("g", None, ["t"], SESSION, REBALANCE, 5)        # append failed: dropped
    h.shard.handle_leave("g", m, 6)
    h.shard.handle_offset_commit("g", 1, m, {T0: 1}, 7)
    assert h.shard.durable_state() == before


def test_heartbeats_and_unchanged_syncs_write_nothing():
    h = Harness()
    r = h.join()
    h.sync(r.member_id, r.generation_id)
    assert h.shard.handle_heartbeat("g", r.member_id, r.generation_id, 5).records == ()
    assert h.shard.handle_sync("g", r.member_id, r.generation_id, 6).records == ()
    assert h.shard.group("g").members[r.member_id].last_heartbeat_ms == 6   # soft state refreshed


def test_errors_raise_and_write_nothing():
    h = Harness()
    r = h.join()
    assert code_of(h.shard.handle_heartbeat, "g", "x", r.generation_id, 1) == ErrorCode.UNKNOWN_MEMBER_ID
    assert code_of(h.shard.handle_heartbeat, "nope", "x", 0, 1) == ErrorCode.UNKNOWN_MEMBER_ID
    assert code_of(h.shard.handle_offset_commit, "g", r.generation_id + 1, r.member_id, {T0: 1}, 1) \
        == ErrorCode.ILLEGAL_GENERATION


def _busy_history(h: Harness):
    a = h.join(now=0).member_id
    h.run(h.shard.handle_offset_commit("g", 1, a, {T0: 3}, 1))
    b = h.join(now=2).member_id
    h.join(member=a, now=3)
    gen = h.shard.group("g").generation_id
    h.sync(a, gen, now=4)
    h.sync(b, gen, now=4)
    h.run(h.shard.handle_txn_offset_commit("g", 77, 0, gen, b, {T1: 9}, 5))
    h.run(h.shard.handle_txn_offset_commit("g", 78, 0, gen, a, {T0: 4}, 5))
    h.run(h.shard.handle_txn_marker(78, 1, commit=False))
    h.join(group="other", now=6)
    h.run(h.shard.handle_tick(7_000))                      # nobody expired yet
    h.run(h.shard.handle_heartbeat("g", a, gen, 8_000))
    h.run(h.shard.handle_tick(SESSION + 10))              # b (last seen at 5) expires; other's member too
    h.run(h.shard.handle_reset_offsets("simple", {T0: 1}, 9))
    return a, b


def test_replay_of_emitted_records_equals_live_state():
    h = Harness()
    a, b = _busy_history(h)
    live = h.shard.durable_state()
    assert [m["member_id"] for m in live["groups"]["g"]["members"]] == [a]
    assert live["groups"]["g"]["state"] == GroupState.PREPARING_REBALANCE
    assert live["groups"]["other"]["state"] == GroupState.EMPTY
    assert live["pending"] == {77: {("g", T1): OffsetAndMetadata(9, "", 5)}}
    assert rebuilt(h.log).durable_state() == live


def test_snapshot_round_trip_is_minimal_and_stable():
    h = Harness()
    _busy_history(h)
    h.run(h.shard.handle_txn_marker(77, 1, commit=True))
    snap = h.shard.snapshot_records()
    s2 = rebuilt(snap)
    assert s2.durable_state() == h.shard.durable_state()
    assert s2.snapshot_records() == snap
    state = h.shard.durable_state()
    n_offsets = sum(len(v) for v in state["committed"].values()) + sum(len(v) for v in state["pending"].values())
    assert len(snap) == len(state["groups"]) + n_offsets < len(h.log)


def test_snapshot_keeps_pending_offsets_and_their_log_order():
    h = Harness()
    a = h.join().member_id
    h.run(h.shard.handle_txn_offset_commit("g", 5, 0, 1, a, {T0: 10}, 1))
    h.run(h.shard.handle_offset_commit("g", 1, a, {T0: 20}, 2))        # newer plain commit
    s2 = rebuilt(h.shard.snapshot_records())
    assert code_of(s2.fetch_offsets, "g", [T0]) == ErrorCode.UNSTABLE_OFFSET_COMMIT
    for s in (h.shard, s2):
        s.apply(s.handle_txn_marker(5, 1, commit=True))
        assert s.fetch_offsets("g")[T0].offset == 20                    # the newer plain commit wins


def test_loaded_coordinator_gives_members_a_fresh_session():
    h = Harness()
    a = h.join().member_id
    s2 = rebuilt(h.log)
    s2.on_loaded(1_000_000)
    assert s2.handle_tick(1_000_000 + SESSION - 1).response == {}
    s2.handle_heartbeat("g", a, 1, 1_000_001)


def test_transactional_offsets_through_the_shard():
    h = Harness()
    a = h.join().member_id
    h.run(h.shard.handle_offset_commit("g", 1, a, {T0: 1}, 0))
    h.run(h.shard.handle_txn_offset_commit("g", 9, 0, 1, a, {T0: 5}, 1))
    assert h.shard.fetch_offsets("g", require_stable=False)[T0].offset == 1
    assert code_of(h.shard.fetch_offsets, "g") == ErrorCode.UNSTABLE_OFFSET_COMMIT
    assert h.shard.describe_group("g").pending_offsets == (T0,)
    marker = h.shard.handle_txn_marker(9, 1, commit=True)
    assert marker.response == [("g", T0)]
    assert code_of(h.shard.fetch_offsets, "g") == ErrorCode.UNSTABLE_OFFSET_COMMIT   # not applied yet
    h.run(marker)
    assert h.shard.fetch_offsets("g")[T0].offset == 5


def test_session_expiry_through_tick_moves_partitions():
    h = Harness(partitions=4)
    a = h.join(now=0).member_id
    b = h.join(now=0).member_id
    h.join(member=a, now=0)
    assert len(h.shard.group("g").members[b].assignment) == 2
    h.run(h.shard.handle_heartbeat("g", a, 2, 8_000))
    res = h.run(h.shard.handle_tick(SESSION))
    assert res == {"g": [b]}
    h.join(member=a, now=SESSION + 1)
    g = h.shard.group("g")
    assert list(g.members) == [a] and len(g.members[a].assignment) == 4


def test_list_and_describe_groups():
    h = Harness()
    a = h.join().member_id
    h.run(h.shard.handle_reset_offsets("simple", {T1: 2}, 3))
    listing = {x.group_id: x.state for x in h.shard.list_groups()}
    assert listing == {"g": GroupState.STABLE, "simple": GroupState.EMPTY}
    d = h.shard.describe_group("g")
    assert d.state is GroupState.STABLE and d.generation_id == 1 and d.leader_id == a and d.protocol == "range"
    assert [m.member_id for m in d.members] == [a] and len(d.members[0].assignment) == 4
    assert h.shard.describe_group("simple").offsets == {T1: OffsetAndMetadata(2, "", 3)}
    assert h.shard.describe_group("unknown").state is GroupState.DEAD


def test_reset_offsets_refused_while_group_has_live_members():
    h = Harness()
    a = h.join().member_id
    assert code_of(h.shard.handle_reset_offsets, "g", {T0: 0}, 1) == ErrorCode.INVALID_REQUEST
    h.run(h.shard.handle_leave("g", a, 2))
    assert h.shard.group("g").state is GroupState.EMPTY
    h.run(h.shard.reset_offsets("g", {T0: 0}, 3))
    assert h.shard.fetch_offsets("g")[T0].offset == 0


def test_delete_group_writes_tombstones():
    h = Harness()
    a = h.join().member_id
    h.run(h.shard.handle_offset_commit("g", 1, a, {T0: 1}, 0))
    assert code_of(h.shard.handle_delete_group, "g") == ErrorCode.INVALID_REQUEST
    h.run(h.shard.handle_leave("g", a, 1))
    res = h.shard.handle_delete_group("g")
    assert all(v is None for _, v in res.records)
    h.run(res)
    assert h.shard.list_groups() == [] and h.shard.durable_state() == rebuilt(h.log).durable_state()


def test_partition_count_change_rebalances_subscribed_groups():
    h = Harness(partitions=2)
    a = h.join().member_id
    res = h.shard.update_topic_partitions({"t": 4}, 10)
    assert res.response == ["g"]
    h.run(res)
    h.join(member=a, now=11)
    assert len(h.shard.group("g").members[a].assignment) == 4


def test_record_encoding_round_trip_and_versioning():
    om = OffsetAndMetadata(5, "meta", 7)
    k, v = offset_commit_record("g", T0, om)
    assert decode_record(k, v) == OffsetCommitRecord("g", T0, om)
    assert decode_record(k, None) == OffsetCommitRecord("g", T0, None)
    assert offset_commit_record("g", T0, OffsetAndMetadata(6))[0] == k      # canonical keys compact
    k2, v2 = txn_offset_record(3, 1, "g", T1, om)
    assert decode_record(k2, v2) == TxnOffsetRecord(3, "g", T1, 1, om)
    assert decode_record(*txn_marker_record(3, 2, False)) == TxnMarkerRecord(3, 2, False)
    h = Harness()
    h.join()
    rec = decode_record(*h.log[0])
    assert isinstance(rec, GroupMetadataRecord) and rec.value["generation_id"] == 1
    future = b"\x00\x09" + v[2:]
    assert code_of(decode_record, k, future) == ErrorCode.CORRUPT_MESSAGE
    assert code_of(decode_record, b"\x00\x63[]", None) == ErrorCode.CORRUPT_MESSAGE


# ---- property: random client behaviour through the shard ----------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OPS = st.sampled_from(["join", "rejoin", "sync", "heartbeat", "leave", "tick", "commit", "txn", "marker",
                       "partitions"])


@settings(max_examples=120, deadline=None)
@given(ops=st.lists(st.tuples(OPS, st.integers(0, 7), st.integers(0, 4_000)), min_size=1, max_size=40),
       protocol=st.sampled_from(["range", "roundrobin", "cooperative-sticky"]))
def test_shard_replay_and_snapshot_equal_live_state_under_random_ops(ops, protocol):
    h = Harness(protocol, partitions=5)
    now = 0
    members: list[str] = []
    for op, k, dt in ops:
        now += dt
        g = h.shard.group("g")
        mid = members[k % len(members)] if members else None
        gen = g.pending_generation_id if g else 0
        try:
            if op == "join" or mid is None:
                members.append(h.join(now=now).member_id)
            elif op == "rejoin":
                h.join(member=mid, now=now)
            elif op == "sync":
                h.sync(mid, gen, now=now)
            elif op == "heartbeat":
                h.run(h.shard.handle_heartbeat("g", mid, gen, now))
            elif op == "leave":
                h.run(h.shard.handle_leave("g", mid, now))
            elif op == "tick":
                h.run(h.shard.handle_tick(now))
            elif op == "commit":
                h.run(h.shard.handle_offset_commit("g", g.generation_id, mid, {TP("t", k % 5): k}, now))
            elif op == "txn":
                h.run(h.shard.handle_txn_offset_commit("g", k % 3, 0, g.generation_id, mid, {TP("t", k % 5): k}, now))
            elif op == "marker":
                h.run(h.shard.handle_txn_marker(k % 3, 1, commit=bool(k % 2)))
            else:
                h.run(h.shard.update_topic_partitions({"t": 3 + k % 4}, now))
        except BrokerError as e:
            assert e.code in (ErrorCode.UNKNOWN_MEMBER_ID, ErrorCode.ILLEGAL_GENERATION,
                              ErrorCode.REBALANCE_IN_PROGRESS), e
        g = h.shard.group("g")
        if g is not None:
            owners = [tp for m in g.members.values() for tp in m.assignment]
            assert len(owners) == len(set(owners)), "a partition is assigned twice"
            if protocol == "cooperative-sticky":
                # KIP-429 safety: never assigned to one member while another may still consume it.
                for m in g.members.values():
                    for other in g.members.values():
                        if other is not m:
                            assert not set(m.assignment) & set(other.synced_assignment)
    live = h.shard.durable_state()
    assert rebuilt(h.log, protocol, 5).durable_state() == live
    assert rebuilt(h.shard.snapshot_records(), protocol, 5).durable_state() == live


def test_sync_deltas_are_relative_to_what_the_member_last_received():
    h = Harness("cooperative-sticky", partitions=6)
    a = h.join(now=0).member_id
    assert len(h.sync(a, 1).assignment) == 6          # a is consuming all six
    b = h.join(now=0).member_id
    h.join(member=a, now=0)
    gen = h.shard.group("g").generation_id
    got_b = h.sync(b, gen)                           # b received nothing yet (withheld)
    got_a = h.sync(a, gen)                           # a acknowledges: follow-up starts
    assert got_b.assignment == () and got_a.rejoin and len(got_a.revoked) == 3
    h.join(member=a, now=1)
    h.join(member=b, now=1)
    final_b = h.sync(b, h.shard.group("g").generation_id)
    assert set(final_b.added) == set(got_a.revoked) and final_b.revoked == ()

"""ConsumerGroup: join / sync polling, rebalance completion, session expiry, heartbeat errors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_broker.errors import BrokerError, ErrorCode
from ray_broker.group.group import ConsumerGroup
from ray_broker.group.state import GroupState
from ray_broker.records import TopicPartition as TP

SESSION = 10_000
REBALANCE = 30_000


def make(protocol="range", partitions=6):
    g = ConsumerGroup("g", default_protocol=protocol)
    g.topic_partitions = {"t": partitions}
    return g


def join(g, member_id=None, now=0, topics=("t",), **kw):
    return g.join(member_id, list(topics), SESSION, REBALANCE, now, **kw)


def code_of(fn, *args):
    with pytest.raises(BrokerError) as e:
        fn(*args)
    return e.value.code


def settle(g, now, member_ids):
    """Every listed member rejoins then syncs (what polling clients do after REBALANCE_IN_PROGRESS)."""
    for mid in member_ids:
        join(g, mid, now)
    assert g.state is GroupState.STABLE
    return {mid: g.sync(mid, g.generation_id, now) for mid in member_ids}


def form(g, n, now=0):
    ids = []
    for _ in range(n):
        ids.append(join(g, now=now).member_id)
        settle(g, now, ids)
    return ids


def test_first_member_gets_an_id_and_everything_at_once():
    g = make()
    r = join(g, client_id="c1")
    assert r.member_id.startswith("c1-") and r.ready and r.generation_id == 1
    assert g.state is GroupState.STABLE and g.leader_id == r.member_id and g.protocol == "range"
    s = g.sync(r.member_id, 1, 0)
    assert s.ready and s.assignment == tuple(TP("t", p) for p in range(6))
    assert s.added == s.assignment and s.revoked == ()


def test_member_ids_are_unique_and_deterministic():
    g1, g2 = make(), make()
    ids1 = [join(g1, now=0).member_id for _ in range(3)]
    ids2 = [join(g2, now=0).member_id for _ in range(3)]
    assert ids1 == ids2 and len(set(ids1)) == 3


def test_rebalance_waits_for_all_known_members_and_sync_polls():
    g = make()
    a = join(g).member_id
    b = join(g, now=1).member_id
    assert g.state is GroupState.PREPARING_REBALANCE
    rb = g.sync(b, 2, 2)
    assert not rb.ready and rb.generation_id == 2
    g.heartbeat(b, 2, 2)  # a joined member waiting for the generation is fine
    assert code_of(g.heartbeat, a, 1, 3) == ErrorCode.REBALANCE_IN_PROGRESS
    assert code_of(g.sync, a, 1, 3) == ErrorCode.REBALANCE_IN_PROGRESS
    r = join(g, a, now=4)
    assert r.ready and r.generation_id == 2 and g.state is GroupState.STABLE
    assert len(g.sync(a, 2, 5).assignment) == 3 and len(g.sync(b, 2, 5).assignment) == 3


@pytest.mark.parametrize("protocol", ["range", "roundrobin"])
def test_three_members_over_six_partitions(protocol):
    g = make(protocol)
    ids = form(g, 3)
    got = {mid: g.sync(mid, g.generation_id, 0).assignment for mid in ids}
    assert [len(v) for v in got.values()] == [2, 2, 2]
    assert sorted(tp for v in got.values() for tp in v) == [TP("t", p) for p in range(6)]


def test_session_expiry_moves_partitions_to_survivors():
    g = make()
    ids = form(g, 3)
    victim = ids[1]
    lost = set(g.members[victim].assignment)
    for mid in (ids[0], ids[2]):
        g.heartbeat(mid, g.generation_id, 6_000)
    assert g.tick(SESSION - 1) == []
    assert g.tick(SESSION) == [victim]
    assert victim not in g.members and g.state is GroupState.PREPARING_REBALANCE
    assert code_of(g.heartbeat, victim, g.generation_id, SESSION) == ErrorCode.UNKNOWN_MEMBER_ID
    got = settle(g, SESSION + 1, [ids[0], ids[2]])
    assert [len(r.assignment) for r in got.values()] == [3, 3]
    assert lost <= {tp for r in got.values() for tp in r.assignment}


def test_rebalance_timeout_removes_members_that_did_not_rejoin():
    g = make()
    a, b = form(g, 2)
    c = join(g, now=100).member_id
    join(g, a, now=200)
    assert g.state is GroupState.PREPARING_REBALANCE
    # b keeps heartbeating (alive) but never rejoins: removed at the rebalance deadline.
    for t in range(1000, REBALANCE + 100, 5000):
        g.sync(a, g.pending_generation_id, t)
        g.sync(c, g.pending_generation_id, t)
        with pytest.raises(BrokerError):
            g.heartbeat(b, g.generation_id, t)
    removed = g.tick(100 + REBALANCE)
    assert removed == [b] and g.state is GroupState.STABLE and sorted(g.members) == sorted([a, c])


def test_new_member_gets_a_fair_share():
    g = make(partitions=6)
    ids = form(g, 2)
    new = join(g, now=10).member_id
    got = settle(g, 11, ids + [new])
    assert [len(r.assignment) for r in got.values()] == [2, 2, 2]
    assert got[new].added == got[new].assignment


def test_heartbeat_errors():
    g = make()
    a, b = form(g, 2)
    gen = g.generation_id
    g.heartbeat(a, gen, 1)
    assert code_of(g.heartbeat, "nobody", gen, 1) == ErrorCode.UNKNOWN_MEMBER_ID
    assert code_of(g.heartbeat, a, gen - 1, 1) == ErrorCode.ILLEGAL_GENERATION
    assert code_of(g.sync, a, gen + 5, 1) == ErrorCode.ILLEGAL_GENERATION
    g.leave(b, 2)
    assert code_of(g.heartbeat, b, gen, 3) == ErrorCode.UNKNOWN_MEMBER_ID
    # a is alone now but a rebalance is in progress: it must rejoin.
    assert code_of(g.heartbeat, a, gen, 3) == ErrorCode.REBALANCE_IN_PROGRESS
    assert join(g, a, now=4).ready and g.generation_id == gen + 1
    g.heartbeat(a, gen + 1, 5)


def test_failed_calls_still_refresh_the_session():
    g = make()
    a, b = form(g, 2)
    join(g, now=5_000)  # rebalance: a and b get REBALANCE_IN_PROGRESS
    for mid in (a, b):
        with pytest.raises(BrokerError):
            g.heartbeat(mid, g.generation_id, 9_000)
    assert g.tick(SESSION + 1) == []


def test_last_member_leaving_empties_the_group_and_bumps_generation():
    g = make()
    (a,) = form(g, 1)
    g.leave(a, 1)
    assert g.state is GroupState.EMPTY and g.generation_id == 2 and g.protocol is None
    assert code_of(g.leave, a, 2) == ErrorCode.UNKNOWN_MEMBER_ID


def test_unchanged_rejoin_while_stable_keeps_the_generation_and_changed_one_rebalances():
    g = make()
    a, b = form(g, 2)
    gen = g.generation_id
    assert join(g, a, now=1).generation_id == gen and g.state is GroupState.STABLE
    r = join(g, a, now=2, topics=("t", "u"))
    assert not r.ready and r.generation_id == gen + 1 and g.state is GroupState.PREPARING_REBALANCE


def test_inconsistent_protocol_and_bad_requests_are_refused():
    g = make("range")
    form(g, 1)
    assert code_of(lambda: join(g, protocol="roundrobin")) == ErrorCode.INVALID_REQUEST
    assert code_of(lambda: join(g, protocol="bogus")) == ErrorCode.INVALID_REQUEST
    assert code_of(lambda: g.join(None, [], SESSION, REBALANCE, 0)) == ErrorCode.INVALID_REQUEST
    assert code_of(lambda: g.join(None, ["t"], 0, REBALANCE, 0)) == ErrorCode.INVALID_REQUEST
    assert code_of(lambda: join(g, "ghost")) == ErrorCode.UNKNOWN_MEMBER_ID


def test_cooperative_follow_up_after_revoker_acknowledges():
    g = make("cooperative-sticky", partitions=4)
    (a,) = form(g, 1)
    b = join(g, now=1).member_id
    join(g, a, now=1)
    gen = g.generation_id
    sb = g.sync(b, gen, 2)
    assert sb.assignment == () and g.state is GroupState.STABLE
    sa = g.sync(a, gen, 2)                  # the revoker acknowledges: follow-up starts
    assert sa.rejoin and g.state is GroupState.PREPARING_REBALANCE
    revoked = set(sa.revoked)
    got = settle(g, 3, [a, b])
    assert got[a].revoked == () and set(got[a].assignment) == set(sa.assignment)
    assert set(got[b].assignment) == revoked and set(got[b].added) == revoked
    # and then the group is quiet
    assert not g.sync(a, g.generation_id, 4).rejoin and g.state is GroupState.STABLE


def test_cooperative_unacknowledged_revocation_is_still_owned():
    g = make("cooperative-sticky", partitions=4)
    (a,) = form(g, 1)
    b = join(g, now=1).member_id
    join(g, a, now=1)                       # gen 3 revokes 2 partitions from a; a never syncs it
    c = join(g, now=2).member_id            # another rebalance before a acknowledged
    for mid in (a, b):
        join(g, mid, now=3)
    owner = g.owner_of()
    gone_from_a = set(g.members[a].synced_assignment) - set(g.members[a].assignment)
    assert gone_from_a
    assert not any(tp in owner for tp in gone_from_a), "never handed out before a acknowledged"
    assert c in g.members


# ---- group-level property: random joins / leaves / expiries with polling clients -----------------

@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["join", "leave", "expire"]), st.integers(0, 5)),
                    min_size=1, max_size=15),
       partitions=st.integers(1, 9),
       protocol=st.sampled_from(["range", "roundrobin", "cooperative-sticky"]))
def test_group_converges_with_no_partition_owned_twice(ops, partitions, protocol):
    g = make(protocol, partitions)
    now = 0
    live: list[str] = []
    for op, k in ops:
        now += 100
        if op == "join" or not live:
            live.append(join(g, now=now).member_id)
        elif op == "leave":
            g.leave(live.pop(k % len(live)), now)
        else:
            victim = live.pop(k % len(live))
            now += SESSION
            for mid in live:
                g.members[mid].last_heartbeat_ms = now
            assert victim in g.tick(now)
        # clients poll until quiet (at most two generations for cooperative)
        for _ in range(4):
            if g.state is GroupState.PREPARING_REBALANCE:
                for mid in live:
                    join(g, mid, now)
            try:
                for mid in live:
                    g.sync(mid, g.generation_id, now)
            except BrokerError as e:  # a sync started the cooperative follow-up: rejoin
                assert e.code == ErrorCode.REBALANCE_IN_PROGRESS
                continue
            if g.state is GroupState.STABLE:
                break
        if not live:
            assert g.state is GroupState.EMPTY and not g.members
            continue
        assert g.state is GroupState.STABLE
        owners = [tp for m in g.members.values() for tp in m.assignment]
        assert len(owners) == len(set(owners))
        assert sorted(owners) == [TP("t", p) for p in range(partitions)]
        sizes = [len(m.assignment) for m in g.members.values()]
        assert max(sizes) - min(sizes) <= 1

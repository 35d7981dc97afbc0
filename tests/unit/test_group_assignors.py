"""Assignors: range / roundrobin fairness; cooperative-sticky incremental properties."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_broker.errors import BrokerError, ErrorCode
from ray_broker.group.assignors import (ASSIGNORS, CooperativeStickyAssignor, RangeAssignor, RoundRobinAssignor,
                                        Subscription, assignor_for, sticky_target)
from ray_broker.records import TopicPartition as TP


def subs(*members, topics=("t",), owned=None):
    owned = owned or {}
    return {m: Subscription.of(topics, owned.get(m, ())) for m in members}


@pytest.mark.parametrize("assignor", [RangeAssignor(), RoundRobinAssignor(), CooperativeStickyAssignor()])
def test_three_members_six_partitions_get_two_each(assignor):
    out = assignor.assign(subs("a", "b", "c"), {"t": 6})
    assert sorted(out) == ["a", "b", "c"]
    assert [len(v) for v in out.values()] == [2, 2, 2]
    assert sorted(tp for v in out.values() for tp in v) == [TP("t", p) for p in range(6)]


def test_range_gives_contiguous_ranges_and_extras_to_first_members():
    out = RangeAssignor().assign(subs("c", "a", "b", topics=("t", "u")), {"t": 7, "u": 2})
    assert out["a"] == [TP("t", 0), TP("t", 1), TP("t", 2), TP("u", 0)]
    assert out["b"] == [TP("t", 3), TP("t", 4), TP("u", 1)]
    assert out["c"] == [TP("t", 5), TP("t", 6)]


def test_roundrobin_interleaves_and_skips_unsubscribed_members():
    members = {"a": Subscription.of(["t"]), "b": Subscription.of(["t", "u"])}
    out = RoundRobinAssignor().assign(members, {"t": 2, "u": 2})
    assert out == {"a": [TP("t", 0)], "b": [TP("t", 1), TP("u", 0), TP("u", 1)]}


def test_unknown_topics_and_members_without_partitions():
    out = RangeAssignor().assign(subs("a", "b", topics=("gone",)), {})
    assert out == {"a": [], "b": []}
    assert RoundRobinAssignor().assign({}, {"t": 3}) == {}


def test_assignors_are_deterministic_whatever_the_dict_order():
    for a in ASSIGNORS.values():
        one = a.assign({"b": Subscription.of(["t"]), "a": Subscription.of(["t"])}, {"t": 5})
        two = a.assign({"a": Subscription.of(["t"]), "b": Subscription.of(["t"])}, {"t": 5})
        assert one == two


def test_unknown_assignor_name_is_invalid_request():
    with pytest.raises(BrokerError) as e:
        assignor_for("nope")
    assert e.value.code == ErrorCode.INVALID_REQUEST


def test_cooperative_withholds_moving_partitions_then_assigns_them():
    a = CooperativeStickyAssignor()
    gen1 = a.assign(subs("a"), {"t": 4})
    assert gen1 == {"a": [TP("t", p) for p in range(4)]}
    # b joins: two partitions must move from a to b. Generation 2 only revokes them.
    gen2 = a.assign(subs("a", "b", owned=gen1), {"t": 4})
    assert len(gen2["a"]) == 2 and gen2["b"] == []
    assert set(gen2["a"]) <= set(gen1["a"])
    # Generation 3 (follow-up): a keeps its two, b gets the revoked two; nothing is revoked.
    gen3 = a.assign(subs("a", "b", owned=gen2), {"t": 4})
    assert gen3["a"] == gen2["a"]
    assert sorted(gen3["b"]) == sorted(set(gen1["a"]) - set(gen2["a"]))


def test_cooperative_partitions_of_departed_member_are_assigned_at_once():
    a = CooperativeStickyAssignor()
    owned = {"a": [TP("t", 0), TP("t", 1)], "b": [TP("t", 2), TP("t", 3)], "c": [TP("t", 4), TP("t", 5)]}
    out = a.assign(subs("a", "b", owned={k: v for k, v in owned.items() if k != "c"}), {"t": 6})
    assert out["a"][:2] == owned["a"] and set(owned["b"]) <= set(out["b"])
    assert sorted(tp for v in out.values() for tp in v) == [TP("t", p) for p in range(6)]


def test_sticky_target_drops_partitions_of_unsubscribed_or_deleted_topics():
    members = {"a": Subscription.of(["t"], [TP("t", 0), TP("u", 0), TP("t", 9)])}
    assert sticky_target(members, {"t": 2, "u": 1}) == {"a": [TP("t", 0), TP("t", 1)]}


# ---- property test: random joins / leaves under the cooperative protocol ------------------------

def _check_generation(prev: dict, members: dict, out: dict, partitions: int, topics: tuple):
    owned_twice = [tp for tp, n in Counter(tp for v in out.values() for tp in v).items() if n > 1]
    assert not owned_twice
    assert sorted(out) == sorted(members)
    everything = {TP(t, p) for t in topics for p in range(partitions)}
    assert set(tp for v in out.values() for tp in v) <= everything
    for m, parts in out.items():
        old = set(prev.get(m, ()))
        # Never assigned a partition still owned by another surviving member (revoke first).
        for tp in parts:
            assert tp in old or not any(tp in prev.get(o, ()) for o in members if o != m)
        # A partition taken from an unchanged member is revoked because it moves: it is not handed
        # to anyone else in this generation.
        for tp in old - set(parts):
            assert not any(tp in v for v in out.values())


@settings(max_examples=150, deadline=None)
@given(
    partitions=st.integers(min_value=0, max_value=13),
    ntopics=st.integers(min_value=1, max_value=2),
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=7)), min_size=1, max_size=25),
)
def test_cooperative_sticky_property(partitions, ntopics, ops):
    topics = tuple(f"t{i}" for i in range(ntopics))
    counts = {t: partitions for t in topics}
    a = CooperativeStickyAssignor()
    current: dict[str, list] = {}
    for join, who in ops:
        name = f"m{who}"
        if join:
            current.setdefault(name, [])
        else:
            current.pop(name, None)
        if not current:
            continue
        # Generation N: the membership change.
        members = {m: Subscription.of(topics, owned) for m, owned in current.items()}
        gen = a.assign(members, counts)
        _check_generation(current, members, gen, partitions, topics)
        # Partitions that did not move stay with their owner (no revoke/reassign churn).
        target = sticky_target(members, counts)
        for m, parts in gen.items():
            assert set(current[m]) & set(target[m]) <= set(parts)
        # Generation N+1: the follow-up rebalance assigns the revoked partitions, revoking nothing.
        members2 = {m: Subscription.of(topics, owned) for m, owned in gen.items()}
        gen2 = a.assign(members2, counts)
        _check_generation(gen, members2, gen2, partitions, topics)
        for m in gen:
            assert set(gen[m]) <= set(gen2[m]), "the follow-up generation must not revoke anything"
        sizes = [len(v) for v in gen2.values()]
        assert max(sizes) - min(sizes) <= 1, gen2
        assert sum(sizes) == partitions * ntopics
        # Stable: one more generation changes nothing.
        members3 = {m: Subscription.of(topics, owned) for m, owned in gen2.items()}
        assert a.assign(members3, counts) == gen2
        current = gen2


@settings(max_examples=60, deadline=None)
@given(partitions=st.integers(min_value=0, max_value=20), n=st.integers(min_value=1, max_value=6),
       name=st.sampled_from(["range", "roundrobin", "cooperative-sticky"]))
def test_every_assignor_is_complete_and_balanced_for_one_topic(partitions, n, name):
    out = ASSIGNORS[name].assign(subs(*[f"m{i}" for i in range(n)]), {"t": partitions})
    parts = [tp for v in out.values() for tp in v]
    assert sorted(parts) == [TP("t", p) for p in range(partitions)]
    sizes = [len(v) for v in out.values()]
    assert max(sizes) - min(sizes) <= 1

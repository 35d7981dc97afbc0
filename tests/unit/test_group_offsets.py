"""OffsetStore: commit fencing by generation / member, transactional offsets, require_stable."""
from __future__ import annotations

import pytest

from ray_broker.errors import BrokerError, ErrorCode
from ray_broker.group.group import ConsumerGroup
from ray_broker.group.offsets import OffsetAndMetadata, OffsetStore
from ray_broker.group.state import GroupState
from ray_broker.records import TopicPartition as TP

T0, T1 = TP("t", 0), TP("t", 1)


def code_of(fn, *args, **kw):
    with pytest.raises(BrokerError) as e:
        fn(*args, **kw)
    return e.value.code


@pytest.fixture
def world():
    groups: dict[str, ConsumerGroup] = {}
    g = ConsumerGroup("g")
    g.topic_partitions = {"t": 2}
    a = g.join(None, ["t"], 10_000, 30_000, 0).member_id
    groups["g"] = g
    return groups, OffsetStore(groups.get), g, a


def test_member_of_current_generation_commits(world):
    _, store, g, a = world
    store.commit("g", g.generation_id, a, {T0: 5, T1: OffsetAndMetadata(7, "m")}, now_ms=42)
    assert store.fetch("g", [T0, T1]) == {T0: OffsetAndMetadata(5, "", 42), T1: OffsetAndMetadata(7, "m", 42)}
    assert store.fetch("g", [TP("t", 9)]) == {TP("t", 9): None}


def test_commit_fencing_by_generation_and_member(world):
    _, store, g, a = world
    old_gen = g.generation_id
    b = g.join(None, ["t"], 10_000, 30_000, 1).member_id
    g.join(a, ["t"], 10_000, 30_000, 2)
    assert g.generation_id == old_gen + 1
    assert code_of(store.commit, "g", old_gen, a, {T0: 1}) == ErrorCode.ILLEGAL_GENERATION
    assert code_of(store.commit, "g", g.generation_id, "zombie", {T0: 1}) == ErrorCode.UNKNOWN_MEMBER_ID
    assert code_of(store.commit, "g", -1, None, {T0: 1}) == ErrorCode.UNKNOWN_MEMBER_ID  # group has members
    store.commit("g", g.generation_id, b, {T0: 1})
    assert store.fetch("g")[T0].offset == 1


def test_commits_during_preparing_rebalance_are_allowed_for_current_generation(world):
    _, store, g, a = world
    g.join(None, ["t"], 10_000, 30_000, 1)        # rebalance starts; a has not rejoined yet
    assert g.state is GroupState.PREPARING_REBALANCE
    store.commit("g", g.generation_id, a, {T0: 3})  # e.g. committing in onPartitionsRevoked
    assert store.fetch("g")[T0].offset == 3


def test_simple_commits_need_an_empty_or_unknown_group():
    store = OffsetStore()
    store.commit("simple", -1, None, {T0: 9})
    assert store.fetch("simple") == {T0: OffsetAndMetadata(9, "", 0)}
    assert code_of(store.commit, "simple", 3, None, {T0: 1}) == ErrorCode.ILLEGAL_GENERATION
    assert code_of(store.commit, "simple", -1, "m", {T0: 1}) == ErrorCode.UNKNOWN_MEMBER_ID
    assert code_of(store.commit, "simple", -1, None, {T0: -1}) == ErrorCode.INVALID_REQUEST


def test_transactional_offsets_visible_only_after_commit(world):
    _, store, g, a = world
    store.commit("g", g.generation_id, a, {T0: 1})
    store.stage_txn_offsets("g", 100, 0, g.generation_id, a, {T0: 10, T1: 11})
    assert store.fetch("g", [T0, T1], require_stable=False) == {T0: OffsetAndMetadata(1, "", 0), T1: None}
    assert store.has_pending("g", T0) and store.has_pending("g")
    store.complete_txn(100, commit=True)
    assert {tp: om.offset for tp, om in store.fetch("g").items()} == {T0: 10, T1: 11}
    assert not store.has_pending("g")


def test_transactional_offsets_gone_after_abort(world):
    _, store, g, a = world
    store.commit("g", g.generation_id, a, {T0: 1})
    store.stage_txn_offsets("g", 100, 0, g.generation_id, a, {T0: 10})
    store.complete_txn(100, commit=False)
    assert store.fetch("g") == {T0: OffsetAndMetadata(1, "", 0)}
    assert store.pending_producers() == []
    store.complete_txn(100, commit=True)          # a repeated marker is a no-op
    assert store.fetch("g")[T0].offset == 1


def test_require_stable_raises_retriable_unstable_offset_commit(world):
    _, store, g, a = world
    store.stage_txn_offsets("g", 7, 0, g.generation_id, a, {T0: 10})
    with pytest.raises(BrokerError) as e:
        store.fetch("g", [T0])
    assert e.value.code == ErrorCode.UNSTABLE_OFFSET_COMMIT and e.value.retriable
    assert code_of(store.fetch, "g") == ErrorCode.UNSTABLE_OFFSET_COMMIT
    assert store.fetch("g", [T1]) == {T1: None}     # other partitions are stable
    store.complete_txn(7, commit=False)
    assert store.fetch("g", [T0]) == {T0: None}


def test_kip447_zombie_cannot_commit_transactional_offsets(world):
    _, store, g, a = world
    old_gen = g.generation_id
    # a's session expires; b takes over the partitions in a new generation
    b = g.join(None, ["t"], 10_000, 30_000, 5_000).member_id
    g.tick(10_000)
    assert a not in g.members and g.generation_id == old_gen + 1
    assert code_of(store.stage_txn_offsets, "g", 1, 0, old_gen, a, {T0: 99}) == ErrorCode.UNKNOWN_MEMBER_ID
    assert code_of(store.stage_txn_offsets, "g", 1, 0, old_gen, b, {T0: 99}) == ErrorCode.ILLEGAL_GENERATION
    assert not store.has_pending("g")
    store.stage_txn_offsets("g", 2, 0, g.generation_id, b, {T0: 50})
    store.complete_txn(2, True)
    assert store.fetch("g")[T0].offset == 50


def test_older_producer_epoch_is_fenced(world):
    _, store, g, a = world
    store.stage_txn_offsets("g", 1, 3, g.generation_id, a, {T0: 5})
    assert code_of(store.stage_txn_offsets, "g", 1, 2, g.generation_id, a, {T1: 5}) == ErrorCode.PRODUCER_FENCED


def test_newer_plain_commit_wins_over_older_pending_txn_offset(world):
    _, store, g, a = world
    store.stage_txn_offsets("g", 1, 0, g.generation_id, a, {T0: 5})
    store.commit("g", g.generation_id, a, {T0: 8})
    store.complete_txn(1, commit=True)
    assert store.fetch("g")[T0].offset == 8


def test_transactional_commit_allowed_for_a_group_without_members():
    store = OffsetStore()
    store.stage_txn_offsets("solo", 5, 0, -1, None, {T0: 4})
    store.complete_txn(5, True)
    assert store.fetch("solo")[T0].offset == 4

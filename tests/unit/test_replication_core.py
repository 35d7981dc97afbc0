"""Pure replication bookkeeping: divergence by leader epoch, HW and ISR rules."""
from __future__ import annotations

from ray_broker.replication.divergence import end_offset_for_epoch, truncation_offset
from ray_broker.replication.isr import LeaderReplicationState


def lookup(entries, leo):
    return lambda epoch: end_offset_for_epoch(entries, leo, epoch)


def test_end_offset_for_epoch_follows_kip_279():
    entries = [(0, 0), (2, 100), (5, 150)]
    assert end_offset_for_epoch(entries, 200, 0) == (0, 100)
    assert end_offset_for_epoch(entries, 200, 1) == (0, 100)
    assert end_offset_for_epoch(entries, 200, 2) == (2, 150)
    assert end_offset_for_epoch(entries, 200, 7) == (5, 200)
    assert end_offset_for_epoch([(3, 10)], 20, 1) == (-1, -1)


def test_follower_with_same_history_is_not_truncated():
    leader = [(0, 0), (1, 100)]
    assert truncation_offset(lookup(leader, 300), [(0, 0), (1, 100)], 0, 250) == 250


def test_follower_divergent_suffix_in_unknown_epoch_is_cut():
    # follower led epoch 1 briefly and wrote 100..120 that never replicated; the leader took over at 1 -> 2
    leader = [(0, 0), (2, 100)]
    follower = [(0, 0), (1, 100)]
    assert truncation_offset(lookup(leader, 180), follower, 0, 120) == 100


def test_follower_longer_in_shared_epoch_is_cut_to_leader_end():
    leader = [(0, 0), (3, 90)]
    follower = [(0, 0)]
    assert truncation_offset(lookup(leader, 150), follower, 0, 120) == 90


def test_back_to_back_failovers_iterate_over_epochs():
    leader = [(0, 0), (4, 50)]
    follower = [(0, 0), (2, 60), (3, 70)]
    assert truncation_offset(lookup(leader, 100), follower, 0, 80) == 50


def test_empty_follower_needs_no_truncation():
    assert truncation_offset(lookup([(0, 0)], 10), [], 0, 0) == 0


def test_high_watermark_is_min_isr_leo_and_never_decreases():
    st = LeaderReplicationState(0, 1, (0, 1, 2), (0, 1, 2), 2, 1000, 0, 0)
    assert not st.maybe_advance_high_watermark(10)          # followers not heard from yet
    st.on_follower_ack(1, 10, 10, now_ms=0)
    st.on_follower_ack(2, 4, 10, now_ms=0)
    assert st.maybe_advance_high_watermark(10) and st.high_watermark == 4
    st.on_follower_ack(2, 2, 10, now_ms=0)                 # a truncated follower cannot lower the HW
    assert not st.maybe_advance_high_watermark(10) and st.high_watermark == 4


def test_high_watermark_frozen_under_min_isr():
    st = LeaderReplicationState(0, 1, (0, 1), (0,), 2, 1000, 0, 0)
    assert not st.maybe_advance_high_watermark(10)


def test_isr_shrinks_laggard_and_expands_caught_up_follower():
    st = LeaderReplicationState(0, 1, (0, 1, 2), (0, 1, 2), 1, 1000, 0, 0)
    st.on_follower_ack(1, 10, 10, now_ms=5000)
    st.on_follower_ack(2, 3, 10, now_ms=100)
    assert st.isr_change_wanted(10, now_ms=5000) == (0, 1)
    st.set_isr((0, 1))
    st.maybe_advance_high_watermark(10)
    st.on_follower_ack(2, 10, 10, now_ms=5100)
    assert st.isr_change_wanted(10, now_ms=5100) == (0, 1, 2)

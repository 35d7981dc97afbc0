"""Pure controller metadata: validation, placement, elections, ISR changes, persistence."""
from __future__ import annotations

import pytest

import ray_broker as rb
from ray_broker.controller.state import ClusterState


def make(rf=3, partitions=3, nodes=(None,), config=None):
    s = ClusterState()
    cfg, schema = s.validate_new_topic("t", partitions, rf, config or {}, None, len(nodes))
    s.add_topic("t", partitions, rf, cfg, schema, list(nodes))
    return s


def test_leaders_spread_and_full_isr():
    s = make()
    assert [p.leader for p in s.topic("t").partitions] == [0, 1, 2]
    assert all(p.isr == [0, 1, 2] for p in s.topic("t").partitions)


def test_multi_node_placement_is_distinct_per_partition():
    s = make(rf=3, partitions=4, nodes=("a", "b", "c", "d"))
    for p in s.topic("t").partitions:
        nodes = [p.placement[r].node_id for r in p.replicas]
        assert len(set(nodes)) == 3


def test_metadata_names_the_leaders_node_and_follows_elections():
    # producers share lingered call slots per leader node
    s = make(rf=3, partitions=2, nodes=("a", "b", "c"))
    rec = s.topic("t").partitions[0]
    md = s.topic("t").metadata().partitions[0]
    assert md.leader_node == rec.placement[rec.leader].node_id
    old = rec.leader
    assert s.elect_leader("t", 0, set(rec.replicas) - {old})
    md = s.topic("t").metadata().partitions[0]
    assert md.leader != old and md.leader_node == rec.placement[md.leader].node_id
    assert make().topic("t").metadata().partitions[0].leader_node is None   # one node: not pinned


def test_election_picks_isr_member_and_bumps_epoch():
    s = make()
    p = s.topic("t").partitions[0]
    assert s.elect_leader("t", 0, {1, 2})
    assert p.leader in (1, 2) and p.leader_epoch == 1 and 0 not in p.isr
    assert not s.elect_leader("t", 0, {1, 2})             # stable: nothing to do


def test_no_usable_isr_member_takes_partition_offline_unless_unclean():
    s = make()
    s.remove_from_isr("t", 0, 1)
    s.remove_from_isr("t", 0, 2)
    assert s.elect_leader("t", 0, {1, 2})
    assert s.topic("t").partitions[0].leader is None      # out-of-sync replicas never lead by default
    s2 = make(config={"unclean.leader.election.enable": True})
    s2.remove_from_isr("t", 0, 1)
    s2.remove_from_isr("t", 0, 2)
    assert s2.elect_leader("t", 0, {1, 2})
    assert s2.topic("t").partitions[0].leader in (1, 2)


def test_alter_isr_is_fenced_by_leader_epoch():
    s = make()
    s.alter_isr("t", 0, 0, 0, [0, 1])
    assert s.topic("t").partitions[0].isr == [0, 1]
    with pytest.raises(rb.errors.FencedLeaderEpochError):
        s.alter_isr("t", 0, 0, 7, [0])


def test_validation_errors_change_nothing():
    s = make()
    with pytest.raises(rb.TopicAlreadyExistsError):
        s.validate_new_topic("t", 1, 1, {}, None, 1)
    with pytest.raises(rb.InvalidReplicationFactorError, match="only 2 nodes"):
        s.validate_new_topic("u", 1, 3, {}, None, 2)
    with pytest.raises(rb.InvalidConfigError):
        s.validate_new_topic("u", 1, 1, {"segment.bytes": -1}, None, 1)
    assert list(s.topics) == ["t"]


def test_json_round_trip_and_producer_ids_never_reused():
    s = make()
    first = s.allocate_producer_ids(10)
    s2 = ClusterState.from_json(s.to_json())
    assert s2.allocate_producer_ids(1) == first + 10
    assert s2.topic("t").partitions[1].placement == s.topic("t").partitions[1].placement


def test_offline_partition_keeps_its_isr_for_a_later_election():
    s = make()
    p = s.topic("t").partitions[0]
    assert s.elect_leader("t", 0, set())                 # every replica down (e.g. still starting)
    assert p.leader is None and p.isr == [0, 1, 2]
    assert s.elect_leader("t", 0, {2})                    # one comes back: it can lead again
    assert p.leader == 2


def test_reconcile_never_empties_the_isr_while_replicas_start_slowly():
    # the verification suite's finding: replicas slower to start than the grace period left the
    # partition with leader None and an empty ISR, forever
    s = make()
    for _ in range(3):
        s.reconcile_partition("t", 0, alive=set(), usable=set(), starting=set(), restarted=set())
    p = s.topic("t").partitions[0]
    assert p.leader is None and p.isr == [0, 1, 2]
    assert s.reconcile_partition("t", 0, alive={1}, usable={1}, starting=set(), restarted=set())
    assert p.leader == 1


def test_reconcile_removes_dead_followers_and_reelects_after_leader_restart():
    s = make()
    p = s.topic("t").partitions[0]
    assert not s.reconcile_partition("t", 0, {0, 1, 2}, {0, 1, 2}, set(), set())
    assert s.reconcile_partition("t", 0, {0, 1}, {0, 1}, set(), set()) and p.isr == [0, 1]
    epoch = p.leader_epoch
    assert s.reconcile_partition("t", 0, {0, 1}, {0, 1}, set(), restarted={0})
    assert p.leader == 1 and p.leader_epoch == epoch + 1
    assert p.isr == [1]           # the restarted replica rejoins once the new leader sees it caught up


def test_a_leader_moved_off_a_lost_node_leaves_the_isr_and_an_in_sync_follower_leads():
    # a replica moved to another node restarts with an empty log: it must not stay the leader (its
    # followers would truncate to nothing) nor count as in sync
    s = make(nodes=("a", "b", "c", "d"))
    p = s.topic("t").partitions[0]
    lost = p.leader
    epoch = p.leader_epoch
    s.move_replica("t", 0, lost, "d")
    assert p.leader is None and lost not in p.isr and len(p.isr) == 2
    others = set(p.replicas) - {lost}
    assert s.reconcile_partition("t", 0, alive=set(p.replicas), usable=set(p.replicas), starting=set(),
                                 restarted={lost})
    assert p.leader in others and p.leader_epoch > epoch


def test_a_sole_in_sync_leader_moved_off_a_lost_node_leaves_the_partition_offline():
    # Kafka's offline partition: the only in-sync copy is gone; with unclean election off no
    # out-of-sync follower (nor the empty new incarnation) may lead
    s = make(nodes=("a", "b", "c", "d"))
    p = s.topic("t").partitions[0]
    lost = p.leader
    p.isr = [lost]
    s.move_replica("t", 0, lost, "d")
    assert p.leader is None and p.isr == []
    assert not s.reconcile_partition("t", 0, alive=set(p.replicas), usable=set(p.replicas), starting=set(),
                                     restarted=set())
    assert p.leader is None


def test_a_moved_follower_leaves_the_isr_and_the_leader_stays():
    s = make(nodes=("a", "b", "c", "d"))
    p = s.topic("t").partitions[0]
    follower = next(r for r in p.replicas if r != p.leader)
    leader = p.leader
    s.move_replica("t", 0, follower, "d")
    assert p.leader == leader and follower not in p.isr

"""Option rules of `ray-broker verify` (no Ray): which faults a run gets."""
from __future__ import annotations

import pytest

from ray_broker.verification.nemesis import DEFAULT_FAULTS, NODE_FAULTS
from ray_broker.verification.runner import parse_faults, parse_workloads


def test_node_faults_join_the_defaults_only_on_a_multi_node_run():
    assert not set(NODE_FAULTS) & set(parse_faults(None, True, ["queue", "txn"], nodes=1))
    assert set(NODE_FAULTS) <= set(parse_faults(None, True, ["queue", "txn"], nodes=3))
    assert not set(NODE_FAULTS) & set(parse_faults("all", True, ["queue"], nodes=1))


def test_node_faults_asked_for_on_one_node_are_refused():
    with pytest.raises(ValueError, match="--nodes"):
        parse_faults("remove_node,kill_leader", True, ["queue"], nodes=1)


def test_group_and_client_faults_follow_the_workloads():
    queue_only = parse_faults(None, True, ["queue"])
    assert "kill_client" not in queue_only and "kill_group_coordinator" not in queue_only
    with_copier = parse_faults(None, True, parse_workloads("copier"))
    assert "kill_client" in with_copier and "kill_group_coordinator" in with_copier
    assert set(DEFAULT_FAULTS) == set(parse_faults(None, True, parse_workloads("all")))


def test_workload_all_includes_the_copier():
    assert parse_workloads("all") == ["queue", "txn", "copier"]
    with pytest.raises(ValueError, match="unknown workload"):
        parse_workloads("bogus")

"""Consumer-group state machine: the full source x target grid against the table."""
from __future__ import annotations

import pytest

from ray_broker.errors import BrokerError
from ray_broker.group.state import (ALLOWED_PREVIOUS, GroupState, IllegalGroupStateTransition, check_transition,
                                    is_allowed)

EXPECTED = {
    (GroupState.EMPTY, GroupState.PREPARING_REBALANCE),
    (GroupState.PREPARING_REBALANCE, GroupState.EMPTY),
    (GroupState.PREPARING_REBALANCE, GroupState.COMPLETING_REBALANCE),
    (GroupState.COMPLETING_REBALANCE, GroupState.PREPARING_REBALANCE),
    (GroupState.COMPLETING_REBALANCE, GroupState.STABLE),
    (GroupState.STABLE, GroupState.PREPARING_REBALANCE),
    *((s, GroupState.DEAD) for s in GroupState),
}


def test_every_state_has_an_entry():
    assert set(ALLOWED_PREVIOUS) == set(GroupState)


def test_state_values_are_frozen():
    assert [(s.name, int(s)) for s in GroupState] == [
        ("EMPTY", 0), ("PREPARING_REBALANCE", 1), ("COMPLETING_REBALANCE", 2), ("STABLE", 3), ("DEAD", 4)]


@pytest.mark.parametrize("source", list(GroupState))
@pytest.mark.parametrize("target", list(GroupState))
def test_transition_grid(source, target):
    allowed = (source, target) in EXPECTED
    assert is_allowed(source, target) is allowed
    if allowed:
        check_transition(source, target)
    else:
        with pytest.raises(IllegalGroupStateTransition) as e:
            check_transition(source, target)
        assert isinstance(e.value, BrokerError)
        assert source.name in str(e.value) and target.name in str(e.value)

"""The transaction state machine against Kafka's table (reference 2.4) + the one TV2 extension."""
from __future__ import annotations

import itertools

import pytest

from ray_broker.errors import ErrorCode, InvalidTxnStateError
from ray_broker.txn import state as state_mod
from ray_broker.txn.state import ALLOWED_PREVIOUS, IllegalStateTransition, TxnState, check_transition

S = TxnState
IDLE = {S.EMPTY, S.COMPLETE_COMMIT, S.COMPLETE_ABORT}
# Written out independently of the module: target -> allowed sources.
EXPECTED = {
    S.EMPTY: IDLE,
    S.ONGOING: IDLE | {S.ONGOING},
    S.PREPARE_COMMIT: {S.ONGOING},
    S.PREPARE_ABORT: {S.ONGOING, S.PREPARE_EPOCH_FENCE},
    S.COMPLETE_COMMIT: {S.PREPARE_COMMIT},
    S.COMPLETE_ABORT: {S.PREPARE_ABORT} | IDLE,      # TV2: empty abort completes directly
    S.DEAD: IDLE,
    S.PREPARE_EPOCH_FENCE: {S.ONGOING},
}


def test_state_values_match_the_kafka_log_format():
    assert [(s.name, int(s)) for s in TxnState] == [
        ("EMPTY", 0), ("ONGOING", 1), ("PREPARE_COMMIT", 2), ("PREPARE_ABORT", 3), ("COMPLETE_COMMIT", 4),
        ("COMPLETE_ABORT", 5), ("DEAD", 6), ("PREPARE_EPOCH_FENCE", 7)]


def test_table_covers_every_state():
    assert set(ALLOWED_PREVIOUS) == set(TxnState)
    assert {k: set(v) for k, v in ALLOWED_PREVIOUS.items()} == EXPECTED


def test_table_is_read_only():
    with pytest.raises(TypeError):
        ALLOWED_PREVIOUS[S.DEAD] = frozenset()  # type: ignore[index]


@pytest.mark.parametrize("source,target", list(itertools.product(TxnState, TxnState)),
                         ids=lambda s: s.name)
def test_full_source_target_grid(source, target):
    if source in EXPECTED[target]:
        check_transition(source, target)
    else:
        with pytest.raises(IllegalStateTransition) as e:
            check_transition(source, target)
        assert source.name in str(e.value) and target.name in str(e.value)


def test_illegal_transition_is_an_invalid_txn_state_error():
    with pytest.raises(InvalidTxnStateError) as e:
        check_transition(S.COMPLETE_COMMIT, S.PREPARE_COMMIT)
    assert e.value.code == ErrorCode.INVALID_TXN_STATE


def test_dead_is_terminal_and_fence_only_leads_to_prepare_abort():
    assert not any(S.DEAD in sources for sources in ALLOWED_PREVIOUS.values())
    assert [t for t, sources in ALLOWED_PREVIOUS.items() if S.PREPARE_EPOCH_FENCE in sources] == [S.PREPARE_ABORT]


def test_module_docstring_has_a_diagram():
    doc = state_mod.__doc__
    for s in TxnState:
        assert s.name in doc
    assert "-->" in doc

"""Pure parts around the processing helper, without Ray: the main job's vectorised payment
enrichment (against a per-record reference), and consumer-group lag for `groups describe`."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pyarrow as pa

from ray_broker.group.lag import group_lag
from ray_broker.group.coordinator import GroupDescription, MemberDescription
from ray_broker.group.offsets import OffsetAndMetadata
from ray_broker.group.state import GroupState
from ray_broker.processing import KeyValueState, ProcessContext
from ray_broker.records import TopicPartition

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _job():
    spec = importlib.util.spec_from_file_location("main_job_under_test", os.path.join(REPO, "jobs", "main_job.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_running_balances_match_a_per_record_loop():
    job = _job()
    rng = np.random.default_rng(7)
    group = rng.integers(0, 5, size=200)
    amounts = rng.integers(-100, 100, size=200)
    start = rng.integers(-50, 50, size=5)
    after, final = job.running_balances(group, amounts, start)
    bal = start.copy()
    for i, (g, a) in enumerate(zip(group, amounts)):
        bal[g] += a
        assert after[i] == bal[g]
    assert final.tolist() == bal.tolist()
    empty_after, empty_final = job.running_balances(np.zeros(0, np.int64), np.zeros(0, np.int64), start)
    assert len(empty_after) == 0 and empty_final.tolist() == start.tolist()


def test_enrich_payments_uses_and_updates_state_and_rolls_back():
    job = _job()
    ids = np.arange(6)
    accounts = np.array([1, 2, 1, 1, 3, 2])
    amounts = np.array([100, -5, 20, -300, 7, 5])
    batch = pa.RecordBatch.from_arrays([pa.array(np.arange(10, 16)), job.account_keys(accounts),
                                        job.payment_values(ids, amounts, 32)], ["offset", "key", "value"])
    state = KeyValueState({b"acct-00001": 1000})
    ctx = ProcessContext(TopicPartition("payments", 2), 0, "g-worker-0", state)
    out = job.enrich_payments(batch, ctx)
    assert out.schema == job.ENRICHED_SCHEMA
    assert out.column("payment_id").to_pylist() == list(range(6))
    assert out.column("balance_after").to_pylist() == [1100, -5, 1120, 820, 7, 0]
    assert out.column("overdrawn").to_pylist() == [False, True, False, False, False, False]
    assert out.column("input_offset").to_pylist() == list(range(10, 16))
    assert set(out.column("input_partition").to_pylist()) == {2}
    assert state.dirty_items() == [(b"acct-00001", 820), (b"acct-00002", 0), (b"acct-00003", 7)]
    state.rollback()                                     # an aborted transaction leaves no trace
    assert state.to_dict() == {b"acct-00001": 1000}
    wrapped = job.make_enricher("enriched")(batch, ctx)
    assert wrapped.topic == "enriched" and wrapped.key_column == "account"


def test_group_lag_against_last_stable_offset():
    t0, t1, t2 = TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("t", 2)
    member = MemberDescription("m-1", "client-a", ("t",), (t0, t1), 10_000, 60_000)
    desc = GroupDescription("g", GroupState.STABLE, 3, "range", "m-1", (member,),
                            {t0: OffsetAndMetadata(5), t2: OffsetAndMetadata(9)}, (t1,))
    lags = {(p.topic, p.partition): p for p in group_lag(desc, {("t", 0): 12, ("t", 1): 4, ("t", 2): -1})}
    assert set(lags) == {("t", 0), ("t", 1), ("t", 2)}
    assert (lags["t", 0].committed, lags["t", 0].last_stable_offset, lags["t", 0].lag) == (5, 12, 7)
    assert lags["t", 0].member_id == "m-1" and lags["t", 0].client_id == "client-a" and not lags["t", 0].pending
    assert lags["t", 1].committed is None and lags["t", 1].lag is None and lags["t", 1].pending
    assert lags["t", 2].member_id is None and lags["t", 2].last_stable_offset is None and lags["t", 2].lag is None
    # a committed offset beyond the LSO (e.g. reset past an open transaction) is no negative lag
    ahead = group_lag(GroupDescription("g", GroupState.EMPTY, 0, None, None, (), {t0: OffsetAndMetadata(20)}, ()),
                      {("t", 0): 12})
    assert ahead[0].lag == 0


def test_cli_reset_targets_clamp_into_the_log():
    from ray_broker.cli.main import CliError, reset_targets
    from ray_broker.protocol import PartitionDescription, TopicDescription

    desc = TopicDescription("t", "id", [PartitionDescription(0, 0, [0], [0], 0, 3, 10, 8),
                                        PartitionDescription(1, 0, [0], [0], 0, 0, 0, 0)], {}, None)
    assert reset_targets(desc, "earliest", None) == {0: (3, 3), 1: (0, 0)}
    assert reset_targets(desc, "latest", None) == {0: (8, 8), 1: (0, 0)}   # last stable offset, not HW
    assert reset_targets(desc, "offset", 5) == {0: (5, 5), 1: (0, 5)}
    assert reset_targets(desc, "offset", 1) == {0: (3, 1), 1: (0, 1)}
    down = TopicDescription("t", "id", [PartitionDescription(0, None, [0], [], 0, -1, -1, -1)], {}, None)
    try:
        reset_targets(down, "earliest", None)
    except CliError as exc:
        assert exc.code == "LEADER_NOT_AVAILABLE"
    else:
        raise AssertionError("no error for a leaderless partition")

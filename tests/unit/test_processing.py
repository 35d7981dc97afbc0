"""Pure parts of the exactly-once processing helper (no Ray): commit timing, offset tracking,
state with undo, output normalisation, error and restart decisions."""
from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from ray_broker.errors import (BrokerTimeoutError, IllegalGenerationError, InvalidProducerEpochError,
                               InvalidRequestError, ProducerFencedError, TransactionAbortableError,
                               UnknownMemberIdError)
from ray_broker.processing.core import (CommitPolicy, ErrorAction, IntSerde, JsonSerde, KeyValueState, Output,
                                        RestartAction, TxnTracker, classify_error, consumed_up_to, lagging,
                                        normalize_outputs, restart_decision, transactional_id_for, wants_context,
                                        worker_actor_name)
from ray_broker.records import TopicPartition

T0, T1 = TopicPartition("in", 0), TopicPartition("in", 1)


# ------------------------------------------------------------------------------------------ identity
def test_transactional_id_is_stable_per_index_and_distinct_between_indexes():
    assert transactional_id_for("g", 0) == transactional_id_for("g", 0) == "g-worker-0"
    assert transactional_id_for("g", 1) != transactional_id_for("g", 0)
    assert transactional_id_for("g", 2, prefix="app") == "app-worker-2"
    assert worker_actor_name("g", 3) == "processing/g/worker-3"
    for bad in (-1, True, "1", 1.0):
        with pytest.raises(ValueError):
            transactional_id_for("g", bad)


# ------------------------------------------------------------------------------------------ commit policy
def test_commit_due_after_interval_or_record_cap():
    t = TxnTracker(clock=lambda: 0.0)
    p = CommitPolicy(commit_interval_ms=100)
    assert not p.commit_due(t, 10.0)                      # nothing open: nothing to commit
    t.begin(now=10.0)
    assert not p.commit_due(t, 10.05)
    assert p.commit_due(t, 10.1)
    capped = CommitPolicy(commit_interval_ms=10_000, max_records_per_txn=5)
    t.consumed(T0, 0, 3, 3)
    assert not capped.commit_due(t, 10.0)
    t.consumed(T0, 3, 5, 2)
    assert capped.commit_due(t, 10.0)
    assert CommitPolicy(commit_interval_ms=0).commit_due(t, 10.0)


def test_poll_timeout_never_overruns_the_commit_deadline():
    t = TxnTracker()
    p = CommitPolicy(commit_interval_ms=100, idle_poll_ms=200)
    assert p.poll_timeout(t, 5.0) == pytest.approx(0.2)   # idle: bounded by idle_poll_ms
    t.begin(now=5.0)
    assert p.poll_timeout(t, 5.03) == pytest.approx(0.07)
    assert p.poll_timeout(t, 5.5) == 0.0                  # overdue: do not block
    with pytest.raises(ValueError):
        CommitPolicy(commit_interval_ms=-1)
    with pytest.raises(ValueError):
        CommitPolicy(max_records_per_txn=0)


# ------------------------------------------------------------------------------------------ tracker
def test_tracker_offsets_rewind_points_and_commit():
    t = TxnTracker()
    with pytest.raises(InvalidRequestError):
        t.consumed(T0, 0, 1, 1)                           # no transaction
    t.begin(now=1.0)
    with pytest.raises(InvalidRequestError):
        t.begin()
    t.consumed(T0, 10, 15, 5)
    t.consumed(T0, 15, 20, 5)
    t.consumed(T1, 0, 4, 4)
    assert t.records == 14
    assert t.offsets() == {T0: 20, T1: 4}
    assert t.rewind_points() == {T0: 10, T1: 0}
    with pytest.raises(ValueError):
        t.consumed(T0, 12, 13, 1)                         # going back inside one transaction is a bug
    assert t.committed_ok() == {T0: 20, T1: 4}
    assert not t.open and t.committed == {T0: 20, T1: 4} and t.offsets() == {}


def test_tracker_abort_returns_first_offsets_and_forget_drops_partitions():
    t = TxnTracker()
    t.begin(now=0.0)
    t.consumed(T0, 7, 9, 2)
    assert t.aborted() == {T0: 7}
    assert not t.open and t.committed == {}
    t.begin(now=0.0)
    t.consumed(T0, 7, 9, 2)
    t.consumed(T1, 3, 4, 1)
    t.committed_ok()
    t.forget([T0])
    assert t.committed == {T1: 4}


def test_tracker_advance_past_markers_only_forward():
    t = TxnTracker()
    t.committed[T0] = 10
    t.begin(now=0.0)
    t.advance(T0, 10)                                     # not past the committed offset: nothing
    assert t.offsets() == {}
    t.advance(T0, 11)                                     # a transaction marker at offset 10
    assert t.offsets() == {T0: 11} and t.rewind_points() == {T0: 10}


# ------------------------------------------------------------------------------------------ state
def test_state_rollback_restores_old_values_and_deletes_new_keys():
    s = KeyValueState({b"a": 1, "b": 2})
    s.put("a", 10)
    s.put("a", 11)
    s.put(b"c", 3)
    s.delete("b")
    assert s.get("a") == 11 and s.get("c") == 3 and "b" not in s
    assert s.dirty_items() == [(b"a", 11), (b"b", None), (b"c", 3)]
    s.rollback()
    assert s.to_dict() == {b"a": 1, b"b": 2} and not s.dirty


def test_state_commit_keeps_values_and_clears_dirty():
    s = KeyValueState()
    s.put_many(pa.array(["x", "y"]), pa.array([1, 2]))
    assert s.get_many(["x", "y", "z"], default=0) == [1, 2, 0]
    s.commit()
    assert not s.dirty and s.dirty_items() == []
    s.put("x", 1)                                         # same value: dirty but nothing to write
    assert s.dirty_items() == []
    s.put("x", 5)
    s.put("x", 1)                                         # back to the committed value
    assert s.dirty_items() == []
    s.put("q", 1)
    s.delete("q")                                         # created and deleted in one transaction
    assert s.dirty_items() == []
    s.rollback()
    assert s.to_dict() == {b"x": 1, b"y": 2}


def test_state_restore_and_key_types():
    s = KeyValueState()
    s.restore(b"k", 5)
    s.restore(b"gone", 1)
    s.restore(b"gone", None)
    assert s.to_dict() == {b"k": 5} and not s.dirty
    with pytest.raises(TypeError):
        s.put(12, 1)
    with pytest.raises(ValueError):
        s.put_many(["a"], [1, 2])
    assert IntSerde.loads(IntSerde.dumps(-42)) == -42
    assert JsonSerde.loads(JsonSerde.dumps({"b": [1]})) == {"b": [1]}


# ------------------------------------------------------------------------------------------ outputs
def _batch(n=3):
    return pa.RecordBatch.from_pydict({"offset": list(range(n)), "key": [b"k"] * n, "value": [b"v"] * n})


def test_outputs_single_batch_goes_to_the_output_topic_without_offset_column():
    outs = normalize_outputs(_batch(), "out")
    assert [o.topic for o in outs] == ["out"]
    assert outs[0].batch.schema.names == ["key", "value"]
    tbl = normalize_outputs(pa.Table.from_batches([_batch()]), "out")[0].batch
    assert tbl.schema.names == ["key", "value"]
    assert normalize_outputs(None, "out") == []
    assert normalize_outputs(_batch(0), "out") == []       # empty: nothing to send
    rows = normalize_outputs([{"key": b"a", "value": b"1"}], "out")[0].batch
    assert rows.num_rows == 1
    cols = normalize_outputs({"value": [b"1", b"2"]}, "out")[0].batch   # dict of columns
    assert cols.num_rows == 2


def test_outputs_to_several_topics():
    outs = normalize_outputs({"a": _batch(2), "b": Output("ignored", _batch(1), partition=0), "c": None}, None)
    assert [(o.topic, o.batch.num_rows, o.partition) for o in outs] == [("a", 2, None), ("b", 1, 0)]
    outs = normalize_outputs([Output("x", _batch(1), key_column="key")], None)
    assert outs[0].topic == "x" and outs[0].key_column == "key"
    with pytest.raises(TypeError):
        normalize_outputs(_batch(), None)                  # records but no output topic
    with pytest.raises(TypeError):
        normalize_outputs(42, "out")


def test_wants_context():
    assert not wants_context(lambda b: b)
    assert wants_context(lambda b, ctx: b)
    assert wants_context(lambda *a: a)

    def with_default(batch, ctx=None):
        return batch
    assert wants_context(with_default)


# ------------------------------------------------------------------------------------------ errors
def test_error_classification():
    assert classify_error(ProducerFencedError("x"), 1, 5) is ErrorAction.RECREATE
    assert classify_error(InvalidProducerEpochError("x"), 1, 5) is ErrorAction.RECREATE
    for err in (IllegalGenerationError("x"), UnknownMemberIdError("x"), TransactionAbortableError("x"),
                BrokerTimeoutError("x"), ValueError("user function bug")):
        assert classify_error(err, 1, 5) is ErrorAction.ABORT_AND_RETRY
    assert classify_error(ValueError("poison"), 6, 5) is ErrorAction.FAIL
    assert classify_error(ProducerFencedError("x"), 6, 5) is ErrorAction.FAIL
    assert classify_error(KeyboardInterrupt(), 1, 5) is ErrorAction.FAIL


# ------------------------------------------------------------------------------------------ supervisor
def test_restart_decisions():
    d = dict(stopping=False, current=True, restarts=0, max_restarts=None)
    assert restart_decision(outcome="died", **d) is RestartAction.RESTART
    assert restart_decision(outcome="crashed", **d) is RestartAction.RESTART
    assert restart_decision(outcome="stopped", **d) is RestartAction.DONE
    assert restart_decision(outcome="failed", **d) is RestartAction.FAILED
    assert restart_decision(outcome="died", **{**d, "stopping": True}) is RestartAction.DONE
    assert restart_decision(outcome="died", **{**d, "current": False}) is RestartAction.IGNORE
    assert restart_decision(outcome="died", **{**d, "restarts": 3, "max_restarts": 3}) is RestartAction.FAILED
    with pytest.raises(ValueError):
        restart_decision(outcome="weird", **d)


def test_consumed_up_to_and_lagging():
    targets = {T0: 10, T1: 0}
    assert not consumed_up_to({}, targets)
    assert not consumed_up_to({T0: 9}, targets)
    assert consumed_up_to({T0: 10}, targets)              # T1 is empty: nothing needed
    assert consumed_up_to({T0: 12, T1: None}, targets)
    assert lagging({T0: 4}, targets) == {T0: 6}


def test_spec_parts_pickle():
    # the worker spec travels to the actors: its parts must pickle
    for obj in (CommitPolicy(50, 10), IntSerde, JsonSerde, KeyValueState({b"a": 1})):
        pickle.loads(pickle.dumps(obj))


# ------------------------------------------------------------------------------------------ pipeline arguments
class _FakeCluster:
    namespace = "ns"


def test_pipeline_arguments_are_validated_without_ray():
    from ray_broker.processing import ExactlyOncePipeline

    ok = ExactlyOncePipeline(_FakeCluster(), "in", "out", lambda b: b, "g", workers=3, commit_interval_ms=50,
                             consumer_config={"session_timeout_ms": 3000})
    assert ok.input_topics == ("in",) and ok.spec.commit_policy.commit_interval_ms == 50
    assert ok.spec.consumer_config["session_timeout_ms"] == 3000
    assert ok.spec.consumer_config["heartbeat_interval_ms"] == 1000          # defaults kept
    bad = [dict(input_topics=[]), dict(workers=0), dict(group_id=""), dict(output_topic="in"),
           dict(input_topics=["a", "b"], state_topic="s"), dict(fn=42)]
    for kw in bad:
        args = {"input_topics": "in", "output_topic": "out", "fn": lambda b: b, "group_id": "g", **kw}
        with pytest.raises(InvalidRequestError):
            ExactlyOncePipeline(_FakeCluster(), args.pop("input_topics"), args.pop("output_topic"), args.pop("fn"),
                                args.pop("group_id"), **args)


def test_functions_of_modules_workers_cannot_import_travel_by_value(tmp_path, monkeypatch):
    import importlib
    import sys

    import cloudpickle

    from ray_broker.processing.pipeline import _pickle_fn, copy_records

    (tmp_path / "my_udf_module.py").write_text("FACTOR = 3\n\ndef triple(x):\n    return x * FACTOR\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("my_udf_module")
    data = _pickle_fn(mod.triple)
    monkeypatch.delitem(sys.modules, "my_udf_module")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    assert cloudpickle.loads(data)(2) == 6                # no import of my_udf_module needed
    assert cloudpickle.loads(_pickle_fn(copy_records)) is copy_records   # ray_broker's own: by reference

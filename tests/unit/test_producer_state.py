"""Producer-state machine: duplicates, gaps, fencing, snapshots; a property test over interleavings."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ray_broker as rb
from ray_broker.storage.producer_state import Duplicate, ProducerStateManager, next_sequence


def append(mgr, log, pid, epoch, seq, n):
    """What the leader does: validate, then append and record."""
    dup = mgr.check_append(pid, epoch, seq, n)
    if dup is not None:
        return dup
    first = len(log)
    log.extend((pid, epoch, next_sequence(seq, i)) for i in range(n))
    mgr.on_append(pid, epoch, seq, n, first, 0)
    return first


def test_retry_of_any_of_last_five_batches_is_a_duplicate():
    mgr, log = ProducerStateManager(), []
    for i in range(6):
        append(mgr, log, 7, 0, i * 10, 10)
    assert mgr.check_append(7, 0, 10, 10) == Duplicate(10, 19)
    with pytest.raises(rb.OutOfOrderSequenceError):     # evicted from the 5-batch window: not a dup
        mgr.check_append(7, 0, 0, 10)


def test_epoch_rules():
    mgr, log = ProducerStateManager(), []
    append(mgr, log, 1, 3, 0, 1)
    with pytest.raises(rb.InvalidProducerEpochError):
        mgr.check_append(1, 2, 1, 1)
    with pytest.raises(rb.OutOfOrderSequenceError):
        mgr.check_append(1, 4, 5, 1)                     # a new epoch starts at sequence 0
    assert mgr.check_append(1, 4, 0, 1) is None
    with pytest.raises(rb.UnknownProducerIdError):
        mgr.check_append(99, 0, 4, 1)


def test_sequence_wraps_like_kafka():
    mgr, log = ProducerStateManager(), []
    append(mgr, log, 1, 0, 0, 1)
    e = mgr.producers[1]
    e.batches.clear()
    mgr.on_append(1, 0, 2**31 - 3, 2, 100, 0)           # last sequence 2^31-2
    assert mgr.expected_sequence(1, 0) == 0
    assert mgr.check_append(1, 0, 0, 1) is None


def test_snapshot_round_trip_and_expiry(tmp_path):
    mgr, log = ProducerStateManager(), []
    append(mgr, log, 1, 0, 0, 3)
    mgr.on_append(2, 0, 0, 1, 3, timestamp_ms=10_000)
    restored, offset = ProducerStateManager.from_bytes(mgr.to_bytes(4))
    assert offset == 4 and restored.check_append(1, 0, 0, 3) == Duplicate(0, 2)
    assert mgr.remove_expired(now_ms=10_500, expiration_ms=1000) == [1]
    assert list(mgr.producers) == [2]
    with pytest.raises(ValueError):
        ProducerStateManager.from_bytes(mgr.to_bytes(4)[:-3] + b"999")


ops = st.lists(st.tuples(st.sampled_from(["send", "retry", "dup_old", "bump", "reorder"]),
                         st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_interleavings_never_duplicate_or_reorder(script):
    """A client model sends, retries, replays old batches, bumps epochs and reorders in-flight batches;
    whatever arrives, the log holds each (epoch, sequence) once and in sequence order per epoch."""
    mgr, log = ProducerStateManager(), []
    pid, epoch, next_seq = 5, 0, 0
    sent: list[tuple[int, int, int]] = []        # (epoch, seq, n) ever sent
    for op, n, k in script:
        if op == "send":
            batch = (epoch, next_seq, n)
            try:
                append(mgr, log, pid, *batch)
                sent.append(batch)
                next_seq = next_sequence(next_seq, n)
            except rb.BrokerError:
                pass
        elif op in ("retry", "dup_old") and sent:
            e, s, m = sent[-1] if op == "retry" else sent[-min(k, len(sent))]
            try:
                append(mgr, log, pid, e, s, m)
            except rb.BrokerError:
                pass
        elif op == "bump":
            epoch, next_seq = epoch + 1, 0
        elif op == "reorder":
            # the second of two in-flight batches arrives first: refused as a gap, then both in order
            a, b = (epoch, next_seq, n), (epoch, next_sequence(next_seq, n), k)
            with pytest.raises((rb.OutOfOrderSequenceError, rb.UnknownProducerIdError)):
                append(mgr, log, pid, *b)
            for batch in (a, b):
                append(mgr, log, pid, *batch)
                sent.append(batch)
            next_seq = next_sequence(b[1], k)
    assert len(set(log)) == len(log), "a record was appended twice"
    per_epoch: dict[int, list[int]] = {}
    for _, e, s in log:
        per_epoch.setdefault(e, []).append(s)
    assert sorted(per_epoch) == [e for e in dict.fromkeys(e for _, e, _ in log)], "epochs out of order"
    for e, seqs in per_epoch.items():
        assert seqs == list(range(len(seqs))), f"epoch {e}: sequences {seqs[:10]}"

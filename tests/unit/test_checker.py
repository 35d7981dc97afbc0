"""Unit tests for ray_broker.verification: the history recorder and the anomaly checker (pure Python)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from ray_broker.verification import (
    ANOMALIES, Assign, CopyOutput, Fault, FinalRead, History, OffsetCommit, Poll, Rebalance, Seek, SendFail,
    SendOk, SendUnknown, TxnAbort, TxnBegin, TxnCommit, TxnCommitStart, check, event_from_dict,
)

RC, RU = "read_committed", "read_uncommitted"


def clean_history() -> list:
    """A valid history exercising everything the checker must accept.

    Topic t, partition 0 log (read_uncommitted view):
      0 v1, 1 v2, 2 v3 (plain sends)         3 a1 (T1 committed)      4 marker
      5 b1 (T2 aborted)                      6 marker                 7 c1 (T3 unknown -> committed)
      8 marker                               9 d1 (T4 unknown -> aborted)   10 marker
      11 e2 (plain send, unknown outcome, written)
    Partition 1: 0 a2 (T1), 1 marker, 2 c2 (T3), 3 marker.
    Copier: in/0 holds i0..i3; X1 copies i0,i1 -> o0,o1 (committed), X2 copies i2,i3 -> o2,o3
    (aborted, consumer seeks back), X3 copies i2,i3 -> o2b,o3b (committed).
    """
    h = [
        Fault("partition", "broker-1", "start"),
        SendOk("p1", "t", 0, "v1", 0),
        SendOk("p1", "t", 0, "v2", 1),
        SendOk("p1", "t", 0, "v3", 2),
        Poll("c1", RC, [("t", 0, 0, "v1"), ("t", 0, 1, "v2")]),
        # T1: committed, spans both partitions
        TxnBegin("p2", "T1"),
        SendOk("p2", "t", 0, "a1", 3, "T1"),
        SendOk("p2", "t", 1, "a2", 0, "T1"),
        TxnCommitStart("p2", "T1"),
        Poll("c1", RC, [("t", 0, 2, "v3"), ("t", 0, 3, "a1")]),  # legit: after the commit was requested
        TxnCommit("p2", "T1", True),
        # T2: aborted
        TxnBegin("p2", "T2"),
        SendOk("p2", "t", 0, "b1", 5, "T2"),
        TxnAbort("p2", "T2", True),
        # seek back and re-read: not nonmonotonic
        Seek("c1", "t", 0, 0),
        Poll("c1", RC, [("t", 0, 0, "v1")]),
        # T3: commit outcome unknown, all values visible -> committed
        TxnBegin("p2", "T3"),
        SendOk("p2", "t", 0, "c1", 7, "T3"),
        SendUnknown("p2", "t", 1, "c2", "timeout", "T3"),
        TxnCommitStart("p2", "T3"),
        TxnCommit("p2", "T3", None),
        Fault("partition", "broker-1", "end"),
        # gap 4,5,6 = marker, aborted, marker: not a skip
        Poll("c1", RC, [("t", 0, 1, "v2"), ("t", 0, 2, "v3"), ("t", 0, 3, "a1"), ("t", 0, 7, "c1")]),
        # T4: commit outcome unknown, nothing visible -> aborted
        TxnBegin("p3", "T4"),
        SendUnknown("p3", "t", 0, "d1", "timeout", "T4"),
        TxnCommitStart("p3", "T4"),
        TxnCommit("p3", "T4", None),
        # plain sends with failed / unknown outcome
        SendFail("p1", "t", 0, "e1", "RecordTooLarge"),
        SendUnknown("p1", "t", 0, "e2", "NotLeaderOrFollower"),
        SendUnknown("p1", "t", 0, "e3", "timeout"),  # never written: fine
        Poll("c1", RC, [("t", 0, 11, "e2")]),  # gap 8,9,10 = marker, aborted, marker
        Rebalance("c1"),
        Poll("c1", RC, [("t", 0, 0, "v1")]),
        Assign("c1", [("t", 1)]),
        Poll("c1", RC, [("t", 1, 0, "a2"), ("t", 1, 2, "c2")]),
        # read_uncommitted consumer sees aborted data, skips only markers
        Poll("c2", RU, [("t", 0, o, v) for o, v in
                        [(0, "v1"), (1, "v2"), (2, "v3"), (3, "a1"), (5, "b1"), (7, "c1"), (9, "d1")]]),
        Poll("c2", RU, [("t", 0, 11, "e2")]),
        Fault("kill", "broker-2", "start"),
        # copier: seed input
        SendOk("seed", "in", 0, "i0", 0),
        SendOk("seed", "in", 0, "i1", 1),
        SendOk("seed", "in", 0, "i2", 2),
        SendOk("seed", "in", 0, "i3", 3),
        Assign("copier", [("in", 0)]),
        Poll("copier", RC, [("in", 0, 0, "i0"), ("in", 0, 1, "i1")]),
        TxnBegin("copier", "X1"),
        SendOk("copier", "out", 0, "o0", 0, "X1"),
        CopyOutput("i0", "o0", "X1"),
        SendOk("copier", "out", 0, "o1", 1, "X1"),
        CopyOutput("i1", "o1", "X1"),
        OffsetCommit("g", "copier", {("in", 0): 2}, "X1", True),
        TxnCommitStart("copier", "X1"),
        TxnCommit("copier", "X1", True),
        Poll("copier", RC, [("in", 0, 2, "i2"), ("in", 0, 3, "i3")]),
        TxnBegin("copier", "X2"),
        SendOk("copier", "out", 0, "o2", 3, "X2"),
        CopyOutput("i2", "o2", "X2"),
        SendOk("copier", "out", 0, "o3", 4, "X2"),
        CopyOutput("i3", "o3", "X2"),
        OffsetCommit("g", "copier", {("in", 0): 4}, "X2", True),
        TxnAbort("copier", "X2", True),
        Seek("copier", "in", 0, 2),
        Poll("copier", RC, [("in", 0, 2, "i2"), ("in", 0, 3, "i3")]),
        TxnBegin("copier", "X3"),
        SendOk("copier", "out", 0, "o2b", 6, "X3"),
        CopyOutput("i2", "o2b", "X3"),
        SendOk("copier", "out", 0, "o3b", 7, "X3"),
        CopyOutput("i3", "o3b", "X3"),
        OffsetCommit("g", "copier", {("in", 0): 4}, "X3", True),
        TxnCommitStart("copier", "X3"),
        TxnCommit("copier", "X3", True),
        Fault("kill", "broker-2", "end"),
        # final reads: the ground truth
        FinalRead("t", 0, RC, [(0, "v1"), (1, "v2"), (2, "v3"), (3, "a1"), (7, "c1"), (11, "e2")], 12),
        FinalRead("t", 0, RU, [(0, "v1"), (1, "v2"), (2, "v3"), (3, "a1"), (5, "b1"), (7, "c1"), (9, "d1"),
                               (11, "e2")], 12),
        FinalRead("t", 1, RC, [(0, "a2"), (2, "c2")], 4),
        FinalRead("in", 0, RC, [(0, "i0"), (1, "i1"), (2, "i2"), (3, "i3")], 4),
        FinalRead("out", 0, RC, [(0, "o0"), (1, "o1"), (6, "o2b"), (7, "o3b")], 9),
        FinalRead("out", 0, RU, [(0, "o0"), (1, "o1"), (3, "o2"), (4, "o3"), (6, "o2b"), (7, "o3b")], 9),
    ]
    return h


def pos(h: list, pred) -> int:
    return next(i for i, e in enumerate(h) if pred(e))


def final(h: list, topic: str, partition: int, iso: str) -> FinalRead:
    return h[pos(h, lambda e: isinstance(e, FinalRead) and (e.topic, e.partition, e.isolation_level)
                 == (topic, partition, iso))]


def only(report, name: str) -> dict:
    """Assert `name` is the one anomaly class reported; return its first example."""
    d = report.to_dict()
    counts = {k: v["count"] for k, v in d["anomalies"].items() if v["count"]}
    assert set(counts) == {name}, counts
    assert d["valid"] is False
    ex = d["anomalies"][name]["examples"]
    assert ex, d["anomalies"][name]
    return ex[0]


# ------------------------------------------------------------------------------------- clean runs

def test_clean_history_is_valid():
    report = check(clean_history())
    d = report.to_dict()
    assert d["valid"], report.format_table()
    assert set(d["anomalies"]) == set(ANOMALIES)
    assert all(a == {"count": 0, "examples": []} for a in d["anomalies"].values())
    assert d["faults"] == {"partition": 1, "kill": 1}
    assert d["operations"] == len(clean_history()) - 4
    assert d["stats"]["unknown_txns_resolved_committed"] == 1  # T3
    assert d["stats"]["unknown_txns_resolved_aborted"] == 1    # T4
    assert d["stats"]["copier_checkable"] is True
    assert d["stats"]["copier_committed_inputs"] == 4
    json.dumps(d)  # serialisable
    table = report.format_table()
    assert "VALID" in table and "lost_write" in table


def test_empty_history_is_valid():
    assert check([]).valid


def test_control_record_gaps_are_not_skips():
    # markers at 1 and 3, aborted data at 2: a read_committed consumer goes 0 -> 4 -> 6
    h = [
        TxnBegin("p", "A"), SendOk("p", "t", 0, "x0", 0, "A"), TxnCommitStart("p", "A"), TxnCommit("p", "A", True),
        TxnBegin("p", "B"), SendOk("p", "t", 0, "x2", 2, "B"), TxnAbort("p", "B", True),
        SendOk("p", "t", 0, "x4", 4), SendOk("p", "t", 0, "x5", 5), SendOk("p", "t", 0, "x6", 6),
        Poll("c", RC, [("t", 0, 0, "x0")]),
        Poll("c", RC, [("t", 0, 4, "x4")]),
        Poll("c", RC, [("t", 0, 5, "x5"), ("t", 0, 6, "x6")]),
        Poll("u", RU, [("t", 0, 0, "x0"), ("t", 0, 2, "x2"), ("t", 0, 4, "x4")]),
        FinalRead("t", 0, RC, [(0, "x0"), (4, "x4"), (5, "x5"), (6, "x6")], 7),
        FinalRead("t", 0, RU, [(0, "x0"), (2, "x2"), (4, "x4"), (5, "x5"), (6, "x6")], 7),
    ]
    r = check(h)
    assert r.valid, r.format_table()
    # but a read_uncommitted consumer jumping over the aborted record at 2 did skip
    h.append(Poll("u2", RU, [("t", 0, 0, "x0"), ("t", 0, 4, "x4")]))
    ex = only(check(h), "poll_skip")
    assert ex["consumer"] == "u2" and ex["skipped_offsets"] == [2]


# ----------------------------------------------------------------------------------- each anomaly

def test_lost_write_plain_send():
    h = clean_history()
    h.insert(pos(h, lambda e: isinstance(e, FinalRead)), SendOk("p1", "t", 0, "lost", 12))
    ex = only(check(h), "lost_write")
    assert ex["value"] == "lost" and ex["txn_id"] is None


def test_lost_write_committed_txn():
    h = clean_history()
    final(h, "t", 1, RC).records.remove((0, "a2"))  # T1 committed ok=True but a2 vanished
    del h[pos(h, lambda e: isinstance(e, Poll) and ("t", 1, 0, "a2") in e.records)]  # and was never polled
    r = check(h)
    d = r.to_dict()["anomalies"]
    assert d["lost_write"]["count"] == 1 and d["lost_write"]["examples"][0]["value"] == "a2"
    # the torn transaction is also partially visible
    assert d["partial_txn_visibility"]["count"] == 1


def test_value_seen_by_read_committed_poll_is_not_lost():
    h = clean_history()
    final(h, "t", 0, RC).records.remove((11, "e2"))
    final(h, "t", 0, RU).records.remove((11, "e2"))
    h.insert(pos(h, lambda e: isinstance(e, FinalRead)), SendOk("p1", "t", 0, "late", 12))
    h.insert(pos(h, lambda e: isinstance(e, FinalRead)), Poll("c9", RC, [("t", 0, 12, "late")]))
    assert check(h).valid  # e2 was an unknown send; "late" was polled


def test_unjudgeable_partition_is_not_lost():
    h = clean_history()
    h.insert(0, SendOk("p1", "other", 0, "z", 0))
    r = check(h)
    assert r.valid and r.stats["acked_values_unjudged"] == 1


def test_duplicate():
    h = clean_history()
    final(h, "t", 1, RC).records.append((4, "a2"))
    ex = only(check(h), "duplicate")
    assert ex["value"] == "a2" and sorted(ex["positions"]) == [("t", 1, 0), ("t", 1, 4)]


def test_duplicate_across_polls():
    h = clean_history()
    h.append(Poll("c8", RU, [("t", 1, 7, "a2")]))
    ex = only(check(h), "duplicate")
    assert ex["value"] == "a2"


def test_aborted_read_poll():
    h = clean_history()
    h.append(Poll("c3", RC, [("t", 0, 5, "b1")]))
    ex = only(check(h), "aborted_read")
    assert ex["value"] == "b1" and ex["txn_id"] == "T2" and ex["reason"] == "txn aborted"


def test_aborted_read_final_read():
    h = clean_history()
    h[1:1] = [TxnBegin("p6", "T6"), SendOk("p6", "t", 1, "g1", 5, "T6"), TxnAbort("p6", "T6", True)]
    final(h, "t", 1, RC).records.append((5, "g1"))
    ex = only(check(h), "aborted_read")
    assert ex["value"] == "g1" and ex["reader"].startswith("final-read")


def test_aborted_value_in_final_read_also_shows_consumer_skip():
    # b1 (aborted) visible to the final read: c1 went 3 -> 7 over it, which is then a skip too
    h = clean_history()
    final(h, "t", 0, RC).records.insert(4, (5, "b1"))
    d = check(h).to_dict()["anomalies"]
    assert d["aborted_read"]["count"] == 1 and d["poll_skip"]["count"] == 1
    assert d["poll_skip"]["examples"][0]["skipped_offsets"] == [5]


def test_aborted_read_of_unknown_txn_resolved_aborted():
    h = clean_history()
    h.insert(pos(h, lambda e: isinstance(e, FinalRead)), Poll("c3", RC, [("t", 0, 9, "d1")]))
    ex = only(check(h), "aborted_read")
    assert ex["value"] == "d1" and "unknown" in ex["reason"]


def test_aborted_read_of_failed_commit():
    h = clean_history()
    h[pos(h, lambda e: isinstance(e, TxnAbort) and e.txn_id == "T2")] = TxnCommit("p2", "T2", False)
    h.append(Poll("c3", RC, [("t", 0, 5, "b1")]))
    ex = only(check(h), "aborted_read")
    assert ex["value"] == "b1"


def test_aborted_read_of_failed_send():
    h = clean_history()
    h.append(Poll("c3", RU, [("t", 0, 12, "e1")]))  # SendFail = definitely not written
    ex = only(check(h), "aborted_read")
    assert ex["value"] == "e1" and ex["reason"] == "send definitely failed"


def test_dirty_read_before_commit_requested():
    h = clean_history()
    h.insert(pos(h, lambda e: isinstance(e, TxnCommitStart) and e.txn_id == "T1"),
             Poll("c4", RC, [("t", 1, 0, "a2")]))
    ex = only(check(h), "dirty_read")
    assert ex["value"] == "a2" and ex["txn_id"] == "T1" and ex["index"] < ex["commit_requested_at"]


def test_dirty_read_without_commit_start_uses_txn_begin():
    h = clean_history()
    del h[pos(h, lambda e: isinstance(e, TxnCommitStart) and e.txn_id == "T1")]
    # a read between the (unrecorded) commit request and the TxnCommit completion is fine
    i = pos(h, lambda e: isinstance(e, TxnCommit) and e.txn_id == "T1")
    h.insert(i, Poll("c4", RC, [("t", 1, 0, "a2")]))
    assert check(h).valid
    # a read before the transaction even began is dirty
    h.insert(pos(h, lambda e: isinstance(e, TxnBegin) and e.txn_id == "T1"), Poll("c5", RC, [("t", 0, 3, "a1")]))
    ex = only(check(h), "dirty_read")
    assert ex["value"] == "a1" and ex["commit_requested_at"] is None


def test_dirty_read_of_never_committed_txn():
    h = clean_history()
    h[1:1] = [TxnBegin("p5", "T5"), SendOk("p5", "t", 1, "f1", 9, "T5"), Poll("c5", RC, [("t", 1, 9, "f1")])]
    ex = only(check(h), "dirty_read")
    assert ex["value"] == "f1" and ex["reason"] == "txn never requested commit"


def test_read_uncommitted_may_read_uncommitted():
    h = clean_history()
    h[1:1] = [TxnBegin("p5", "T5"), SendOk("p5", "t", 1, "f1", 9, "T5"), Poll("c5", RU, [("t", 1, 9, "f1")])]
    assert check(h).valid


def test_poll_nonmonotonic():
    h = clean_history()
    h.insert(pos(h, lambda e: isinstance(e, Rebalance)), Poll("c1", RC, [("t", 0, 7, "c1")]))  # 11 -> 7
    ex = only(check(h), "poll_nonmonotonic")
    assert ex["consumer"] == "c1" and ex["prev_offset"] == 11 and ex["offset"] == 7


def test_poll_repeat_is_nonmonotonic_and_counted_once_per_rewind():
    h = [SendOk("p", "t", 0, f"x{i}", i) for i in range(5)]
    h += [Poll("c", RU, [("t", 0, i, f"x{i}") for i in range(5)]),
          Poll("c", RU, [("t", 0, i, f"x{i}") for i in range(2, 5)]),
          FinalRead("t", 0, RU, [(i, f"x{i}") for i in range(5)], 5)]
    r = check(h)
    ex = only(r, "poll_nonmonotonic")
    assert r.anomalies["poll_nonmonotonic"]["count"] == 1 and ex["prev_offset"] == 4 and ex["offset"] == 2


def test_seek_assign_rebalance_allow_moves():
    h = [SendOk("p", "t", 0, f"x{i}", i) for i in range(5)]
    h += [Poll("c", RU, [("t", 0, i, f"x{i}") for i in range(5)]),
          Seek("c", "t", 0, 1), Poll("c", RU, [("t", 0, 1, "x1")]),
          Assign("c", [("t", 0)]), Poll("c", RU, [("t", 0, 0, "x0")]),
          Rebalance("c"), Poll("c", RU, [("t", 0, 3, "x3")]),
          FinalRead("t", 0, RU, [(i, f"x{i}") for i in range(5)], 5)]
    assert check(h).valid
    # after a Seek to 1 the consumer must not return 0, nor jump to 3
    bad = h[:5] + [Seek("c", "t", 0, 1), Poll("c", RU, [("t", 0, 0, "x0")]), h[-1]]
    assert only(check(bad), "poll_nonmonotonic")["seek_offset"] == 1
    bad = h[:5] + [Seek("c", "t", 0, 1), Poll("c", RU, [("t", 0, 3, "x3")]), h[-1]]
    assert only(check(bad), "poll_skip")["skipped_offsets"] == [1, 2]


def test_poll_skip():
    h = clean_history()
    h.append(Poll("c6", RC, [("t", 0, 0, "v1")]))
    h.append(Poll("c6", RC, [("t", 0, 2, "v3")]))
    ex = only(check(h), "poll_skip")
    assert ex["consumer"] == "c6" and ex["prev_offset"] == 0 and ex["skipped_offsets"] == [1]


def test_inconsistent_offset():
    h = clean_history()
    h.append(Poll("c7", RC, [("t", 0, 1, "v2-other")]))
    ex = only(check(h), "inconsistent_offset")
    assert (ex["topic"], ex["partition"], ex["offset"]) == ("t", 0, 1)
    assert set(ex["values"]) == {"v2", "v2-other"}


def test_inconsistent_offset_against_ack():
    h = clean_history()
    i = pos(h, lambda e: isinstance(e, SendOk) and e.value == "v3")
    h[i] = SendOk("p1", "t", 0, "v3", 1)  # acked at offset 1, but offset 1 holds v2
    ex = only(check(h), "inconsistent_offset")
    assert ex["offset"] == 1


def test_partial_txn_visibility():
    h = clean_history()
    final(h, "t", 1, RC).records.remove((2, "c2"))  # T3 (unknown outcome): c1 visible, c2 not
    ex = only(check(h), "partial_txn_visibility")
    assert ex["txn_id"] == "T3" and ex["visible"] == ["c1"] and ex["missing"] == ["c2"]


def test_lost_offset_commit():
    h = clean_history()
    h.insert(pos(h, lambda e: isinstance(e, FinalRead)), SendOk("seed", "in", 0, "i4", 4))
    h.insert(pos(h, lambda e: isinstance(e, FinalRead)), OffsetCommit("g", "copier", {("in", 0): 5}, None, True))
    final(h, "in", 0, RC).records.append((4, "i4"))
    ex = only(check(h), "lost_offset_commit")
    assert ex["input_value"] == "i4" and ex["committed_offset"] == 5 and ex["outputs"] == []


def test_offset_commit_of_aborted_txn_is_not_effective():
    h = clean_history()
    h.insert(pos(h, lambda e: isinstance(e, FinalRead)), SendOk("seed", "in", 0, "i4", 4))
    h.insert(pos(h, lambda e: isinstance(e, FinalRead)), OffsetCommit("g", "copier", {("in", 0): 5}, "X2", True))
    h.insert(pos(h, lambda e: isinstance(e, FinalRead)), OffsetCommit("g", "copier", {("in", 0): 5}, None, False))
    final(h, "in", 0, RC).records.append((4, "i4"))
    assert check(h).valid


def test_duplicate_offset_commit():
    h = clean_history()
    i = pos(h, lambda e: isinstance(e, OffsetCommit) and e.txn_id == "X1")
    h[i:i] = [SendOk("copier", "out", 0, "o0-dup", 9, "X1"), CopyOutput("i0", "o0-dup", "X1")]
    final(h, "out", 0, RC).records.append((9, "o0-dup"))
    final(h, "out", 0, RU).records.append((9, "o0-dup"))
    ex = only(check(h), "duplicate_offset_commit")
    assert ex["input_value"] == "i0" and ex["outputs"] == ["o0", "o0-dup"]


def test_examples_are_capped_at_ten():
    h = [SendOk("p", "t", 0, f"x{i}", i) for i in range(50)]
    h.append(FinalRead("t", 0, RC, [], 50))
    r = check(h)
    assert r.anomalies["lost_write"]["count"] == 50 and len(r.anomalies["lost_write"]["examples"]) == 10


# ------------------------------------------------------------------------------------- recording

def test_history_json_round_trip(tmp_path):
    hist = History()
    for e in clean_history():
        hist.record(e)
    assert [e.index for e in hist.events] == list(range(len(hist)))
    text = hist.dumps()
    back = History.loads(text)
    assert back.to_dicts() == hist.to_dicts()
    assert [type(e) for e in back.events] == [type(e) for e in hist.events]
    oc = next(e for e in back.events if isinstance(e, OffsetCommit))
    assert oc.offsets == {("in", 0): 2}
    poll = next(e for e in back.events if isinstance(e, Poll))
    assert poll.records[0] == ("t", 0, 0, "v1")
    path = tmp_path / "h.jsonl"
    hist.save(str(path))
    again = History.load(str(path))
    assert again.to_dicts() == hist.to_dicts()
    assert check(again).to_dict() == check(hist).to_dict()
    # dict form also accepted by check
    assert check(hist.to_dicts()).valid
    for e in clean_history():
        assert event_from_dict(json.loads(json.dumps(e.to_dict()))).to_dict() == e.to_dict()


def test_unknown_event_type_rejected():
    with pytest.raises(ValueError):
        event_from_dict({"type": "Nope"})


def test_history_record_is_thread_safe():
    hist = History()
    n_threads, per = 8, 2000

    def work(t):
        for i in range(per):
            hist.record(SendOk(f"p{t}", "t", t, f"w{t}-{i}", i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    evs = hist.events
    assert len(evs) == n_threads * per
    assert [e.index for e in evs] == list(range(n_threads * per))
    times = [e.time for e in evs]
    assert times == sorted(times) and times[0] > 0
    # per-thread order preserved
    for t in range(n_threads):
        assert [e.offset for e in evs if e.producer == f"p{t}"] == list(range(per))


def test_large_history_is_fast():
    n = 200_000
    h = []
    for i in range(n):
        h.append(SendOk("p", "t", i % 4, f"x{i}", i // 4))
    for part in range(4):
        recs = [("t", part, o, f"x{o * 4 + part}") for o in range(n // 4)]
        for j in range(0, len(recs), 500):
            h.append(Poll("c", RC, recs[j:j + 500]))
        h.append(FinalRead("t", part, RC, [(o, v) for _, _, o, v in recs], n // 4))
    t0 = time.perf_counter()
    r = check(h)
    elapsed = time.perf_counter() - t0
    assert r.valid, r.format_table()
    assert elapsed < 30, elapsed

"""Property tests: histories generated from a correct broker model never produce anomaly reports."""
from __future__ import annotations

import bisect

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_broker.verification import (
    Assign, FinalRead, Poll, Rebalance, Seek, SendFail, SendOk, SendUnknown, TxnAbort, TxnBegin, TxnCommit,
    TxnCommitStart, check,
)

RC, RU = "read_committed", "read_uncommitted"

# one log entry: ("plain", outcome) or ("txn", n_values, outcome)
plain = st.tuples(st.just("plain"), st.sampled_from(["ok", "unknown_written", "unknown_lost", "fail"]))
txn = st.tuples(st.just("txn"), st.integers(1, 3),
                st.sampled_from(["commit", "abort", "commit_fail", "unknown_committed", "unknown_aborted"]))
consumer_op = st.one_of(
    st.tuples(st.just("poll"), st.integers(1, 6)),
    st.tuples(st.just("seek"), st.integers(0, 40)),
    st.tuples(st.just("rebalance"), st.integers(0, 40)),
)


def build(entries, consumers):
    h, offset = [], 0
    rc_log, ru_log = [], []  # (offset, value) visible to each isolation level
    for n, e in enumerate(entries):
        if e[0] == "plain":
            v = f"p{n}"
            if e[1] == "ok":
                h.append(SendOk("prod", "t", 0, v, offset))
            elif e[1] == "fail":
                h.append(SendFail("prod", "t", 0, v, "InvalidRecord"))
                continue
            else:
                h.append(SendUnknown("prod", "t", 0, v, "timeout"))
                if e[1] == "unknown_lost":
                    continue
            rc_log.append((offset, v))
            ru_log.append((offset, v))
            offset += 1
        else:
            _, k, outcome = e
            tid = f"T{n}"
            h.append(TxnBegin("tp", tid))
            vals = []
            for j in range(k):
                v = f"t{n}-{j}"
                h.append(SendOk("tp", "t", 0, v, offset, tid))
                vals.append((offset, v))
                ru_log.append((offset, v))
                offset += 1
            visible = outcome in ("commit", "unknown_committed")
            if outcome == "abort":
                h.append(TxnAbort("tp", tid, True))
            else:
                h.append(TxnCommitStart("tp", tid))
                h.append(TxnCommit("tp", tid, {"commit": True, "commit_fail": False}.get(outcome)))
            if visible:
                rc_log.extend(vals)
            offset += 1  # control record
    for c, (iso, ops) in enumerate(consumers):
        name = f"c{c}"
        log = rc_log if iso == RC else ru_log
        offs = [o for o, _ in log]
        pos = 0  # index into log
        h.append(Assign(name, [("t", 0)]))
        for op, arg in ops:
            if op == "poll":
                recs = [("t", 0, o, v) for o, v in log[pos:pos + arg]]
                pos += len(recs)
                if recs:
                    h.append(Poll(name, iso, recs))
            else:
                h.append(Seek(name, "t", 0, arg) if op == "seek" else Rebalance(name))
                pos = bisect.bisect_left(offs, arg)
    h.append(FinalRead("t", 0, RC, rc_log, offset))
    h.append(FinalRead("t", 0, RU, ru_log, offset))
    return h


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(plain, txn), max_size=25),
       st.lists(st.tuples(st.sampled_from([RC, RU]), st.lists(consumer_op, max_size=12)), max_size=3))
def test_correct_histories_are_valid(entries, consumers):
    h = build(entries, consumers)
    r = check(h)
    assert r.valid, r.format_table()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(plain, txn), min_size=3, max_size=25), st.data())
def test_dropping_a_polled_record_is_a_skip(entries, data):
    # a read_committed consumer reading everything, minus one visible record in the middle -> poll_skip
    h = build(entries, [(RC, [("poll", 100)])])
    poll = next((e for e in h if isinstance(e, Poll)), None)
    if poll is None or len(poll.records) < 3:
        return
    i = data.draw(st.integers(1, len(poll.records) - 2))
    del poll.records[i]
    d = check(h).to_dict()["anomalies"]
    assert d["poll_skip"]["count"] == 1
    assert {k for k, v in d.items() if v["count"]} == {"poll_skip"}

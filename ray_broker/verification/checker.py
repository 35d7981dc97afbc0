"""Checker for broker histories (see `history.py` for the event vocabulary). Pure Python, no Ray.

`check(history) -> Report`. It works the way Jepsen's Kafka checker does (kafka-eos.md 6.1.2) plus
the assertions of Kafka's transactional-copier system test (6.4). Two passes, each linear in the
history: pass 1 indexes sends, transactions, final reads and offset commits; pass 2 checks every
read against them.

Transaction status. Each txn_id gets a status, taking the strongest evidence first:
  committed  TxnCommit ok=True
  aborted    TxnAbort ok=True, or TxnCommit ok=False, or TxnAbort with any outcome when no commit
             was ever requested (such a transaction can only end by aborting)
  unknown    TxnCommit ok=None or a TxnCommitStart with no outcome. Resolved all-or-nothing by the
             read_committed FinalReads: if any of its values is visible it is "committed", else
             "aborted" (when at least one of its partitions has an RC FinalRead), else it stays
             unresolved
  open       no commit/abort events at all (e.g. the producer crashed). It can never commit.

Anomaly classes (counts are of distinct instances: values, offsets, transactions, or poll steps):
  lost_write         an acknowledged value (a SendOk without a txn, or a SendOk/SendUnknown of a
                     txn whose TxnCommit returned ok=True) that is in no FinalRead and no
                     read_committed Poll. Only values whose partition (or topic, when the partition
                     is unknown) has a FinalRead are judged.
  duplicate          a value read (Poll or FinalRead) at two or more distinct (topic, partition, offset).
  aborted_read       a read_committed Poll/FinalRead returning a value of an aborted transaction
                     (definitely, or resolved by the final read), or any read returning a value whose
                     send definitely failed (SendFail).
  dirty_read         a read_committed Poll returning a transactional value before its commit was
                     requested (poll index < the txn's first TxnCommitStart index), or any
                     read_committed read of a value of an "open" txn (commit never requested).
                     Workloads should record TxnCommitStart just before calling commit: TxnCommit is
                     recorded when the call returns, and the commit can be visible before that. Without
                     a TxnCommitStart the only safe bound is the txn's TxnBegin.
  poll_nonmonotonic  per consumer and partition, an offset <= the previous polled offset (or below
                     the Seek target) with no Seek/Assign/Rebalance of that consumer in between.
  poll_skip          per consumer and partition, a jump from offset a to b > a+1 (or from a Seek to
                     X over [X, b)) passing an offset that a FinalRead of the same isolation shows as
                     holding a record. Gaps with no record there (control records, aborted data
                     under read_committed) are normal and never reported.
  inconsistent_offset  one (topic, partition, offset) with different values across Polls, FinalReads
                     and SendOk acknowledgements.
  partial_txn_visibility  a transaction some of whose written values (SendOk/SendUnknown, in
                     partitions with a read_committed FinalRead) are visible there and some not.
  lost_offset_commit  copier: an input record below an effective committed offset (OffsetCommit
                     ok=True without txn, or in a committed txn) none of whose outputs is visible in
                     the read_committed FinalRead of the output topic.
  duplicate_offset_commit  copier: an input value with two or more distinct outputs visible there.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable

from .history import (
    READ_COMMITTED, Assign, CopyOutput, Event, Fault, FinalRead, History, OffsetCommit, Poll, Rebalance,
    Seek, SendFail, SendOk, SendUnknown, TxnAbort, TxnBegin, TxnCommit, TxnCommitStart, event_from_dict,
)

ANOMALIES = (
    "lost_write", "duplicate", "aborted_read", "dirty_read", "poll_nonmonotonic", "poll_skip",
    "inconsistent_offset", "partial_txn_visibility", "lost_offset_commit", "duplicate_offset_commit",
)

_OK, _UNKNOWN, _FAIL = "ok", "unknown", "fail"
_SEND_RANK = {_FAIL: 0, _UNKNOWN: 1, _OK: 2}
_SHIFT = 40  # position code = tp_id << 40 | offset
_MASK = (1 << _SHIFT) - 1


class _Anomaly:
    __slots__ = ("count", "examples", "limit")

    def __init__(self, limit: int):
        self.count = 0
        self.examples: list[dict[str, Any]] = []
        self.limit = limit

    def add(self, example: dict[str, Any]) -> None:
        self.count += 1
        if len(self.examples) < self.limit:
            self.examples.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


@dataclass
class Report:
    operations: int
    faults: dict[str, int]
    anomalies: dict[str, dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return all(a["count"] == 0 for a in self.anomalies.values())

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "operations": self.operations, "faults": dict(self.faults),
                "anomalies": self.anomalies, "stats": dict(self.stats)}

    def format_table(self) -> str:
        lines = [f"history check: {'VALID' if self.valid else 'INVALID'}  "
                 f"({self.operations} operations, "
                 f"faults: {', '.join(f'{k}={v}' for k, v in sorted(self.faults.items())) or 'none'})"]
        width = max(len(n) for n in self.anomalies)
        lines.append(f"  {'anomaly'.ljust(width)}  count  first example")
        lines.append(f"  {'-' * width}  -----  -------------")
        for name, a in self.anomalies.items():
            ex = a["examples"][0] if a["examples"] else ""
            ex_s = str(ex)
            if len(ex_s) > 100:
                ex_s = ex_s[:97] + "..."
            lines.append(f"  {name.ljust(width)}  {a['count']:5d}  {ex_s}")
        if self.stats:
            lines.append("  stats: " + ", ".join(f"{k}={v}" for k, v in self.stats.items()))
        return "\n".join(lines)


class _Send:
    __slots__ = ("topic", "partition", "txn", "status", "offset", "index")

    def __init__(self, topic, partition, txn, status, offset, index):
        self.topic, self.partition, self.txn = topic, partition, txn
        self.status, self.offset, self.index = status, offset, index


class _Txn:
    __slots__ = ("begin", "commit_start", "commit_req", "commit_ok", "abort_ok", "values", "status", "resolved")

    def __init__(self):
        self.begin: int | None = None
        self.commit_start: int | None = None     # first TxnCommitStart index
        self.commit_req = False                  # any TxnCommitStart / TxnCommit seen
        self.commit_ok: set = set()              # outcomes of TxnCommit events
        self.abort_ok: set = set()               # outcomes of TxnAbort events
        self.values: list = []                   # values sent in this txn (any outcome)
        self.status = "open"
        self.resolved = False                    # status came from the final read


def _events(history: History | Iterable[Event] | Iterable[dict]) -> list[Event]:
    evs = history.events if isinstance(history, History) else list(history)
    return [event_from_dict(e) if isinstance(e, dict) else e for e in evs]


def check(history: History | Iterable[Event] | Iterable[dict], max_examples: int = 10) -> Report:
    events = _events(history)
    A = {name: _Anomaly(max_examples) for name in ANOMALIES}

    def idx_of(i: int, ev: Event) -> int:
        return ev.index if ev.index >= 0 else i

    # ---------------------------------------------------------------- pass 1: index everything
    sends: dict[Any, _Send] = {}
    txns: dict[str, _Txn] = {}
    faults: dict[str, int] = {}
    operations = 0
    tp_ids: dict[tuple, int] = {}
    tp_list: list[tuple] = []
    final_offsets: dict[tuple, set] = {}          # (topic, partition, iso) -> offsets holding a record
    final_rc_values: set = set()                  # values visible in read_committed final reads
    final_any_values: set = set()
    final_rc_tps: set = set()
    final_rc_topics: set = set()
    final_tps: set = set()
    final_topics: set = set()
    offset_commits: list[tuple[int, OffsetCommit]] = []
    copies: dict[Any, list] = {}                  # input value -> [(output value, txn_id)]

    def txn(tid: str) -> _Txn:
        t = txns.get(tid)
        if t is None:
            t = txns[tid] = _Txn()
        return t

    for i, ev in enumerate(events):
        if isinstance(ev, Fault):
            if ev.phase != "end":
                faults[ev.kind] = faults.get(ev.kind, 0) + 1
            continue
        operations += 1
        if isinstance(ev, (SendOk, SendFail, SendUnknown)):
            status = _OK if isinstance(ev, SendOk) else _FAIL if isinstance(ev, SendFail) else _UNKNOWN
            prev = sends.get(ev.value)
            if prev is None or _SEND_RANK[status] > _SEND_RANK[prev.status]:
                sends[ev.value] = _Send(ev.topic, ev.partition, ev.txn_id, status,
                                        ev.offset if status == _OK else None, idx_of(i, ev))
            if ev.txn_id is not None and prev is None:
                txn(ev.txn_id).values.append(ev.value)
        elif isinstance(ev, TxnBegin):
            t = txn(ev.txn_id)
            if t.begin is None:
                t.begin = idx_of(i, ev)
        elif isinstance(ev, (TxnCommitStart, TxnCommit)):
            t = txn(ev.txn_id)
            t.commit_req = True
            if isinstance(ev, TxnCommit):
                t.commit_ok.add(ev.ok)
            else:
                k = idx_of(i, ev)
                if t.commit_start is None or k < t.commit_start:
                    t.commit_start = k
        elif isinstance(ev, TxnAbort):
            txn(ev.txn_id).abort_ok.add(ev.ok)
        elif isinstance(ev, FinalRead):
            key = (ev.topic, ev.partition, ev.isolation_level)
            offs = final_offsets.setdefault(key, set())
            rc = ev.isolation_level == READ_COMMITTED
            final_tps.add((ev.topic, ev.partition))
            final_topics.add(ev.topic)
            if rc:
                final_rc_tps.add((ev.topic, ev.partition))
                final_rc_topics.add(ev.topic)
            for off, val in ev.records:
                offs.add(off)
                final_any_values.add(val)
                if rc:
                    final_rc_values.add(val)
        elif isinstance(ev, OffsetCommit):
            offset_commits.append((idx_of(i, ev), ev))
        elif isinstance(ev, CopyOutput):
            copies.setdefault(ev.input_value, []).append((ev.output_value, ev.txn_id))

    final_sorted = {k: sorted(v) for k, v in final_offsets.items()}
    del final_offsets

    def rc_judgeable(topic, partition) -> bool:
        return (topic, partition) in final_rc_tps if partition is not None else topic in final_rc_topics

    # transaction status (see module docstring)
    resolved_counts = {"committed": 0, "aborted": 0, "unresolved": 0}
    for tid, t in txns.items():
        if True in t.commit_ok:
            t.status = "committed"
        elif True in t.abort_ok or False in t.commit_ok:
            t.status = "aborted"
        elif t.commit_req:
            t.status = "unknown"
        elif t.abort_ok:
            t.status = "aborted"
        else:
            t.status = "open"
        if t.status == "unknown":
            written = [v for v in t.values if sends[v].status != _FAIL]
            if any(v in final_rc_values for v in written):
                t.status, t.resolved = "committed", True
                resolved_counts["committed"] += 1
            elif any(rc_judgeable(sends[v].topic, sends[v].partition) for v in written):
                t.status, t.resolved = "aborted", True
                resolved_counts["aborted"] += 1
            else:
                resolved_counts["unresolved"] += 1

    # ---------------------------------------------------------------- pass 2: check the reads
    by_tp: dict[int, dict[int, Any]] = {}        # tp_id -> {offset: first value seen there}
    conflicts: dict[tuple, dict] = {}             # (topic, partition, offset) -> {value: first reader}
    value_pos: dict[Any, int] = {}                # value -> first read position code
    dup_pos: dict[Any, dict] = {}                 # value -> {position code: first reader}
    rc_poll_values: set = set()
    reported_aborted: set = set()
    reported_dirty: set = set()
    # consumer position tracking: (consumer, tp_id) -> (last offset, seek target or None)
    last_pos: dict[tuple, tuple] = {}
    consumer_tps: dict[str, set] = {}

    def tp_id(topic, partition) -> int:
        key = (topic, partition)
        t = tp_ids.get(key)
        if t is None:
            t = tp_ids[key] = len(tp_list)
            tp_list.append(key)
            by_tp[t] = {}
        return t

    def note_offset(tid: int, offset: int, value, reader: str, k: int) -> None:
        slot = by_tp[tid]
        have = slot.get(offset, _MISSING)
        if have is _MISSING:
            slot[offset] = value
        elif have != value:
            topic, partition = tp_list[tid]
            key = (topic, partition, offset)
            c = conflicts.get(key)
            if c is None:
                conflicts[key] = {have: None, value: f"{reader}@{k}"}
            elif value not in c:
                c[value] = f"{reader}@{k}"

    def note_read(tid: int, offset: int, value, reader: str, k: int) -> None:
        note_offset(tid, offset, value, reader, k)
        code = (tid << _SHIFT) | offset
        have = value_pos.get(value)
        if have is None:
            value_pos[value] = code
        elif have != code:
            d = dup_pos.get(value)
            if d is None:
                dup_pos[value] = {have: None, code: f"{reader}@{k}"}
            elif code not in d:
                d[code] = f"{reader}@{k}"

    def visibility(value, topic, partition, offset, rc: bool, reader: str, k: int, is_poll: bool) -> None:
        s = sends.get(value)
        if s is None:
            return
        if s.status == _FAIL:
            if value not in reported_aborted:
                reported_aborted.add(value)
                A["aborted_read"].add({"value": value, "topic": topic, "partition": partition, "offset": offset,
                                       "reader": reader, "index": k, "reason": "send definitely failed",
                                       "txn_id": s.txn})
            return
        if not rc or s.txn is None:
            return
        t = txns[s.txn]
        if t.status == "aborted":
            if value not in reported_aborted:
                reported_aborted.add(value)
                A["aborted_read"].add({"value": value, "topic": topic, "partition": partition, "offset": offset,
                                       "reader": reader, "index": k, "txn_id": s.txn,
                                       "reason": "txn outcome unknown, final read shows it aborted"
                                       if t.resolved else "txn aborted"})
        elif t.status == "open":
            if value not in reported_dirty:
                reported_dirty.add(value)
                A["dirty_read"].add({"value": value, "topic": topic, "partition": partition, "offset": offset,
                                     "reader": reader, "index": k, "txn_id": s.txn,
                                     "reason": "txn never requested commit"})
        elif is_poll:
            bound = t.commit_start if t.commit_start is not None else t.begin
            if bound is not None and k < bound and value not in reported_dirty:
                reported_dirty.add(value)
                A["dirty_read"].add({"value": value, "topic": topic, "partition": partition, "offset": offset,
                                     "reader": reader, "index": k, "txn_id": s.txn,
                                     "commit_requested_at": t.commit_start, "txn_began_at": t.begin,
                                     "reason": "read before the commit was requested" if t.commit_start is not None
                                     else "read before the txn began (no TxnCommitStart recorded)"})

    def reset_consumer(consumer: str) -> None:
        for tid in consumer_tps.pop(consumer, ()):
            last_pos.pop((consumer, tid), None)

    def skipped(topic, partition, iso, lo: int, hi: int) -> list[int]:
        """Offsets in [lo, hi) that a FinalRead of `iso` (or a stricter one) shows holding a record."""
        offs = final_sorted.get((topic, partition, iso))
        if offs is None and iso != READ_COMMITTED:
            offs = final_sorted.get((topic, partition, READ_COMMITTED))  # RC-visible => RU-visible
        if not offs:
            return []
        a = bisect.bisect_left(offs, lo)
        b = bisect.bisect_left(offs, hi)
        return offs[a:min(b, a + 5)] if b > a else []

    for i, ev in enumerate(events):
        k = idx_of(i, ev)
        if isinstance(ev, Poll):
            rc = ev.isolation_level == READ_COMMITTED
            c = ev.consumer
            for topic, partition, offset, value in ev.records:
                tid = tp_id(topic, partition)
                note_read(tid, offset, value, c, k)
                if rc:
                    rc_poll_values.add(value)
                visibility(value, topic, partition, offset, rc, c, k, True)
                key = (c, tid)
                prev = last_pos.get(key)
                if prev is not None:
                    last, seek_to = prev
                    if last is None:  # first record after a Seek to seek_to
                        if offset < seek_to:
                            A["poll_nonmonotonic"].add({
                                "consumer": c, "topic": topic, "partition": partition, "seek_offset": seek_to,
                                "offset": offset, "index": k, "reason": "returned an offset below the Seek"})
                        elif offset > seek_to:
                            sk = skipped(topic, partition, ev.isolation_level, seek_to, offset)
                            if sk:
                                A["poll_skip"].add({
                                    "consumer": c, "topic": topic, "partition": partition, "from_seek": seek_to,
                                    "to_offset": offset, "skipped_offsets": sk, "index": k})
                    elif offset <= last:
                        A["poll_nonmonotonic"].add({
                            "consumer": c, "topic": topic, "partition": partition, "prev_offset": last,
                            "offset": offset, "index": k})
                    elif offset > last + 1:
                        sk = skipped(topic, partition, ev.isolation_level, last + 1, offset)
                        if sk:
                            A["poll_skip"].add({
                                "consumer": c, "topic": topic, "partition": partition, "prev_offset": last,
                                "offset": offset, "skipped_offsets": sk, "index": k})
                else:
                    consumer_tps.setdefault(c, set()).add(tid)
                last_pos[key] = (offset, None)  # compare consecutive reads: one rewind = one report
        elif isinstance(ev, FinalRead):
            tid = tp_id(ev.topic, ev.partition)
            rc = ev.isolation_level == READ_COMMITTED
            reader = f"final-read[{ev.isolation_level}]"
            for offset, value in ev.records:
                note_read(tid, offset, value, reader, k)
                visibility(value, ev.topic, ev.partition, offset, rc, reader, k, False)
        elif isinstance(ev, SendOk):
            note_offset(tp_id(ev.topic, ev.partition), ev.offset, ev.value, f"ack:{ev.producer}", k)
        elif isinstance(ev, Seek):
            tid = tp_id(ev.topic, ev.partition)
            if ev.offset is None:
                last_pos.pop((ev.consumer, tid), None)
            else:
                last_pos[(ev.consumer, tid)] = (None, ev.offset)
                consumer_tps.setdefault(ev.consumer, set()).add(tid)
        elif isinstance(ev, (Assign, Rebalance)):
            reset_consumer(ev.consumer)

    # inconsistent offsets
    for (topic, partition, offset), vals in conflicts.items():
        A["inconsistent_offset"].add({"topic": topic, "partition": partition, "offset": offset,
                                      "values": list(vals)[:5],
                                      "readers": [r for r in vals.values() if r][:5]})
    # duplicates
    for value, codes in dup_pos.items():
        A["duplicate"].add({"value": value, "positions": [
            (*tp_list[code >> _SHIFT], code & _MASK) for code in list(codes)[:5]]})

    # lost writes
    unjudged = 0
    for value, s in sends.items():
        if s.status == _FAIL:
            continue
        if s.txn is None:
            acked = s.status == _OK
        else:
            acked = txns[s.txn].status == "committed" and not txns[s.txn].resolved
        if not acked:
            continue
        if s.partition is not None:
            judgeable = (s.topic, s.partition) in final_tps
        else:
            judgeable = s.topic in final_topics
        if not judgeable:
            unjudged += 1
            continue
        if value not in final_any_values and value not in rc_poll_values:
            A["lost_write"].add({"value": value, "topic": s.topic, "partition": s.partition,
                                 "ack_offset": s.offset, "txn_id": s.txn, "send_index": s.index,
                                 "send_status": s.status})

    # partial transaction visibility
    for tid, t in txns.items():
        expected = [v for v in t.values
                    if sends[v].status != _FAIL and rc_judgeable(sends[v].topic, sends[v].partition)]
        if len(expected) < 2:
            continue
        visible = [v for v in expected if v in final_rc_values]
        if 0 < len(visible) < len(expected):
            missing = [v for v in expected if v not in final_rc_values]
            A["partial_txn_visibility"].add({"txn_id": tid, "status": t.status, "visible": visible[:5],
                                             "missing": missing[:5], "n_visible": len(visible),
                                             "n_expected": len(expected)})

    # copier: offset commits vs outputs
    copier_stats = _check_copier(offset_commits, copies, txns, sends, final_rc_values, final_rc_topics,
                                 by_tp, tp_ids, A)

    stats = {"events": len(events), "values_sent": len(sends), "transactions": len(txns),
             "unknown_txns_resolved_committed": resolved_counts["committed"],
             "unknown_txns_resolved_aborted": resolved_counts["aborted"],
             "unknown_txns_unresolved": resolved_counts["unresolved"],
             "acked_values_unjudged": unjudged, **copier_stats}
    return Report(operations=operations, faults=faults,
                  anomalies={name: A[name].to_dict() for name in ANOMALIES}, stats=stats)


_MISSING = object()


def _check_copier(offset_commits, copies, txns, sends, final_rc_values, final_rc_topics, by_tp, tp_ids,
                  A) -> dict[str, Any]:
    if not offset_commits and not copies:
        return {}
    # effective committed position per input partition: max next_offset over commits that took effect
    committed: dict[tuple, int] = {}
    for _, oc in offset_commits:
        if oc.txn_id is None:
            effective = oc.ok is True
        else:
            t = txns.get(oc.txn_id)
            effective = t is not None and t.status == "committed"
        if not effective:
            continue
        for tp, nxt in oc.offsets.items():
            tp = tuple(tp)
            if nxt > committed.get(tp, -1):
                committed[tp] = nxt

    # output topics: where the copier's outputs were sent
    output_topics = {sends[o].topic for outs in copies.values() for o, _ in outs if o in sends}
    checkable = bool(output_topics) and output_topics <= final_rc_topics

    n_committed_inputs = 0
    if checkable:
        for tp, nxt in committed.items():
            tid = tp_ids.get(tp)
            if tid is None:
                continue
            for offset, value in by_tp[tid].items():
                if offset >= nxt:
                    continue
                s = sends.get(value)
                if s is not None and (s.status == _FAIL or (s.txn is not None and txns[s.txn].status != "committed")):
                    continue  # not a committed input record; a read_committed copier never sees it
                n_committed_inputs += 1
                outs = copies.get(value, ())
                if not any(o in final_rc_values for o, _ in outs):
                    A["lost_offset_commit"].add({"input_value": value, "topic": tp[0], "partition": tp[1],
                                                 "offset": offset, "committed_offset": nxt,
                                                 "outputs": [o for o, _ in outs][:5]})

    for value, outs in copies.items():
        visible = []
        for o, tid in outs:
            if o in final_rc_values and o not in visible:
                visible.append(o)
        if len(visible) >= 2:
            A["duplicate_offset_commit"].add({"input_value": value, "outputs": visible[:5],
                                              "txn_ids": [t for o, t in outs if o in visible][:5]})
    return {"copier_committed_inputs": n_committed_inputs, "copier_checkable": checkable}


def main(argv: list[str] | None = None) -> int:
    """python -m ray_broker.verification HISTORY.jsonl [--json]: check a saved history (exit 1 if invalid)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("history")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    report = check(History.load(args.history))
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.format_table())
    return 0 if report.valid else 1


if __name__ == "__main__":
    raise SystemExit(main())

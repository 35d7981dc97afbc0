"""Operation histories for Jepsen-style verification of the broker (pure Python, no Ray import).

A workload records what its clients did and saw as a list of events; `checker.check` then looks for
anomalies. Values are unique strings made by the workload (e.g. "w3-17"); every event is a small
dataclass that round-trips through JSON (`to_dict` / `event_from_dict`).

Event vocabulary (positional fields in this order; `index` and `time` are keyword-only and are
filled in by `History.record`):

  SendOk(producer, topic, partition, value, offset, txn_id=None)       the send was acknowledged
  SendFail(producer, topic, partition, value, error="", txn_id=None)   definitely NOT written
  SendUnknown(producer, topic, partition, value, error="", txn_id=None) outcome unknown (timeouts,
                                                   NOT_LEADER after the request left, crashes ...)
  TxnBegin(producer, txn_id)
  TxnCommitStart(producer, txn_id)   recorded just before calling commit: "commit requested". A
                                     read_committed read of the txn's data before this is dirty.
  TxnCommit(producer, txn_id, ok)    ok: True committed / False definitely failed (aborted) /
                                     None unknown outcome (resolved all-or-nothing by the final read)
  TxnAbort(producer, txn_id, ok)
  Poll(consumer, isolation_level, records=[(topic, partition, offset, value), ...])
  Seek(consumer, topic, partition, offset)      offset None = beginning/end/unknown
  Assign(consumer, partitions=[(topic, partition), ...])
  Rebalance(consumer)                           positions may move after Seek/Assign/Rebalance
  FinalRead(topic, partition, isolation_level, records=[(offset, value), ...], end_offset)
                                     complete read of a partition after the run: the ground truth
  OffsetCommit(group, consumer, offsets={(topic, partition): next_offset}, txn_id=None, ok=True)
  CopyOutput(input_value, output_value, txn_id)  copier: output written for an input record
  Fault(kind, target, phase)                     nemesis; phase "start" or "end"

`txn_id` names one transaction (unique in the history, e.g. "p2-t41"), not the producer's
transactional.id. Isolation levels are "read_committed" / "read_uncommitted".
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Iterator

READ_COMMITTED = "read_committed"
READ_UNCOMMITTED = "read_uncommitted"


@dataclass
class Event:
    """Base class: `index` (position in the history, -1 = not recorded) and wall-clock `time`."""
    index: int = field(default=-1, kw_only=True)
    time: float = field(default=0.0, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            d[f.name] = getattr(self, f.name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Event":
        kwargs = {k: v for k, v in d.items() if k != "type"}
        return cls(**kwargs)


# --- producer side -------------------------------------------------------------------------------

@dataclass
class SendOk(Event):
    producer: str
    topic: str
    partition: int
    value: str
    offset: int
    txn_id: str | None = None


@dataclass
class SendFail(Event):
    producer: str
    topic: str
    partition: int | None
    value: str
    error: str = ""
    txn_id: str | None = None


@dataclass
class SendUnknown(Event):
    producer: str
    topic: str
    partition: int | None
    value: str
    error: str = ""
    txn_id: str | None = None


@dataclass
class TxnBegin(Event):
    producer: str
    txn_id: str


@dataclass
class TxnCommitStart(Event):
    producer: str
    txn_id: str


@dataclass
class TxnCommit(Event):
    producer: str
    txn_id: str
    ok: bool | None


@dataclass
class TxnAbort(Event):
    producer: str
    txn_id: str
    ok: bool | None


# --- consumer side -------------------------------------------------------------------------------

@dataclass
class Poll(Event):
    consumer: str
    isolation_level: str
    records: list = field(default_factory=list)  # [(topic, partition, offset, value)]

    def __post_init__(self):
        self.records = [tuple(r) for r in self.records]


@dataclass
class Seek(Event):
    consumer: str
    topic: str
    partition: int
    offset: int | None


@dataclass
class Assign(Event):
    consumer: str
    partitions: list = field(default_factory=list)  # [(topic, partition)]

    def __post_init__(self):
        self.partitions = [tuple(p) for p in self.partitions]


@dataclass
class Rebalance(Event):
    consumer: str


@dataclass
class FinalRead(Event):
    topic: str
    partition: int
    isolation_level: str
    records: list = field(default_factory=list)  # [(offset, value)]
    end_offset: int | None = None

    def __post_init__(self):
        self.records = [tuple(r) for r in self.records]


# --- offsets / copier ----------------------------------------------------------------------------

@dataclass
class OffsetCommit(Event):
    group: str
    consumer: str
    offsets: dict = field(default_factory=dict)  # {(topic, partition): next_offset}
    txn_id: str | None = None
    ok: bool | None = True

    def __post_init__(self):
        if isinstance(self.offsets, list):  # JSON form: [[topic, partition, next_offset], ...]
            self.offsets = {(t, p): o for t, p, o in self.offsets}

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["offsets"] = [[t, p, o] for (t, p), o in self.offsets.items()]
        return d


@dataclass
class CopyOutput(Event):
    input_value: str
    output_value: str
    txn_id: str | None = None


# --- nemesis -------------------------------------------------------------------------------------

@dataclass
class Fault(Event):
    kind: str
    target: str
    phase: str = "start"  # "start" | "end"


EVENT_TYPES: dict[str, type[Event]] = {c.__name__: c for c in (
    SendOk, SendFail, SendUnknown, TxnBegin, TxnCommitStart, TxnCommit, TxnAbort, Poll, Seek, Assign,
    Rebalance, FinalRead, OffsetCommit, CopyOutput, Fault)}


def event_from_dict(d: dict[str, Any]) -> Event:
    try:
        cls = EVENT_TYPES[d["type"]]
    except KeyError:
        raise ValueError(f"unknown history event type {d.get('type')!r}") from None
    return cls.from_dict(d)


class History:
    """Thread-safe, append-only event recorder.

    `record(event)` stamps the event with the next index (0, 1, 2, ...) and wall-clock time under a
    lock, so list order == index order == a linearisation of what the threads recorded.
    """

    def __init__(self, events: Iterable[Event] = ()):
        self._lock = threading.Lock()
        self._events: list[Event] = []
        for e in events:
            self.record(e, stamp_time=e.time == 0.0)

    def record(self, event: Event, stamp_time: bool = True) -> Event:
        with self._lock:
            event.index = len(self._events)
            if stamp_time:
                event.time = time.time()
            self._events.append(event)
        return event

    @property
    def events(self) -> list[Event]:
        """A snapshot of the events recorded so far."""
        with self._lock:
            return list(self._events)

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    # --- serialisation: JSON lines, one event per line --------------------------------------------
    def to_dicts(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.events]

    @classmethod
    def from_dicts(cls, dicts: Iterable[dict[str, Any]]) -> "History":
        h = cls()
        h._events = [event_from_dict(d) for d in dicts]
        return h

    def dumps(self) -> str:
        return "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in self.to_dicts())

    @classmethod
    def loads(cls, text: str) -> "History":
        return cls.from_dicts(json.loads(line) for line in text.splitlines() if line.strip())

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            for e in self.events:
                f.write(json.dumps(e.to_dict(), separators=(",", ":")))
                f.write("\n")

    @classmethod
    def load(cls, path: str) -> "History":
        with open(path) as f:
            return cls.from_dicts(json.loads(line) for line in f if line.strip())

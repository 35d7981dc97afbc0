"""Jepsen-style verification: record a workload's history (`history`), then `check` it (`checker`).

Pure Python (no Ray import), so histories can be checked offline:
    python -m ray_broker.verification history.jsonl [--json]
"""
from .checker import ANOMALIES, Report, check
from .history import (
    READ_COMMITTED, READ_UNCOMMITTED, Assign, CopyOutput, Event, Fault, FinalRead, History, OffsetCommit, Poll,
    Rebalance, Seek, SendFail, SendOk, SendUnknown, TxnAbort, TxnBegin, TxnCommit, TxnCommitStart,
    event_from_dict,
)

__all__ = [
    "ANOMALIES", "Report", "check", "READ_COMMITTED", "READ_UNCOMMITTED", "Assign", "CopyOutput", "Event",
    "Fault", "FinalRead", "History", "OffsetCommit", "Poll", "Rebalance", "Seek", "SendFail", "SendOk",
    "SendUnknown", "TxnAbort", "TxnBegin", "TxnCommit", "TxnCommitStart", "event_from_dict",
]

"""Per-partition idempotent-producer state: epochs, last sequences, the last 5 batches per producer.

Pure. The leader validates a batch before appending (`check_append`) and records it after
(`on_append`); followers and recovery feed every replicated batch header through `on_append` too,
so a replica promoted to leader recognises retries of batches written under the previous leader.
Snapshots (`{offset:020d}.snapshot`, written atomically with a CRC) make recovery replay only the
log's tail instead of the whole log.
"""
from __future__ import annotations

import glob
import json
import os
import time as _time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import InvalidProducerEpochError, OutOfOrderSequenceError, UnknownProducerIdError
from .files import atomic_write

BATCHES_TO_RETAIN = 5
SEQUENCE_WRAP = 2**31 - 1            # sequences count 0 .. 2^31-2 then wrap to 0, like Kafka's
SNAPSHOT_SUFFIX = ".snapshot"
SNAPSHOTS_KEPT = 2


def next_sequence(seq: int, count: int) -> int:
    return (seq + count) % SEQUENCE_WRAP


@dataclass(frozen=True)
class BatchRecord:
    first_seq: int
    last_seq: int
    first_offset: int
    last_offset: int


@dataclass
class ProducerEntry:
    producer_id: int
    producer_epoch: int
    batches: deque = field(default_factory=lambda: deque(maxlen=BATCHES_TO_RETAIN))
    last_timestamp_ms: int = 0
    current_txn_first_offset: int = -1   # first offset of the producer's open transaction, if any
    coordinator_epoch: int = -1
    last_marker_epoch: int = -1          # producer epoch of the last commit/abort marker written here

    @property
    def last_seq(self) -> int:
        return self.batches[-1].last_seq if self.batches else -1

    def find_duplicate(self, first_seq: int, last_seq: int) -> BatchRecord | None:
        for b in self.batches:
            if b.first_seq == first_seq and b.last_seq == last_seq:
                return b
        return None

    def to_json(self) -> dict:
        return {"pid": self.producer_id, "epoch": self.producer_epoch, "ts": self.last_timestamp_ms,
                "txn": self.current_txn_first_offset, "ce": self.coordinator_epoch, "me": self.last_marker_epoch,
                "batches": [[b.first_seq, b.last_seq, b.first_offset, b.last_offset] for b in self.batches]}

    @classmethod
    def from_json(cls, d: dict) -> "ProducerEntry":
        e = cls(d["pid"], d["epoch"], last_timestamp_ms=d["ts"], current_txn_first_offset=d.get("txn", -1),
                coordinator_epoch=d.get("ce", -1), last_marker_epoch=d.get("me", -1))
        for b in d["batches"]:
            e.batches.append(BatchRecord(*b))
        return e


@dataclass(frozen=True)
class Duplicate:
    """A retry of a batch already in the log: answer with its original offsets."""
    first_offset: int
    last_offset: int


class ProducerStateManager:
    def __init__(self) -> None:
        self.producers: dict[int, ProducerEntry] = {}
        # aborted transactions: producer id -> [(first_offset, marker_offset)], for read_committed
        self.aborted: dict[int, list[tuple[int, int]]] = {}
        self.duplicates_dropped = 0
        self.out_of_order_refused = 0
        self.fenced_refused = 0

    # ---- leader-side validation -----------------------------------------------------------------
    def expected_sequence(self, producer_id: int, producer_epoch: int) -> int | None:
        """The next base sequence the producer may send in this epoch (None if unknown/other epoch)."""
        e = self.producers.get(producer_id)
        if e is None or e.producer_epoch != producer_epoch or not e.batches:
            return None
        return next_sequence(e.last_seq, 1)

    def check_append(self, producer_id: int, producer_epoch: int, base_sequence: int,
                     record_count: int) -> Duplicate | None:
        """Validate an idempotent batch before it is appended.

        Returns a `Duplicate` for a retry of one of the last 5 batches, None when the batch may be
        appended, and raises for a fenced epoch or a sequence gap (nothing is appended then).
        """
        if producer_id < 0:
            return None
        last_seq = next_sequence(base_sequence, record_count - 1)
        e = self.producers.get(producer_id)
        if e is None:
            if base_sequence != 0:
                raise UnknownProducerIdError(
                    f"producer {producer_id} is unknown here (expired or never seen) and its batch starts at "
                    f"sequence {base_sequence}, not 0")
            return None
        if producer_epoch < e.producer_epoch:
            self.fenced_refused += 1
            raise InvalidProducerEpochError(
                f"producer {producer_id} epoch {producer_epoch} is older than the current epoch {e.producer_epoch}")
        if producer_epoch > e.producer_epoch:
            if base_sequence != 0:
                self.out_of_order_refused += 1
                raise OutOfOrderSequenceError(
                    f"producer {producer_id}: first batch of new epoch {producer_epoch} must start at sequence 0, "
                    f"got {base_sequence}")
            return None
        dup = e.find_duplicate(base_sequence, last_seq)
        if dup is not None:
            self.duplicates_dropped += 1
            return Duplicate(dup.first_offset, dup.last_offset)
        expected = next_sequence(e.last_seq, 1) if e.batches else 0
        if base_sequence != expected:
            self.out_of_order_refused += 1
            raise OutOfOrderSequenceError(
                f"producer {producer_id} epoch {producer_epoch}: expected sequence {expected}, got {base_sequence}")
        return None

    # ---- state updates (leader after append, followers, recovery) -------------------------------
    def on_append(self, producer_id: int, producer_epoch: int, base_sequence: int, record_count: int,
                  first_offset: int, timestamp_ms: int, is_transactional: bool = False) -> None:
        if producer_id < 0:
            return
        e = self.producers.get(producer_id)
        if e is None or producer_epoch > e.producer_epoch:
            txn = e.current_txn_first_offset if e is not None else -1
            e = ProducerEntry(producer_id, producer_epoch, current_txn_first_offset=txn)
            self.producers[producer_id] = e
        elif producer_epoch < e.producer_epoch:
            return            # a zombie batch that replication carried: the state keeps the newer epoch
        if base_sequence >= 0:
            e.batches.append(BatchRecord(base_sequence, next_sequence(base_sequence, record_count - 1), first_offset,
                                         first_offset + record_count - 1))
        e.last_timestamp_ms = max(e.last_timestamp_ms, timestamp_ms)
        if is_transactional and e.current_txn_first_offset < 0:
            e.current_txn_first_offset = first_offset

    def on_headers(self, headers: Iterable, markers: Iterable | None = None, now_ms: int | None = None) -> None:
        """Replay batch headers (from replication or the log) into the state.

        `markers` yields (header, decoded control batch) for the control frames among `headers`,
        in the same order (their payload says commit or abort).
        """
        marker_iter = iter(markers) if markers is not None else iter(())
        # Expiry counts from when this replica last saw the producer, not from record timestamps
        # (those are the producer's to choose and may lie far in the past).
        stamp = int(_time.time() * 1000) if now_ms is None else now_ms
        for h in headers:
            if h.is_control:
                mh, batch = next(marker_iter)
                commit, coordinator_epoch = parse_marker(batch)
                self.on_marker(h.producer_id, h.producer_epoch, commit, coordinator_epoch, h.base_offset,
                               stamp)
            elif h.producer_id >= 0:
                self.on_append(h.producer_id, h.producer_epoch, h.base_sequence, h.record_count, h.base_offset,
                               stamp, h.is_transactional)

    # ---- transactions --------------------------------------------------------------------------
    def check_marker(self, producer_id: int, producer_epoch: int, coordinator_epoch: int) -> bool:
        """True if the marker must be written; False for a repeat of one already written.

        A marker from an older coordinator epoch than this partition has seen for the producer is
        refused: a paused or zombie coordinator cannot end a transaction.
        """
        e = self.producers.get(producer_id)
        if e is None:
            return True
        if coordinator_epoch < e.coordinator_epoch:
            from ..errors import ErrorCode, error_for

            raise error_for(ErrorCode.TRANSACTION_COORDINATOR_FENCED,
                            f"marker for producer {producer_id} from coordinator epoch {coordinator_epoch}; "
                            f"epoch {e.coordinator_epoch} already seen")
        return producer_epoch > e.last_marker_epoch

    def on_marker(self, producer_id: int, producer_epoch: int, commit: bool, coordinator_epoch: int,
                  offset: int, timestamp_ms: int = 0) -> None:
        e = self.producers.get(producer_id)
        if e is None:
            e = ProducerEntry(producer_id, producer_epoch)
            self.producers[producer_id] = e
        if producer_epoch > e.producer_epoch:
            e.producer_epoch = producer_epoch      # the marker carries the bumped epoch (KIP-890)
            e.batches.clear()                      # the next transaction's sequences start at 0
        if e.current_txn_first_offset >= 0 and not commit:
            self.aborted.setdefault(producer_id, []).append((e.current_txn_first_offset, offset))
        e.current_txn_first_offset = -1
        e.coordinator_epoch = max(e.coordinator_epoch, coordinator_epoch)
        e.last_marker_epoch = max(e.last_marker_epoch, producer_epoch)
        e.last_timestamp_ms = max(e.last_timestamp_ms, timestamp_ms)

    def has_open_transaction(self, producer_id: int) -> bool:
        e = self.producers.get(producer_id)
        return e is not None and e.current_txn_first_offset >= 0

    def first_unstable_offset(self) -> int | None:
        """First offset of the oldest open transaction (the LSO can not pass it)."""
        firsts = [e.current_txn_first_offset for e in self.producers.values() if e.current_txn_first_offset >= 0]
        return min(firsts) if firsts else None

    def is_aborted(self, header) -> bool:
        ranges = self.aborted.get(header.producer_id)
        if not ranges or not header.is_transactional:
            return False
        return any(first <= header.base_offset <= last for first, last in ranges)

    def prune_aborted(self, log_start_offset: int) -> None:
        for pid in list(self.aborted):
            kept = [r for r in self.aborted[pid] if r[1] >= log_start_offset]
            if kept:
                self.aborted[pid] = kept
            else:
                del self.aborted[pid]

    def remove_expired(self, now_ms: int, expiration_ms: int) -> list[int]:
        """Forget producers idle longer than `expiration_ms` that have no open transaction."""
        gone = [pid for pid, e in self.producers.items()
                if e.current_txn_first_offset < 0 and now_ms - e.last_timestamp_ms > expiration_ms]
        for pid in gone:
            del self.producers[pid]
        return gone

    # ---- snapshots -----------------------------------------------------------------------------
    def to_bytes(self, offset: int) -> bytes:
        body = json.dumps({"version": 1, "offset": offset,
                           "producers": [e.to_json() for e in self.producers.values()],
                           "aborted": [[pid, a, b] for pid, rs in self.aborted.items() for a, b in rs]}).encode()
        return body + b"\n" + str(zlib.crc32(body)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple["ProducerStateManager", int]:
        body, _, crc = data.rpartition(b"\n")
        if not body or str(zlib.crc32(body)).encode() != crc.strip():
            raise ValueError("producer-state snapshot checksum mismatch")
        doc = json.loads(body)
        mgr = cls()
        for d in doc["producers"]:
            e = ProducerEntry.from_json(d)
            mgr.producers[e.producer_id] = e
        for pid, first, last in doc.get("aborted", []):
            mgr.aborted.setdefault(pid, []).append((first, last))
        return mgr, doc["offset"]

    def write_snapshot(self, directory: str, offset: int) -> str:
        path = os.path.join(directory, f"{offset:020d}{SNAPSHOT_SUFFIX}")
        atomic_write(path, self.to_bytes(offset))
        for old in snapshot_files(directory)[:-SNAPSHOTS_KEPT]:
            os.unlink(old)
        return path

    @classmethod
    def recover(cls, log) -> tuple["ProducerStateManager", int]:
        """Latest valid snapshot at or below the log end, plus replay of the headers after it."""
        mgr, offset = cls(), log.log_start_offset
        for path in reversed(snapshot_files(log.directory)):
            snap_offset = int(os.path.basename(path)[:20])
            if snap_offset > log.log_end_offset:
                os.unlink(path)              # beyond a truncation point: stale
                continue
            try:
                with open(path, "rb") as f:
                    mgr, offset = cls.from_bytes(f.read())
                break
            except (ValueError, OSError, KeyError):
                os.unlink(path)              # torn or corrupt snapshot: fall back to an older one
        if offset < log.log_end_offset:
            start = max(offset, log.log_start_offset)
            mgr.on_headers((h for h in log.headers(start) if h.base_offset >= offset), log.control_batches(start))
        return mgr, log.log_end_offset


def snapshot_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "*" + SNAPSHOT_SUFFIX)))


MARKER_SCHEMA_FIELDS = (("type", "int8"), ("coordinator_epoch", "int32"))
ABORT, COMMIT = 0, 1


def marker_batch(commit: bool, coordinator_epoch: int):
    """The one-row control batch of a commit/abort marker."""
    import pyarrow as pa

    from ..records import TIMESTAMP_TYPE

    import time as _time

    return pa.record_batch({"timestamp": pa.array([int(_time.time() * 1000)], pa.int64()).cast(TIMESTAMP_TYPE),
                            "type": pa.array([COMMIT if commit else ABORT], pa.int8()),
                            "coordinator_epoch": pa.array([coordinator_epoch], pa.int32())})


def parse_marker(batch) -> tuple[bool, int]:
    return batch.column("type")[0].as_py() == COMMIT, batch.column("coordinator_epoch")[0].as_py()

"""`OffsetStore`: committed offsets per (group, partition) and pending transactional offsets.

Reference section 4.2-4.4 (Kafka `OffsetMetadataManager`):

* A plain commit is validated against the group (member id + generation, or generation -1 with no
  member for a group without members) and becomes visible at once.
* A transactional commit (TxnOffsetCommit, sent by a transactional producer on behalf of a
  consumer) is validated the same way (KIP-447: a zombie that lost its partitions in a rebalance
  has a stale generation or an unknown member id, so it cannot commit offsets for them; the
  "not during COMPLETING_REBALANCE" rule is not applied) and is kept *pending* per producer id.
  Pending offsets are never returned by `fetch`.
* The transaction marker (`complete_txn`) makes a producer's pending offsets visible atomically on
  commit, or discards them on abort. On commit a pending offset replaces the committed one only if
  it was written after it (log order), so a newer plain commit wins (as in Kafka).
* ``fetch(require_stable=True)`` raises the retriable UNSTABLE_OFFSET_COMMIT while a requested
  partition has pending transactional offsets, so a new owner never starts from an offset that a
  zombie's transaction could still overwrite.

Every mutation exists twice: ``apply_*`` (no validation; what `replay` of a stored record calls)
and the validating convenience methods (`commit`, `stage_txn_offsets`, `complete_txn`) used when
the store is driven directly. The coordinator shard validates with `validate_commit`, appends
records, and only then applies them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple

from ..errors import ErrorCode, error_for
from ..records import TopicPartition
from .group import ConsumerGroup

NO_GENERATION = -1


class OffsetAndMetadata(NamedTuple):
    offset: int
    metadata: str = ""
    commit_ms: int = 0


@dataclass(frozen=True)
class _Committed:
    value: OffsetAndMetadata
    seq: int          # log order of the record that produced it


@dataclass(frozen=True)
class _Pending:
    producer_epoch: int
    value: OffsetAndMetadata
    seq: int


def normalize_offsets(offsets: Mapping, now_ms: int = 0) -> dict[TopicPartition, OffsetAndMetadata]:
    """Accept ``{tp: offset}`` or ``{tp: OffsetAndMetadata | (offset, metadata)}``; validate."""
    out: dict[TopicPartition, OffsetAndMetadata] = {}
    for tp, v in offsets.items():
        tp = TopicPartition(str(tp[0]), int(tp[1]))
        if isinstance(v, OffsetAndMetadata):
            om = v if v.commit_ms else v._replace(commit_ms=now_ms)
        elif isinstance(v, int) and not isinstance(v, bool):
            om = OffsetAndMetadata(v, "", now_ms)
        elif isinstance(v, tuple) and len(v) == 2:
            om = OffsetAndMetadata(int(v[0]), str(v[1]), now_ms)
        else:
            raise error_for(ErrorCode.INVALID_REQUEST, f"bad offset for {tp}: {v!r}")
        if om.offset < 0 or tp.partition < 0:
            raise error_for(ErrorCode.INVALID_REQUEST, f"offset and partition must be >= 0: {tp} -> {om.offset}")
        out[tp] = om
    return out


def validate_commit(group: ConsumerGroup | None, group_id: str, generation: int, member_id: str | None,
                    transactional: bool) -> None:
    """Raise UNKNOWN_MEMBER_ID / ILLEGAL_GENERATION / REBALANCE_IN_PROGRESS / COORDINATOR_NOT_AVAILABLE."""
    if group is None:
        if member_id:
            raise error_for(ErrorCode.UNKNOWN_MEMBER_ID, f"group {group_id!r} has no member {member_id!r}")
        if generation >= 0:
            raise error_for(ErrorCode.ILLEGAL_GENERATION, f"group {group_id!r} has no generation {generation}")
        return
    group.validate_offset_commit(member_id, generation, transactional)


class OffsetStore:
    def __init__(self, group_lookup: Callable[[str], ConsumerGroup | None] | None = None):
        self._group_lookup = group_lookup or (lambda _g: None)
        self._committed: dict[str, dict[TopicPartition, _Committed]] = {}
        self._pending: dict[int, dict[tuple[str, TopicPartition], _Pending]] = {}
        self._pending_by_group: dict[str, dict[TopicPartition, set[int]]] = {}
        self._seq = 0

    # ---- queries ------------------------------------------------------------------------------
    def groups(self) -> list[str]:
        return sorted(set(self._committed) | set(self._pending_by_group))

    def has_pending(self, group: str, tp: TopicPartition | None = None) -> bool:
        by_tp = self._pending_by_group.get(group, {})
        return bool(by_tp) if tp is None else bool(by_tp.get(tp))

    def pending_producers(self) -> list[int]:
        return sorted(self._pending)

    def pending_offsets(self, producer_id: int) -> dict[tuple[str, TopicPartition], OffsetAndMetadata]:
        return {k: p.value for k, p in sorted(self._pending.get(producer_id, {}).items())}

    def committed(self, group: str) -> dict[TopicPartition, OffsetAndMetadata]:
        return {tp: c.value for tp, c in sorted(self._committed.get(group, {}).items())}

    def fetch(self, group: str, tps: Iterable[TopicPartition] | None = None,
              require_stable: bool = True) -> dict[TopicPartition, OffsetAndMetadata | None]:
        """Committed offsets (``None`` for a requested partition without one). Raises the retriable
        UNSTABLE_OFFSET_COMMIT when ``require_stable`` and a requested partition (any, if ``tps``
        is None) has pending transactional offsets."""
        committed = self._committed.get(group, {})
        wanted = sorted(committed) if tps is None else sorted({TopicPartition(t, int(p)) for t, p in tps})
        if require_stable:
            unstable = ([tp for tp, pids in sorted(self._pending_by_group.get(group, {}).items()) if pids]
                        if tps is None else [tp for tp in wanted if self.has_pending(group, tp)])
            if unstable:
                raise error_for(ErrorCode.UNSTABLE_OFFSET_COMMIT,
                                f"group {group!r} has pending transactional offsets for {unstable}")
        return {tp: (committed[tp].value if tp in committed else None) for tp in wanted}

    def entries_in_log_order(self) -> list[tuple[int, str, object]]:
        """(seq, kind, payload) for every committed and pending entry, oldest first (snapshots)."""
        out: list[tuple[int, str, object]] = []
        for g, by_tp in self._committed.items():
            for tp, c in by_tp.items():
                out.append((c.seq, "committed", (g, tp, c.value)))
        for pid, entries in self._pending.items():
            for (g, tp), p in entries.items():
                out.append((p.seq, "pending", (pid, p.producer_epoch, g, tp, p.value)))
        out.sort(key=lambda e: e[0])
        return out

    # ---- validation ---------------------------------------------------------------------------
    def validate_commit(self, group: str, generation: int, member_id: str | None, transactional: bool = False) -> None:
        validate_commit(self._group_lookup(group), group, generation, member_id, transactional)

    def validate_txn_offsets(self, group: str, producer_id: int, producer_epoch: int, generation: int,
                             member_id: str | None) -> None:
        if producer_id < 0 or producer_epoch < 0:
            raise error_for(ErrorCode.INVALID_REQUEST, "transactional offsets need a producer id and epoch")
        for (_g, _tp), p in self._pending.get(producer_id, {}).items():
            if p.producer_epoch > producer_epoch:
                raise error_for(ErrorCode.PRODUCER_FENCED,
                                f"producer {producer_id} epoch {producer_epoch} is older than its pending "
                                f"offsets' epoch {p.producer_epoch}")
        self.validate_commit(group, generation, member_id, transactional=True)

    # ---- apply (no validation; replay of stored records) --------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def apply_commit(self, group: str, tp: TopicPartition, value: OffsetAndMetadata | None) -> None:
        """A plain commit, or a tombstone (``None``) that also clears the partition's pending offsets."""
        seq = self._next_seq()
        if value is not None:
            self._committed.setdefault(group, {})[tp] = _Committed(value, seq)
            return
        by_tp = self._committed.get(group, {})
        by_tp.pop(tp, None)
        if not by_tp:
            self._committed.pop(group, None)
        for pid in sorted(self._pending_by_group.get(group, {}).get(tp, set())):
            self._drop_pending(pid, group, tp)

    def apply_txn_offset(self, producer_id: int, producer_epoch: int, group: str, tp: TopicPartition,
                         value: OffsetAndMetadata | None) -> None:
        seq = self._next_seq()
        if value is None:
            self._drop_pending(producer_id, group, tp)
            return
        self._pending.setdefault(producer_id, {})[(group, tp)] = _Pending(producer_epoch, value, seq)
        self._pending_by_group.setdefault(group, {}).setdefault(tp, set()).add(producer_id)

    def apply_txn_marker(self, producer_id: int, commit: bool) -> list[tuple[str, TopicPartition]]:
        """Commit (publish) or abort (drop) a producer's pending offsets; returns the keys touched."""
        self._next_seq()
        entries = self._pending.get(producer_id, {})
        touched = sorted(entries)
        for (group, tp) in touched:
            p = entries[(group, tp)]
            if commit:
                cur = self._committed.get(group, {}).get(tp)
                if cur is None or p.seq > cur.seq:
                    self._committed.setdefault(group, {})[tp] = _Committed(p.value, p.seq)
            self._drop_pending(producer_id, group, tp)
        return touched

    def apply_group_deleted(self, group: str) -> None:
        self._committed.pop(group, None)
        for tp, pids in sorted(self._pending_by_group.get(group, {}).items()):
            for pid in sorted(pids):
                self._drop_pending(pid, group, tp)

    def _drop_pending(self, producer_id: int, group: str, tp: TopicPartition) -> None:
        entries = self._pending.get(producer_id)
        if entries is None or entries.pop((group, tp), None) is None:
            return
        if not entries:
            del self._pending[producer_id]
        by_tp = self._pending_by_group.get(group, {})
        pids = by_tp.get(tp, set())
        pids.discard(producer_id)
        if not pids:
            by_tp.pop(tp, None)
        if not by_tp:
            self._pending_by_group.pop(group, None)

    # ---- validating convenience API (direct use without a log) --------------------------------
    def commit(self, group: str, generation: int, member_id: str | None, offsets: Mapping,
               now_ms: int = 0) -> dict[TopicPartition, OffsetAndMetadata]:
        values = normalize_offsets(offsets, now_ms)
        self.validate_commit(group, generation, member_id)
        for tp, om in sorted(values.items()):
            self.apply_commit(group, tp, om)
        return values

    def stage_txn_offsets(self, group: str, producer_id: int, producer_epoch: int, generation: int,
                          member_id: str | None, offsets: Mapping,
                          now_ms: int = 0) -> dict[TopicPartition, OffsetAndMetadata]:
        values = normalize_offsets(offsets, now_ms)
        self.validate_txn_offsets(group, producer_id, producer_epoch, generation, member_id)
        for tp, om in sorted(values.items()):
            self.apply_txn_offset(producer_id, producer_epoch, group, tp, om)
        return values

    def complete_txn(self, producer_id: int, commit: bool) -> list[tuple[str, TopicPartition]]:
        return self.apply_txn_marker(producer_id, commit)

"""Leader-epoch cache: (leader_epoch, start_offset) pairs, persisted in `leader-epoch-checkpoint`.

File format (text, like Kafka's): a version line `0`, a count line, then `epoch start_offset`
lines ascending. Rewritten atomically on every change (changes are rare: once per leader epoch).
"""
from __future__ import annotations

import os

from ..errors import KafkaStorageError
from .files import atomic_write

FILE_NAME = "leader-epoch-checkpoint"
_VERSION = 0


class LeaderEpochCache:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, FILE_NAME)
        self._entries: list[tuple[int, int]] = self._load()

    def _load(self) -> list[tuple[int, int]]:
        try:
            with open(self.path) as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return []
        try:
            if int(lines[0]) != _VERSION:
                raise ValueError(f"unknown version {lines[0]!r}")
            count = int(lines[1])
            entries = [tuple(map(int, line.split())) for line in lines[2:2 + count]]
            if len(entries) != count or any(len(e) != 2 for e in entries):
                raise ValueError("entry count mismatch")
        except (ValueError, IndexError) as exc:
            raise KafkaStorageError(f"unreadable leader epoch checkpoint {self.path}: {exc}") from None
        return [(e, s) for e, s in entries]

    def _save(self) -> None:
        body = "".join(f"{e} {s}\n" for e, s in self._entries)
        atomic_write(self.path, f"{_VERSION}\n{len(self._entries)}\n{body}".encode())

    def entries(self) -> list[tuple[int, int]]:
        return list(self._entries)

    def latest_epoch(self) -> int:
        return self._entries[-1][0] if self._entries else -1

    def assign(self, epoch: int, start_offset: int) -> bool:
        """Record that `epoch` starts at `start_offset` (no-op if it is already the latest epoch).

        Entries that conflict (epoch >= new epoch, or start >= new start) are dropped first.
        Returns True if the cache changed.
        """
        if epoch < 0:
            return False
        if self._entries and self._entries[-1][0] == epoch and self._entries[-1][1] <= start_offset:
            return False
        self._entries = [(e, s) for e, s in self._entries if e < epoch and s < start_offset]
        self._entries.append((epoch, start_offset))
        self._save()
        return True

    def end_offset_for(self, epoch: int, log_end_offset: int) -> tuple[int, int]:
        """KIP-279: (largest cached epoch <= `epoch`, its end offset); (-1, -1) if none."""
        found = -1
        for i, (e, _s) in enumerate(self._entries):
            if e <= epoch:
                found = i
            else:
                break
        if found < 0:
            return -1, -1
        if found == len(self._entries) - 1:
            return self._entries[found][0], log_end_offset
        return self._entries[found][0], self._entries[found + 1][1]

    def truncate_from_end(self, end_offset: int) -> None:
        """Drop entries whose start offset >= end_offset (the log was truncated there)."""
        kept = [(e, s) for e, s in self._entries if s < end_offset]
        if kept != self._entries:
            self._entries = kept
            self._save()

    def truncate_from_start(self, start_offset: int) -> None:
        """Drop entries wholly below the new log start; the last of them now starts there."""
        below = [i for i, (_e, s) in enumerate(self._entries) if s < start_offset]
        if not below:
            return
        last = below[-1]
        rest = self._entries[last + 1:]
        if rest and rest[0][1] == start_offset:
            kept = rest
        else:
            kept = [(self._entries[last][0], start_offset)] + rest
        if kept != self._entries:
            self._entries = kept
            self._save()

    def clear(self) -> None:
        if self._entries or os.path.exists(self.path):
            self._entries = []
            self._save()

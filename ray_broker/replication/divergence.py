"""Where a follower's log diverges from the leader's, by leader epoch (Kafka's KIP-101 / KIP-279).

Pure functions over epoch caches: lists of (leader_epoch, start_offset), ascending.
"""
from __future__ import annotations

from typing import Callable, Sequence

EpochEntries = Sequence[tuple[int, int]]


def end_offset_for_epoch(entries: EpochEntries, log_end_offset: int, epoch: int) -> tuple[int, int]:
    """(largest epoch <= `epoch` in `entries`, the offset where it ends); (-1, -1) if none."""
    for i in range(len(entries) - 1, -1, -1):
        e, _start = entries[i]
        if e <= epoch:
            end = entries[i + 1][1] if i + 1 < len(entries) else log_end_offset
            return e, end
    return -1, -1


def truncation_offset(leader_lookup: Callable[[int], tuple[int, int]],
                      follower_entries: EpochEntries, follower_log_start: int,
                      follower_leo: int) -> int:
    """Offset the follower must truncate to so that its log is a prefix of the leader's.

    Walks the follower's epochs from the newest: an epoch the leader also has ends at the smaller of
    both end offsets; an epoch the leader never had is divergent as a whole (KIP-279's iteration).
    """
    if follower_leo <= follower_log_start or not follower_entries:
        return follower_log_start if follower_leo > follower_log_start else follower_leo
    for i in range(len(follower_entries) - 1, -1, -1):
        epoch, start = follower_entries[i]
        follower_end = follower_entries[i + 1][1] if i + 1 < len(follower_entries) else follower_leo
        leader_epoch, leader_end = leader_lookup(epoch)
        if leader_epoch == -1:
            break
        if leader_epoch == epoch:
            return max(follower_log_start, min(follower_end, leader_end, follower_leo))
    return max(follower_log_start, follower_entries[0][1])

"""Leader-side replication bookkeeping: follower progress, ISR decisions, high watermark.

Pure: the partition replica actor feeds it follower acknowledgements and the clock.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FollowerProgress:
    log_end_offset: int = -1          # -1 until the follower has answered once in this epoch
    last_caught_up_ms: int = 0        # last time its LEO reached the leader's LEO at request time
    alive: bool = True


@dataclass
class LeaderReplicationState:
    replica_id: int
    leader_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    min_insync_replicas: int
    lag_time_max_ms: int
    high_watermark: int
    epoch_start_offset: int
    followers: dict[int, FollowerProgress] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.replicas:
            if r != self.replica_id:
                self.followers.setdefault(r, FollowerProgress())

    def set_isr(self, isr) -> None:
        self.isr = tuple(sorted(isr))

    def on_follower_ack(self, follower: int, follower_leo: int, leader_leo_at_request: int, now_ms: int) -> None:
        p = self.followers.setdefault(follower, FollowerProgress())
        p.log_end_offset = follower_leo
        p.alive = True
        if follower_leo >= leader_leo_at_request:
            p.last_caught_up_ms = now_ms

    def on_follower_failed(self, follower: int) -> None:
        p = self.followers.setdefault(follower, FollowerProgress())
        p.alive = False
        p.log_end_offset = -1

    def maybe_advance_high_watermark(self, leader_leo: int) -> bool:
        """HW = min LEO over the ISR; never decreases; frozen while the ISR is under min ISR."""
        if len(self.isr) < self.min_insync_replicas:
            return False
        candidate = leader_leo
        for r in self.isr:
            if r == self.replica_id:
                continue
            p = self.followers.get(r)
            if p is None or p.log_end_offset < 0:
                return False
            candidate = min(candidate, p.log_end_offset)
        if candidate > self.high_watermark:
            self.high_watermark = candidate
            return True
        return False

    def isr_change_wanted(self, leader_leo: int, now_ms: int) -> tuple[int, ...] | None:
        """A new ISR to ask the controller for, or None. Shrink laggards, expand caught-up followers."""
        new = set(self.isr)
        for r, p in self.followers.items():
            if r in new and (now_ms - p.last_caught_up_ms > self.lag_time_max_ms) and leader_leo > p.log_end_offset:
                new.discard(r)
            elif (r not in new and p.alive and p.log_end_offset >= 0
                  and p.log_end_offset >= max(self.high_watermark, self.epoch_start_offset)
                  and p.log_end_offset >= leader_leo):
                new.add(r)
        new.add(self.replica_id)
        result = tuple(sorted(new))
        return None if result == tuple(sorted(self.isr)) else result

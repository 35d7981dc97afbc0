"""Writing one decided transaction's markers to its partitions (pure asyncio, no Ray import).

The coordinator actor supplies the I/O: `fetch_metadata(topics)` (the controller's metadata),
`write_marker(topic, partition, leader)` (a partition leader's `write_txn_markers`) and
`write_offsets_marker(partition)` (the group coordinator owning that `__consumer_offsets`
partition). Every partition is written concurrently and retried until it succeeds, the topic is
gone, or this coordinator is no longer current; a failed write or a partition with no leader
(an election in progress) looks the leader up again, with backoff.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from ..errors import BrokerError, ErrorCode

__all__ = ["MarkerWriter", "MarkersFenced"]

Partition = tuple[str, int]


class MarkersFenced(Exception):
    """A partition refused the marker: a newer coordinator owns this transactional id."""


class MarkerWriter:
    def __init__(self, *, offsets_topic: str,
                 fetch_metadata: Callable[[list[str]], Awaitable[dict]],
                 write_marker: Callable[[str, int, int], Awaitable[None]],
                 write_offsets_marker: Callable[[int], Awaitable[None]],
                 still_current: Callable[[], bool],
                 backoff_s: tuple[float, float] = (0.05, 1.0),
                 metadata_cache: dict | None = None):
        self.offsets_topic = offsets_topic
        self.fetch_metadata = fetch_metadata
        self.write_marker = write_marker
        self.write_offsets_marker = write_offsets_marker
        self.still_current = still_current
        self.backoff_s = backoff_s
        # topic -> metadata; may be shared by the writers of one coordinator (a failed write drops
        # its topic's entry, so stale leaders are looked up again)
        self.metadata_cache = {} if metadata_cache is None else metadata_cache
        # (topic, partition) -> what its write is doing; entries leave when done (for operators)
        self.progress: dict[Partition, str] = {}

    async def write_all(self, partitions, on_first_done: Callable[[], None] | None = None) -> bool:
        """Write every partition's marker; True when all are written (or their topics deleted),
        False when this coordinator stopped being current. Raises `MarkersFenced`."""
        parts = sorted(partitions)
        self.progress = {p: "pending" for p in parts}
        cache = self.metadata_cache
        topics = sorted({t for t, _ in parts if t != self.offsets_topic and t not in cache})
        if topics:
            try:     # one metadata call for the whole plan; refreshed per topic when a write fails
                cache.update(await self.fetch_metadata(topics))
            except Exception:  # noqa: BLE001 - per-topic lookups below retry
                pass
        first = [on_first_done]

        async def each(topic: str, partition: int) -> None:
            if await self._one(topic, partition, cache):
                self.progress.pop((topic, partition), None)
                if first[0] is not None and self.still_current():
                    callback, first[0] = first[0], None
                    callback()

        results = await asyncio.gather(*(each(t, p) for t, p in parts), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return self.still_current() and not self.progress

    async def _one(self, topic: str, partition: int, cache: dict) -> bool:
        backoff, cap = self.backoff_s
        attempt = 0
        while self.still_current():
            attempt += 1
            try:
                if topic == self.offsets_topic:
                    self.progress[(topic, partition)] = f"attempt {attempt}: writing via the group coordinator"
                    await self.write_offsets_marker(partition)
                    return True
                meta = cache.get(topic)
                if meta is None:
                    meta = (await self.fetch_metadata([topic])).get(topic)
                    if meta is None:
                        return True          # the topic was deleted: nothing left to mark
                    cache[topic] = meta
                leader = meta.partitions[partition].leader
                if leader is not None:
                    self.progress[(topic, partition)] = f"attempt {attempt}: writing to replica {leader}"
                    await self.write_marker(topic, partition, leader)
                    return True
                # an election is in progress: this metadata will never change, ask again
                cache.pop(topic, None)
                self.progress[(topic, partition)] = f"attempt {attempt}: no leader"
            except BrokerError as exc:
                cache.pop(topic, None)
                if exc.code == ErrorCode.TRANSACTION_COORDINATOR_FENCED:
                    raise MarkersFenced(str(exc)) from None
                if exc.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION:
                    return True      # the topic was deleted: nothing left to mark
                self.progress[(topic, partition)] = f"attempt {attempt}: {exc.code.name}"
            except Exception as exc:  # noqa: BLE001 - actor gone / not found: look it up again
                cache.pop(topic, None)
                self.progress[(topic, partition)] = f"attempt {attempt}: {type(exc).__name__}"
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, cap)
        return False

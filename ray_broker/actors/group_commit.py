"""Group commit: many coordinator operations share one durable append.

A coordinator append is a replicated produce (acks=all, ~several ms, far more under load). With one
append per operation, N producers' operations queue behind each other. `GroupCommit` keeps at most
one append in flight; whatever operations arrive meanwhile go together in the next append, each
getting back the log offset of its first record (or the append's error). Only asyncio; no Ray.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Sequence

AppendFn = Callable[[list], Awaitable[int]]


class GroupCommit:
    def __init__(self, append: AppendFn, max_records: int = 5000):
        self._append = append
        self._max_records = max_records
        self._queue: list[tuple[list, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.appends = 0            # how many appends were made (for tests and metrics)

    async def append(self, records: Sequence) -> int:
        """Append `records` (in order, contiguous) durably; returns the offset of the first one."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((list(records), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return await fut

    async def _flush_loop(self) -> None:
        while self._queue:
            group, size = [], 0
            while self._queue and (not group or size + len(self._queue[0][0]) <= self._max_records):
                item = self._queue.pop(0)
                group.append(item)
                size += len(item[0])
            records = [r for recs, _ in group for r in recs]
            try:
                base = await self._append(records)
                self.appends += 1
            except BaseException as exc:  # noqa: BLE001 - every waiter of this group gets the error
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    for _, fut in self._queue:
                        if not fut.done():
                            fut.set_exception(exc)
                    self._queue.clear()
                    raise
                continue
            offset = base
            for recs, fut in group:
                if not fut.done():
                    fut.set_result(offset)
                offset += len(recs)

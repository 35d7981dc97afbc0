"""GroupCommit: operations arriving while an append is in flight share the next append."""
from __future__ import annotations

import asyncio


from ray_broker.actors.group_commit import GroupCommit


class FakeLog:
    """An in-memory log whose appends block until released, so the test controls concurrency."""

    def __init__(self):
        self.records: list = []
        self.calls: list[list] = []
        self.gate = asyncio.Event()
        self.fail_next: BaseException | None = None

    async def append(self, records):
        self.calls.append(list(records))
        await self.gate.wait()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        base = len(self.records)
        self.records.extend(records)
        return base


def test_concurrent_operations_share_one_append_and_get_their_own_offsets():
    async def main():
        log = FakeLog()
        gc = GroupCommit(log.append)
        first = asyncio.ensure_future(gc.append(["a1", "a2"]))
        await asyncio.sleep(0)                     # the first append is now in flight
        rest = [asyncio.ensure_future(gc.append([f"b{i}"] * (i + 1))) for i in range(3)]
        await asyncio.sleep(0)
        log.gate.set()
        offsets = await asyncio.gather(first, *rest)
        return log, gc, offsets

    log, gc, offsets = asyncio.run(main())
    assert log.calls == [["a1", "a2"], ["b0", "b1", "b1", "b2", "b2", "b2"]]
    assert gc.appends == 2
    assert offsets == [0, 2, 3, 5]
    assert log.records[offsets[3]:] == ["b2"] * 3


def test_a_failed_append_fails_exactly_its_group_and_the_next_group_still_goes():
    async def main():
        log = FakeLog()
        gc = GroupCommit(log.append)
        log.fail_next = RuntimeError("replication timed out")
        a = asyncio.ensure_future(gc.append(["a"]))
        b = asyncio.ensure_future(gc.append(["b"]))
        await asyncio.sleep(0)
        c = asyncio.ensure_future(gc.append(["c"]))
        log.gate.set()
        return log, await asyncio.gather(a, b, c, return_exceptions=True)

    log, (a, b, c) = asyncio.run(main())
    assert isinstance(a, RuntimeError) and isinstance(b, RuntimeError)
    assert c == 0 and log.records == ["c"]


def test_groups_are_capped_by_max_records():
    async def main():
        log = FakeLog()
        log.gate.set()
        gc = GroupCommit(log.append, max_records=3)
        futs = [asyncio.ensure_future(gc.append([i, i])) for i in range(4)]
        return log, await asyncio.gather(*futs)

    log, offsets = asyncio.run(main())
    assert [len(c) for c in log.calls] == [2, 2, 2, 2]
    assert offsets == [0, 2, 4, 6] and log.records == [0, 0, 1, 1, 2, 2, 3, 3]


def test_cancelling_the_flusher_fails_every_waiter():
    async def main():
        log = FakeLog()
        gc = GroupCommit(log.append)
        a = asyncio.ensure_future(gc.append(["a"]))
        await asyncio.sleep(0)
        b = asyncio.ensure_future(gc.append(["b"]))
        await asyncio.sleep(0)
        gc._flusher.cancel()
        return await asyncio.gather(a, b, return_exceptions=True)

    a, b = asyncio.run(main())
    assert isinstance(a, asyncio.CancelledError) and isinstance(b, asyncio.CancelledError)

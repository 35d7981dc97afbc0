"""The marker writer (pure asyncio): retries, leader elections, deleted topics, fencing."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from ray_broker.errors import NotLeaderOrFollowerError, TransactionCoordinatorFencedError, UnknownTopicOrPartitionError
from ray_broker.txn.marker_writer import MarkersFenced, MarkerWriter

OFFSETS = "__consumer_offsets"


def meta(*leaders):
    return SimpleNamespace(partitions=[SimpleNamespace(leader=x) for x in leaders])


class Cluster:
    """Metadata answers scripted per call; replicas record what was written to them."""

    def __init__(self, answers, fail=None):
        self.answers = list(answers)       # one {topic: metadata} per fetch; the last one repeats
        self.fetches = 0
        self.fail = dict(fail or {})       # (topic, partition, leader) -> exceptions to raise, in order
        self.written: list[tuple] = []
        self.offsets_written: list[int] = []
        self.current = True

    async def fetch(self, topics):
        self.fetches += 1
        answer = self.answers[min(self.fetches - 1, len(self.answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return {t: answer[t] for t in topics if t in answer}

    async def write(self, topic, partition, leader):
        errors = self.fail.get((topic, partition, leader))
        if errors:
            raise errors.pop(0)
        self.written.append((topic, partition, leader))

    async def write_offsets(self, partition):
        self.offsets_written.append(partition)

    def writer(self):
        return MarkerWriter(offsets_topic=OFFSETS, fetch_metadata=self.fetch, write_marker=self.write,
                            write_offsets_marker=self.write_offsets, still_current=lambda: self.current,
                            backoff_s=(0.001, 0.002))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=5))


def test_all_partitions_written_with_one_metadata_call():
    c = Cluster([{"a": meta(0, 1), "b": meta(2)}])
    firsts = []
    assert run(c.writer().write_all({("a", 0), ("a", 1), ("b", 0), (OFFSETS, 3)}, lambda: firsts.append(1)))
    assert sorted(c.written) == [("a", 0, 0), ("a", 1, 1), ("b", 0, 2)]
    assert c.offsets_written == [3]
    assert c.fetches == 1 and firsts == [1]


def test_partition_without_a_leader_is_looked_up_again_until_elected():
    # the plan's metadata was fetched mid-election: leader None, then replica 1 takes over
    c = Cluster([{"a": meta(None)}, {"a": meta(None)}, {"a": meta(1)}])
    w = c.writer()
    assert run(w.write_all({("a", 0)}))
    assert c.written == [("a", 0, 1)] and c.fetches == 3
    assert w.progress == {}


def test_failed_write_refreshes_the_leader():
    c = Cluster([{"a": meta(0)}, {"a": meta(1)}],
                fail={("a", 0, 0): [NotLeaderOrFollowerError("moved"), RuntimeError("actor died")]})
    assert run(c.writer().write_all({("a", 0)}))
    assert c.written == [("a", 0, 1)]


def test_deleted_topic_needs_no_marker():
    c = Cluster([{"a": meta(0)}], fail={("a", 0, 0): [UnknownTopicOrPartitionError("gone")]})
    assert run(c.writer().write_all({("a", 0), ("b", 0)}))   # b: not in the metadata at all
    assert c.written == []


def test_fenced_write_stops_everything():
    c = Cluster([{"a": meta(0)}], fail={("a", 0, 0): [TransactionCoordinatorFencedError("newer")]})
    with pytest.raises(MarkersFenced):
        run(c.writer().write_all({("a", 0)}))


def test_stops_when_no_longer_current():
    c = Cluster([{"a": meta(None)}])
    w = c.writer()

    async def go():
        task = asyncio.create_task(w.write_all({("a", 0)}))
        await asyncio.sleep(0.02)
        assert w.progress[("a", 0)].endswith("no leader")      # what an operator would see
        c.current = False
        return await task

    assert run(go()) is False
    assert c.written == []


def test_metadata_call_failure_is_retried_per_topic():
    c = Cluster([RuntimeError("controller restarting"), {"a": meta(2)}])
    assert run(c.writer().write_all({("a", 0)}))
    assert c.written == [("a", 0, 2)]

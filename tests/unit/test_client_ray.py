"""Producer and consumer against fake controller/replica actors on a real local Ray."""
from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import cloudpickle
import pyarrow as pa
import pytest

ray = pytest.importorskip("ray")

from ray_broker.client import ClientContext, Consumer, Producer  # noqa: E402
from ray_broker.client.partitioner import partition_for_key  # noqa: E402
from ray_broker.config import ConsumerConfig, ProducerConfig  # noqa: E402
from ray_broker.errors import (BrokerTimeoutError, InvalidRequestError, LeaderNotAvailableError,  # noqa: E402
                               NotLeaderOrFollowerError, OffsetOutOfRangeError, RecordTooLargeError,
                               SchemaMismatchError, UnknownOutcomeError, UnknownTopicOrPartitionError)
from ray_broker.protocol import (FetchResult, PartitionState, ProduceResult, TopicMetadata,  # noqa: E402
                                 replica_actor_name)
from ray_broker.records import TopicPartition, schema_to_bytes, stored_schema, with_offsets  # noqa: E402

NS = "rb_client_test"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# actors below are shipped to workers by value (this test module is not importable there)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote
class FakeController:
    def __init__(self):
        self.topics: dict[str, TopicMetadata] = {}

    def add_topic(self, md: TopicMetadata) -> None:
        self.topics[md.name] = md

    def set_leader(self, topic: str, partition: int, leader) -> None:
        md = self.topics[topic]
        parts = list(md.partitions)
        ps = parts[partition]
        parts[partition] = PartitionState(partition, ps.replicas, leader, ps.leader_epoch + 1, ps.isr)
        self.topics[topic] = TopicMetadata(md.name, md.topic_id, tuple(parts), md.config, md.schema)

    def allocate_producer_ids(self, count=1):
        self.next_pid = getattr(self, "next_pid", 1000) + count
        return self.next_pid - count

    def get_metadata(self, topics=None):
        from ray_broker.errors import UnknownTopicOrPartitionError
        names = list(self.topics) if topics is None else topics
        for t in names:
            if t not in self.topics:
                raise UnknownTopicOrPartitionError(f"unknown topic {t!r}")
        return {t: self.topics[t] for t in names}


@ray.remote
class FakeReplica:
    """In-memory partition log (async actor, like the real replica)."""

    def __init__(self, user_schema_bytes=None):
        from ray_broker.records import schema_from_bytes
        self.schema = stored_schema(schema_from_bytes(user_schema_bytes))
        self.batches: list[tuple[int, pa.RecordBatch]] = []
        self.end = 0
        self.log_start = 0
        self.calls: list[tuple] = []
        self.fail_produce: list = []
        self.fail_fetch: list = []
        self.delay = 0.0
        self.producers: dict[int, tuple[int, int, int]] = {}   # pid -> (epoch, next seq, last base offset)
        self.active = 0
        self.max_active = 0
        self.spans: list[tuple[float, float]] = []   # (start, end) of produce calls, machine-wide clock

    def get_spans(self):
        return self.spans

    def inject(self, produce=None, fetch=None, delay=None):
        if produce:
            self.fail_produce.extend(produce)
        if fetch:
            self.fail_fetch.extend(fetch)
        if delay is not None:
            self.delay = delay

    def clear(self):
        self.fail_produce.clear()
        self.fail_fetch.clear()
        self.delay = 0.0

    def get_calls(self):
        return self.calls

    def get_max_active(self):
        m, self.max_active = self.max_active, 0
        return m

    def set_log_start(self, offset):
        self.log_start = offset

    async def produce(self, batch, acks, timeout_ms, producer_id=-1, producer_epoch=-1, base_sequence=-1,
                      is_transactional=False):
        from ray_broker.errors import SchemaMismatchError
        from ray_broker.records import from_wire
        batch = from_wire(batch)
        self.calls.append((batch.num_rows, producer_id, producer_epoch, base_sequence, acks))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        t0 = time.monotonic()
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
            self.spans.append((t0, time.monotonic()))
        if self.fail_produce:
            raise self.fail_produce.pop(0)
        if not batch.schema.equals(self.schema, check_metadata=False):
            raise SchemaMismatchError(f"{batch.schema} != {self.schema}")
        if producer_id >= 0:
            from ray_broker.errors import OutOfOrderSequenceError
            epoch, nxt, last_base = self.producers.get(producer_id, (producer_epoch, 0, -1))
            if base_sequence + batch.num_rows == nxt and last_base >= 0:
                return ProduceResult(last_base, self.log_start, duplicate=True)
            if base_sequence != nxt:
                raise OutOfOrderSequenceError(f"expected sequence {nxt}, got {base_sequence}")
            self.producers[producer_id] = (producer_epoch, nxt + batch.num_rows, self.end)
        base = self.end
        self.batches.append((base, batch))
        self.end += batch.num_rows
        return ProduceResult(base, self.log_start)

    async def fetch(self, offset, max_bytes, isolation_level, max_wait_ms):
        from ray_broker.errors import OffsetOutOfRangeError
        if self.fail_fetch:
            raise self.fail_fetch.pop(0)
        if offset < self.log_start or offset > self.end:
            raise OffsetOutOfRangeError(f"offset {offset} outside [{self.log_start}, {self.end}]")
        deadline = time.monotonic() + max_wait_ms / 1000
        while offset >= self.end and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        out, size, pos = [], 0, offset
        for base, b in self.batches:
            if base + b.num_rows <= pos:
                continue
            part = b.slice(pos - base)
            if out and size + part.nbytes > max_bytes:
                break
            out.append(with_offsets(part, pos))
            size += part.nbytes
            pos += part.num_rows
        return FetchResult(out, self.end, self.end, self.log_start, pos)

    async def list_offset(self, which, isolation_level):
        return self.log_start if which == "earliest" else self.end


@pytest.fixture(scope="module")
def cluster(ray_local):
    """Fake broker actors in their own namespace on the session's shared Ray."""
    ctrl = FakeController.options(name="controller", namespace=NS).remote()
    ray.get(ctrl.get_metadata.remote([]))
    yield ctrl
    ray.kill(ctrl)


def make_topic(ctrl, partitions=1, schema: pa.Schema | None = None, max_message_bytes=None):
    name = f"t{uuid.uuid4().hex[:8]}"
    sb = schema_to_bytes(schema)
    reps = [FakeReplica.options(name=replica_actor_name(name, p, 0), namespace=NS).remote(sb)
            for p in range(partitions)]
    config = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
    md = TopicMetadata(name, uuid.uuid4().hex, tuple(PartitionState(p, (0,), 0, 0, (0,)) for p in range(partitions)),
                       config, sb)
    ray.get(ctrl.add_topic.remote(md))
    ray.get([r.get_calls.remote() for r in reps])   # actors are up
    return name, reps


def pcfg(**kw):
    base = dict(linger_ms=5, retry_backoff_ms=20, delivery_timeout_ms=5000, request_timeout_ms=3000)
    base.update(kw)
    return ProducerConfig.from_dict(base)


@pytest.fixture(scope="module")
def ctx(cluster):
    return ClientContext(NS)


@pytest.fixture(scope="module")
def shared(cluster):
    """One single-partition topic reused by several tests (actor start-up is the slow part)."""
    return make_topic(cluster, 1)


def log_end(rep) -> int:
    return ray.get(rep.list_offset.remote("latest", "read_uncommitted"))


# ------------------------------------------------------------------------------------------ producer
def test_send_keyed_batches_and_offsets(cluster, ctx):
    topic, reps = make_topic(cluster, 3)
    # generous timeouts: a fake call slower than request.timeout.ms on a loaded box is resent, and the
    # fakes (no dedup) would count it twice
    with Producer(ctx, pcfg(linger_ms=20, request_timeout_ms=20_000, delivery_timeout_ms=60_000)) as prod:
        futs = [prod.send(topic, value=f"v{i}", key=f"k{i % 50}") for i in range(3000)]
        prod.flush(timeout=60)
        mds = [f.result(timeout=0) for f in futs]
    for i, md in enumerate(mds):
        assert md.topic == topic and md.partition == partition_for_key(f"k{i % 50}".encode(), 3)
    per_part: dict[int, list[int]] = {}
    for md in mds:
        per_part.setdefault(md.partition, []).append(md.offset)
    for p, offs in per_part.items():
        assert offs == list(range(len(offs))), "offsets follow send order per partition"
    calls = ray.get([r.get_calls.remote() for r in reps])
    # appended exactly once each (calls also count a pipelined call that overtook its predecessor,
    # was refused as out of order and was sent again: Ray may reorder calls to an async actor)
    assert sum(log_end(r) for r in reps) == 3000
    assert sum(len(cs) for cs in calls) < 100, "records are batched"
    # read back through the consumer
    with Consumer(ctx, ConsumerConfig(auto_offset_reset="earliest")) as cons:
        tps = [TopicPartition(topic, p) for p in range(3)]
        cons.assign(tps)
        got: dict[int, list] = {}
        deadline = time.monotonic() + 10
        while sum(len(v) for v in got.values()) < 3000 and time.monotonic() < deadline:
            for tp, b in cons.poll(0.5).items():
                assert b.schema.names[:2] == ["offset", "timestamp"]
                got.setdefault(tp.partition, []).extend(b.column("value").to_pylist())
        assert sum(len(v) for v in got.values()) == 3000
        for i, md in enumerate(mds):
            assert got[md.partition][md.offset] == f"v{i}".encode()
        assert cons.end_offsets(tps) == {TopicPartition(topic, p): len(per_part.get(p, [])) for p in range(3)}


def test_send_headers_timestamp_partition_and_errors(cluster, ctx):
    topic, reps = make_topic(cluster, 2, max_message_bytes=4096)
    with Producer(ctx, pcfg()) as prod:
        f = prod.send(topic, value=b"x", partition=1, headers=[("h", b"v")], timestamp=1234)
        assert f.result(timeout=10) == (topic, 1, 0)
        with pytest.raises(UnknownTopicOrPartitionError, match="partition 5"):
            prod.send(topic, value=b"x", partition=5)
        with pytest.raises(UnknownTopicOrPartitionError):
            prod.send("no-such-topic", value=b"x")
        with pytest.raises(RecordTooLargeError):
            prod.send(topic, value=b"x" * 10_000)
    with Producer(ctx, pcfg(buffer_memory=2048)) as small:     # fits max.message.bytes, not the buffer
        with pytest.raises(RecordTooLargeError, match="buffer.memory"):
            small.send(topic, value=b"x" * 3000)
        assert small.send(topic, value=b"x" * 1000, partition=0).result(timeout=10).offset == 0
    with Producer(ctx, pcfg()) as prod:
        f2 = prod.send(topic, value=b"unkeyed")
        assert f2.result(timeout=10).partition in (0, 1)
    with pytest.raises(InvalidRequestError):
        prod.send(topic, value=b"x")
    with pytest.raises(InvalidRequestError):
        prod.send_batch(topic, pa.table({"value": [b"x"]}))
    c = Consumer(ctx, ConsumerConfig(auto_offset_reset="earliest"))
    c.assign([TopicPartition(topic, 1)])
    out = {}
    deadline = time.monotonic() + 5
    while not out and time.monotonic() < deadline:
        out = c.poll(0.5)
    row = out[TopicPartition(topic, 1)].to_pylist()[0]
    assert row["offset"] == 0 and row["value"] == b"x" and row["headers"] == [{"key": "h", "value": b"v"}]
    assert row["timestamp"].timestamp() == 1.234
    c.close()


def test_send_batch_keyed_split_and_schema_topic(cluster, ctx):
    topic, reps = make_topic(cluster, 2)
    n = 5000
    keys = [f"user-{i % 97}" for i in range(n)]
    table = pa.table({"key": keys, "value": [f"value-{i}" for i in range(n)]})
    with Producer(ctx, pcfg(max_message_bytes=20_000, batch_size=20_000)) as prod:
        md = prod.send_batch(topic, table).result(timeout=20)
        assert len(md) == n
        assert md.partitions.tolist() == [partition_for_key(k.encode(), 2) for k in keys]
        for p in range(2):
            offs = md.offsets[md.partitions == p]
            assert offs.tolist() == list(range(len(offs)))
        calls = ray.get([r.get_calls.remote() for r in reps])
        assert max(c[0] for cs in calls for c in cs) < n // 4, "split by max_message_bytes"
        # explicit partition; a bad column type fails in the caller's thread, nothing queued
        md2 = prod.send_batch(topic, pa.record_batch({"value": [b"a", b"b"]}), partition=1).result(timeout=10)
        assert md2.partitions.tolist() == [1, 1]
        with pytest.raises(SchemaMismatchError):
            prod.send_batch(topic, pa.record_batch({"value": [1, 2]}))
        with pytest.raises(RecordTooLargeError):
            prod.send_batch(topic, pa.record_batch({"value": [b"x" * 30_000]}))

    user = pa.schema([pa.field("id", pa.int64()), pa.field("name", pa.string())])
    st, sreps = make_topic(cluster, 2, schema=user)
    with Producer(ctx, pcfg()) as prod:
        with pytest.raises(InvalidRequestError, match="send_batch"):
            prod.send(st, value=b"x")
        with pytest.raises(SchemaMismatchError):
            prod.send_batch(st, pa.record_batch({"id": pa.array([1], pa.int32())}))
        rb = pa.record_batch({"id": pa.array([1, 2, 3], pa.int64()), "name": ["a", "b", "c"]})
        md = prod.send_batch(st, rb, key_column="name").result(timeout=10)
        assert md.partitions.tolist() == [partition_for_key(x.encode(), 2) for x in "abc"]
        md = prod.send_batch(st, pa.Table.from_batches([rb, rb])).result(timeout=10)   # sticky: one partition
        assert len(set(md.partitions.tolist())) == 1 and len(md) == 6


def test_retry_keeps_sequence_and_order(cluster, ctx, shared):
    topic, reps = shared
    base, ncalls = log_end(reps[0]), len(ray.get(reps[0].get_calls.remote()))
    ray.get(reps[0].inject.remote(produce=[NotLeaderOrFollowerError("moved"), NotLeaderOrFollowerError("moved")]))
    prod = Producer(ctx, pcfg(linger_ms=0, batch_size=200))
    prod.idempotence.enabled = True
    prod.idempotence.producer_id, prod.idempotence.producer_epoch = 42, 3
    futs = [prod.send(topic, value=b"%03d" % i) for i in range(60)]
    prod.flush(timeout=10)
    mds = [f.result(timeout=0) for f in futs]
    assert [m.offset for m in mds] == list(range(base, base + 60)), "order preserved across retries"
    calls = ray.get(reps[0].get_calls.remote())[ncalls:]
    assert calls[0][1:4] == (42, 3, 0)
    assert calls[1][3] == 0 or calls[2][3] == 0, "the retry resends the same base_sequence"
    seqs = {}
    for rows, pid, epoch, seq, acks in calls:
        seqs.setdefault(seq, set()).add(rows)
        assert acks == -1
    assert all(len(v) == 1 for v in seqs.values()), "a sequence always carries the same batch"
    prod.close()


def test_non_retriable_and_delivery_timeout(cluster, ctx, shared):
    topic, reps = shared
    base = log_end(reps[0])
    with Producer(ctx, pcfg(linger_ms=0)) as prod:
        ray.get(reps[0].inject.remote(produce=[RecordTooLargeError("too big")]))
        with pytest.raises(RecordTooLargeError):
            prod.send(topic, value=b"a").result(timeout=10)
        ok = prod.send(topic, value=b"b").result(timeout=10)
        assert ok.offset == base
    # retriable but ambiguous (timeout after send) until the delivery timeout -> UnknownOutcomeError
    with Producer(ctx, pcfg(linger_ms=0, delivery_timeout_ms=300, retry_backoff_ms=20)) as prod:
        ray.get(reps[0].inject.remote(produce=[BrokerTimeoutError("slow")] * 1000))
        with pytest.raises(UnknownOutcomeError):
            prod.send(topic, value=b"c").result(timeout=10)
    ray.get(reps[0].clear.remote())


def test_leader_unavailable_then_elected(cluster, ctx, shared):
    topic, reps = shared
    base = log_end(reps[0])
    ray.get(cluster.set_leader.remote(topic, 0, None))
    ctx.invalidate(topic)
    with pytest.raises(LeaderNotAvailableError):
        ctx.leader_handle(topic, 0)
    with Producer(ctx, pcfg(linger_ms=0)) as prod:
        fut = prod.send(topic, value=b"x")
        time.sleep(0.2)
        assert not fut.done()
        ray.get(cluster.set_leader.remote(topic, 0, 0))
        assert fut.result(timeout=10).offset == base
    # leader stays None past the delivery timeout: not sent, so a plain timeout
    ray.get(cluster.set_leader.remote(topic, 0, None))
    ctx.invalidate(topic)
    with Producer(ctx, pcfg(linger_ms=0, delivery_timeout_ms=300)) as prod:
        with pytest.raises(BrokerTimeoutError) as ei:
            prod.send(topic, value=b"y").result(timeout=10)
        assert not isinstance(ei.value, UnknownOutcomeError)
    ray.get(cluster.set_leader.remote(topic, 0, 0))
    ctx.invalidate(topic)


def test_a_cached_handle_pinned_to_a_gone_node_is_dropped_and_retried(cluster, shared):
    """A replica re-created elsewhere after its node was removed: a client still holding the old
    handle gets ActorUnschedulableError (not a RayActorError) and must refresh, not fail."""
    from ray.exceptions import ActorUnschedulableError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    topic, reps = shared
    base = log_end(reps[0])
    gone = NodeAffinitySchedulingStrategy(node_id="ab" * 28, soft=False)   # no such node
    stale = FakeReplica.options(namespace=NS, scheduling_strategy=gone).remote(None)
    with pytest.raises(ActorUnschedulableError):
        ray.get(stale.list_offset.remote("latest", "read_uncommitted"), timeout=30)
    ctx = ClientContext(NS)
    ctx.topic_metadata(topic)
    ctx._replicas[(topic, 0, 0)] = stale
    with Consumer(ctx, ConsumerConfig()) as cons:
        tp = TopicPartition(topic, 0)
        assert cons.end_offsets([tp]) == {tp: base}
    ctx._replicas[(topic, 0, 0)] = stale
    with Producer(ctx, pcfg(linger_ms=0)) as prod:
        assert prod.send(topic, value=b"after").result(timeout=30).offset == base
    assert log_end(reps[0]) == base + 1
    ray.kill(stale)


def test_inflight_pipelining_acks0_and_buffer_memory(cluster, ctx, shared):
    topic, reps = shared
    base = log_end(reps[0])
    ray.get(reps[0].get_max_active.remote())
    ray.get(reps[0].inject.remote(delay=0.1))
    # without sequence numbers: one call at a time per partition (Ray may reorder concurrent calls)
    with Producer(ctx, pcfg(linger_ms=0, batch_size=100)) as prod:
        futs = [prod.send(topic, value=b"%04d" % i) for i in range(4)]
        prod.flush(timeout=10)
        assert [f.result().offset for f in futs] == [base, base + 1, base + 2, base + 3]
    assert ray.get(reps[0].get_max_active.remote()) == 1
    # with idempotence: several calls in flight
    with Producer(ctx, pcfg(linger_ms=0, batch_size=100)) as prod:
        prod.idempotence.enabled = True
        prod.idempotence.producer_id, prod.idempotence.producer_epoch = 1, 0
        t0 = time.monotonic()
        futs = []
        for i in range(10):
            futs.append(prod.send(topic, value=b"%04d" % i))
            time.sleep(0.005)
        prod.flush(timeout=10)
        assert [f.result().offset for f in futs] == list(range(base + 4, base + 14))
        assert time.monotonic() - t0 < 0.9, "several produce calls in flight at once"
    assert ray.get(reps[0].get_max_active.remote()) > 1
    # buffer.memory full -> send blocks up to max.block.ms, then BrokerTimeoutError
    with Producer(ctx, pcfg(linger_ms=0, buffer_memory=300, max_block_ms=100)) as prod:
        t0 = time.monotonic()
        with pytest.raises(BrokerTimeoutError):
            for _ in range(50):
                prod.send(topic, value=b"z" * 100)
        assert time.monotonic() - t0 < 2
    ray.get(reps[0].inject.remote(delay=0.0))
    # many small pipelined batches: batches Ray delivers out of order are resent in order
    with Producer(ctx, pcfg(linger_ms=0, batch_size=64)) as prod:
        prod.idempotence.enabled = True
        prod.idempotence.producer_id, prod.idempotence.producer_epoch = 2, 0
        futs = [prod.send(topic, value=b"%05d" % i) for i in range(1500)]
        prod.flush(timeout=20)
        offs = [f.result().offset for f in futs]
        assert offs == list(range(offs[0], offs[0] + 1500))
    with Producer(ctx, pcfg(acks="0")) as prod:
        assert prod.send(topic, value=b"q").result(timeout=10).offset == -1
        assert prod.send_batch(topic, pa.table({"value": [b"1", b"2"]})).result(timeout=10).offsets.tolist() == [-1, -1]



def test_lingered_batches_wait_for_the_call_in_flight_and_grow(cluster, ctx, shared):
    # only full batches pipeline: a batch sent for its linger waits while a call to its partition is
    # in flight (and grows), so slow calls do not multiply into one call per lingered record
    topic, reps = shared
    ray.get(reps[0].get_max_active.remote())
    ncalls = len(ray.get(reps[0].get_calls.remote()))
    ray.get(reps[0].inject.remote(delay=0.1))
    try:
        with Producer(ctx, pcfg(linger_ms=0)) as prod:        # 1 MiB batch.size: never full here
            prod.idempotence.enabled = True
            prod.idempotence.producer_id, prod.idempotence.producer_epoch = 3, 0
            futs = []
            for i in range(20):
                futs.append(prod.send(topic, value=b"%04d" % i))
                time.sleep(0.01)
            offsets = [f.result(timeout=10).offset for f in futs]
        assert offsets == list(range(offsets[0], offsets[0] + 20))
        calls = ray.get(reps[0].get_calls.remote())[ncalls:]
        assert ray.get(reps[0].get_max_active.remote()) == 1
        assert sum(c[0] for c in calls) == 20 and len(calls) <= 6, calls   # ~3 calls of 100 ms, not 20
    finally:
        ray.get(reps[0].inject.remote(delay=0.0))

def _max_overlap(spans) -> int:
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


@pytest.mark.parametrize("cap", [1, 2])
def test_lingered_batches_to_one_node_share_its_call_slots(cluster, ctx, cap):
    # Kafka sends one request per broker for all its partitions; here each partition is a call, so
    # lingered batches to the leaders on one node take turns for max.lingered.requests.per.node
    # slots (the fake topic's leaders have no node: one group), and nothing is lost or reordered
    topic, reps = make_topic(cluster, 4)
    ray.get([r.inject.remote(delay=0.05) for r in reps])
    with Producer(ctx, pcfg(linger_ms=0, max_lingered_requests_per_node=cap)) as prod:
        prod.idempotence.enabled = True
        prod.idempotence.producer_id, prod.idempotence.producer_epoch = 5, 0
        futs = []
        for i in range(40):
            futs.append(prod.send(topic, value=b"%04d" % i, partition=i % 4))
            time.sleep(0.005)
        results = [f.result(timeout=20) for f in futs]
    for p in range(4):
        offsets = [r.offset for r in results if r.partition == p]
        assert offsets == list(range(10)), (p, offsets)
    spans = [sp for r in reps for sp in ray.get(r.get_spans.remote())]
    assert _max_overlap(spans) <= cap, spans
    assert len(spans) < 40     # they grew while waiting
    for r in reps:
        ray.kill(r)


def test_a_hung_leader_gives_its_lingered_slot_back(cluster, ctx):
    # one slot per node and one leader that does not answer for 5 s: the other partitions' records
    # go out once the hung call has held the slot for LINGERED_SLOT_HOLD_S (1 s), not after it answers
    topic, reps = make_topic(cluster, 3)
    ray.get(reps[0].inject.remote(delay=5.0))
    with Producer(ctx, pcfg(linger_ms=0, max_lingered_requests_per_node=1, request_timeout_ms=20_000)) as prod:
        hung = prod.send(topic, value=b"slow", partition=0)
        time.sleep(0.2)                                        # its call is out and holds the slot
        t0 = time.monotonic()
        others = [prod.send(topic, value=b"v%d" % p, partition=p) for p in (1, 2)]
        for f in others:
            f.result(timeout=10)
        assert not hung.done(), f"the others waited for the hung call ({time.monotonic() - t0:.1f} s)"
        assert hung.result(timeout=10).offset == 0
    for r in reps:
        ray.kill(r)


def test_callbacks_and_close_semantics(cluster, ctx, shared):
    topic, reps = shared
    base = log_end(reps[0])
    prod = Producer(ctx, pcfg())
    got = []
    for i in range(5):
        prod.send(topic, value=b"%d" % i).add_done_callback(lambda f: got.append(f.result().offset))
    prod.close(timeout=10)
    assert sorted(got) == list(range(base, base + 5))
    prod.close()   # idempotent
    assert prod.closed


# ------------------------------------------------------------------------------------------ consumer
def _fill(ctx, topic, n, partition=0):
    with Producer(ctx, pcfg(linger_ms=0)) as prod:
        prod.send_batch(topic, pa.table({"value": [b"%d" % i for i in range(n)]}), partition=partition).result(10)


def _poll_until(cons, n, timeout=10):
    rows = []
    deadline = time.monotonic() + timeout
    while len(rows) < n and time.monotonic() < deadline:
        for tp, b in cons.poll(0.3).items():
            rows.extend(b.column("offset").to_pylist())
    return rows


def test_consumer_seek_position_reset_and_limits(cluster, ctx):
    topic, reps = make_topic(cluster, 2)
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    _fill(ctx, topic, 100)
    cons = Consumer(ctx, ConsumerConfig(auto_offset_reset="latest", max_poll_records=30, fetch_max_wait_ms=50))
    with pytest.raises(UnknownTopicOrPartitionError):
        cons.assign([TopicPartition(topic, 7)])
    with pytest.raises(InvalidRequestError):
        cons.poll(0)
    cons.assign([tp0, tp1])
    assert cons.assignment() == {tp0, tp1}
    assert cons.position(tp0) == 100   # latest
    assert cons.beginning_offsets([tp0]) == {tp0: 0}
    assert cons.end_offsets([tp0, tp1]) == {tp0: 100, tp1: 0}
    t0 = time.monotonic()
    assert cons.poll(0.2) == {}
    assert time.monotonic() - t0 < 2
    cons.seek_to_beginning([tp0])
    assert cons.position(tp0) == 0
    out = {}
    while not out:
        out = cons.poll(2)
    assert out[tp0].num_rows == 30 and out[tp0].column("offset").to_pylist() == list(range(30))
    assert cons.position(tp0) == 30    # the rest is buffered
    rest = _poll_until(cons, 70)
    assert rest == list(range(30, 100))
    # a seek discards what was fetched for the old position
    cons.seek(tp0, 95)
    assert _poll_until(cons, 5) == [95, 96, 97, 98, 99]
    cons.seek_to_end()
    assert cons.position(tp0) == 100 and cons.position(tp1) == 0
    # out of range -> auto.offset.reset (latest)
    cons.seek(tp0, 500)
    assert cons.poll(0.3) == {}
    assert cons.position(tp0) == 100
    # new data arrives while a long-poll is in flight
    _fill(ctx, topic, 10)
    assert _poll_until(cons, 10) == list(range(100, 110))
    cons.close()
    with pytest.raises(InvalidRequestError):
        cons.poll(0)


def test_consumer_reset_none_and_retriable_fetch_errors(cluster, ctx):
    topic, reps = make_topic(cluster, 1)
    tp = TopicPartition(topic, 0)
    _fill(ctx, topic, 20)
    cons = Consumer(ctx, ConsumerConfig(auto_offset_reset="none", fetch_max_wait_ms=50))
    cons.assign([tp])
    with pytest.raises(OffsetOutOfRangeError):
        cons.position(tp)
    cons.seek(tp, 5)
    ray.get(reps[0].inject.remote(fetch=[NotLeaderOrFollowerError("moved"), LeaderNotAvailableError("x")]))
    assert _poll_until(cons, 15) == list(range(5, 20))
    cons.seek(tp, 50)
    with pytest.raises(OffsetOutOfRangeError):
        for _ in range(20):
            cons.poll(0.1)
    # earliest after log truncation at the front
    ray.get(reps[0].set_log_start.remote(10))
    c2 = Consumer(ctx, ConsumerConfig(auto_offset_reset="earliest", fetch_max_wait_ms=50))
    c2.assign([tp])
    c2.seek(tp, 2)
    assert _poll_until(c2, 10) == list(range(10, 20))


def test_fetch_bytes_limits(cluster, ctx, shared):
    topic, reps = shared
    tp = TopicPartition(topic, 0)
    base = log_end(reps[0])
    with Producer(ctx, pcfg(linger_ms=0)) as prod:
        for _ in range(5):
            prod.send_batch(topic, pa.table({"value": [b"x" * 1000] * 10}), partition=0).result(10)
    cons = Consumer(ctx, ConsumerConfig(auto_offset_reset="earliest", max_partition_fetch_bytes=15_000,
                                        fetch_max_wait_ms=50))
    cons.assign([tp])
    cons.seek(tp, base)
    sizes = []
    deadline = time.monotonic() + 10
    while sum(sizes) < 50 and time.monotonic() < deadline:
        for _, b in cons.poll(0.3).items():
            sizes.append(b.num_rows)
            assert b.nbytes <= 2 * 15_000
    assert sum(sizes) == 50 and len(sizes) > 1


def test_poll_joins_small_batches_and_hands_big_ones_over_uncopied(cluster, ctx, shared):
    topic, reps = shared
    tp = TopicPartition(topic, 0)
    base = log_end(reps[0])
    with Producer(ctx, pcfg(linger_ms=0)) as prod:
        for _ in range(3):                                  # 3 batches of ~800 KB
            prod.send_batch(topic, pa.table({"value": [b"x" * 1000] * 800}), partition=0).result(10)
        for _ in range(10):                                 # then 10 small ones
            prod.send_batch(topic, pa.table({"value": [b"y" * 10] * 5}), partition=0).result(10)
    cons = Consumer(ctx, ConsumerConfig(auto_offset_reset="earliest", fetch_max_wait_ms=50))
    cons.assign([tp])
    cons.seek(tp, base)
    polled = []
    deadline = time.monotonic() + 10
    while sum(n for n, _ in polled) < 2450 and time.monotonic() < deadline:
        for _, b in cons.poll(0.3).items():
            polled.append((b.num_rows, b.nbytes))
    cons.close()
    assert sum(n for n, _ in polled) == 2450
    # joined up to 1 MiB per poll (the old poll returned all 2450 rows as one copied batch)
    assert [n for n, _ in polled[:2]] == [800, 800] and all(nb <= 1 << 20 for _, nb in polled), polled
    assert len(polled) <= 5, polled                                 # the small ones come joined


# ------------------------------------------------------------------------------------------ memory bounds
# Issue 7 "Memory": a client's memory is bounded by buffer.memory (producer) and the fetch limits
# (consumer), whatever the topic size. No timings: the producer's reservation is read right after
# each reservation is granted (where its maximum is), the consumer's buffer right after each fetch
# result lands (the only place it grows).
@pytest.fixture(scope="module")
def three(cluster):
    """A 3-partition topic shared by the memory tests."""
    return make_topic(cluster, 3)


def test_producer_reserves_at_most_buffer_memory_until_acknowledged(cluster, ctx, three):
    topic, reps = three
    limit = 32 * 1024
    base = sum(log_end(r) for r in reps)
    prod = Producer(ctx, pcfg(linger_ms=0, batch_size=4096, buffer_memory=limit, max_block_ms=30_000,
                              delivery_timeout_ms=60_000, request_timeout_ms=20_000))
    grants: list[tuple[int, int]] = []   # (bytes reserved when granted, size) of every reservation
    reserve = prod._reserve

    def spy(size):                       # called with the producer lock held, kept across the spy
        reserve(size)
        grants.append((prod._used_bytes - size, size))

    prod._reserve = spy
    value = b"v" * 1000
    try:
        ray.get([r.inject.remote(delay=0.005) for r in reps])   # acks lag: the caller outruns the sender
        futs = [prod.send(topic, value=value, key=b"%015d" % i) for i in range(1500)]      # ~1.5 MB
        small = pa.table({"key": [b"k%d" % i for i in range(10)], "value": [value] * 10})  # ~10 KB
        futs += [prod.send_batch(topic, small) for _ in range(100)]                          # ~1 MB
        big = pa.table({"key": [b"b%d" % i for i in range(100)], "value": [value] * 100})  # ~100 KB > limit
        futs.append(prod.send_batch(topic, big))
        futs += [prod.send_batch(topic, small) for _ in range(10)]
        prod.flush(timeout=60)
        for f in futs:
            f.result(timeout=0)          # every record acknowledged
        assert prod._used_bytes == 0
        # in-flight bytes stay reserved until the call is acknowledged
        ray.get([r.inject.remote(delay=1.0) for r in reps])
        calls = sum(len(c) for c in ray.get([r.get_calls.remote() for r in reps]))
        f = prod.send(topic, value=value, key=b"in-flight")
        deadline = time.monotonic() + 5
        while sum(len(c) for c in ray.get([r.get_calls.remote() for r in reps])) == calls:
            assert time.monotonic() < deadline, "the record was never sent"
            time.sleep(0.01)
        assert not f.done() and prod._used_bytes == grants[-1][1], "released before the acknowledgement"
        f.result(timeout=10)
        assert prod._used_bytes == 0
    finally:
        ray.get([r.inject.remote(delay=0.0) for r in reps])
        prod.close()
    assert sum(log_end(r) for r in reps) - base == 1500 + 110 * 10 + 100 + 1
    assert sum(size for _, size in grants) > 60 * limit           # far more went through than fits
    assert max(size for _, size in grants) > limit                 # the oversized batch
    for held, size in grants:
        # within buffer.memory, except a single reservation larger than it, let through alone
        assert held + size <= limit or held == 0, (held, size, limit)
    assert max(held for held, _ in grants) > limit // 2, "the buffer was never close to full: no test"


def test_consumer_holds_at_most_one_fetch_result_per_partition(cluster, ctx, three):
    topic, reps = three
    limit = 64 * 1024
    tps = [TopicPartition(topic, p) for p in range(3)]
    start = {tp: log_end(reps[tp.partition]) for tp in tps}
    small = pa.table({"value": [b"x" * 100] * 100})      # ~11 KB per stored batch
    big = pa.table({"value": [b"y" * 100] * 1000})       # ~110 KB: alone above the fetch limit
    # one stored batch per send_batch; 450 queued at once may wait past the 5 s default when loaded
    with Producer(ctx, pcfg(linger_ms=0, batch_size=1, delivery_timeout_ms=60_000)) as prod:
        futs = [prod.send_batch(topic, big if i == 60 else small, partition=p) for p in range(3) for i in range(150)]
        prod.flush(timeout=60)
        for f in futs:
            f.result(timeout=0)
    total = sum(log_end(reps[tp.partition]) - start[tp] for tp in tps)
    cons = Consumer(ctx, ConsumerConfig(max_partition_fetch_bytes=limit, fetch_max_wait_ms=50))
    cons.assign(tps)
    for tp in tps:
        cons.seek(tp, start[tp])
    peaks = {tp: 0 for tp in tps}
    largest = [0]
    on_fetch = cons._on_fetch

    def spy(ps, ref):
        on_fetch(ps, ref)
        assert ps.ref is None and len(cons._refs) < len(tps), "a second fetch in flight for a partition"
        # the bytes the fetch limit counts: the stored batches, without the offset column added on read
        sizes = [b.nbytes - b.column(0).nbytes for b in ps.buffer]
        assert sum(sizes) <= limit or len(sizes) == 1, (ps.tp, sizes)   # one fetch result at most
        peaks[ps.tp] = max(peaks[ps.tp], sum(sizes))
        largest[0] = max([largest[0], *sizes])

    cons._on_fetch = spy
    got = read = 0
    deadline = time.monotonic() + 15
    try:
        while got < total and time.monotonic() < deadline:
            for b in cons.poll(0.5).values():
                got += b.num_rows
                read += b.nbytes - b.column(0).nbytes
    finally:
        cons.close()
    assert got == total == 3 * (149 * 100 + 1000)
    assert read > 20 * len(tps) * limit, read                            # the topic is many times the bound
    assert largest[0] > limit
    assert sum(peaks.values()) <= len(tps) * max(limit, largest[0]), (peaks, largest)
    assert min(peaks.values()) > limit // 2, ("the limit was never approached: no test", peaks)


def test_buffer_memory_counts_what_a_queued_send_record_holds(cluster, ctx, three):
    """buffer.memory bounds the heap send()'s queue takes, not only the bytes it will send: records
    built per call (the queue then owns the key and value objects) are reserved for at least what
    they hold in Python memory while queued."""
    import gc
    import tracemalloc

    topic, reps = three
    n = 50_000
    prod = Producer(ctx, pcfg(linger_ms=600_000, batch_size=1 << 30, buffer_memory=1 << 30,
                              delivery_timeout_ms=60_000))
    try:
        prod.send(topic, value=b"w", partition=0)    # metadata, handles, sender thread
        prod.flush(timeout=10)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                prod.send(topic, value=b"%0100d" % i, key=b"%016d" % i)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        reserved = prod._used_bytes
        assert reserved >= held, (reserved, held, "buffer.memory undercounts the queue")
        assert reserved <= 1.5 * held, (reserved, held, "buffer.memory overcounts the queue")
        prod.flush(timeout=30)
        assert prod._used_bytes == 0
    finally:
        prod.close()
    assert sum(log_end(r) for r in reps) >= n + 1

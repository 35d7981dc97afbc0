"""Client parts that need no Ray: murmur2, sticky partitioning, futures, batch preparation."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from ray_broker.client.batching import (compute_partitions, encoded_size, normalize_batch, plan_batch,
                                        split_by_partition, split_by_size)
from ray_broker.client.futures import BatchFuture, BatchState, RecordFuture
from ray_broker.client.partitioner import (StickyPartitioner, murmur2, murmur2_many, partition_for_key,
                                           partitions_for_keys)
from ray_broker.client.producer import SEQUENCE_MODULUS, IdempotenceState
from ray_broker.errors import (BrokerTimeoutError, NotLeaderOrFollowerError, RecordTooLargeError,
                               SchemaMismatchError, UnknownTopicOrPartitionError)
from ray_broker.records import (HEADERS_TYPE, TIMESTAMP_TYPE, WIRE_IPC_MAX_BYTES, BatchMetadata, RecordMetadata,
                                from_wire, stored_schema, to_wire)

# Kafka's own test vectors (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java)
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


# ----------------------------------------------------------------------------------------- murmur2
@pytest.mark.parametrize("key,expected", list(KAFKA_VECTORS.items()))
def test_murmur2_kafka_vectors(key, expected):
    assert murmur2(key) == expected


def test_murmur2_vectorised_matches_vectors_and_scalar():
    keys = list(KAFKA_VECTORS)
    h, valid = murmur2_many(keys)
    assert valid.all()
    assert h.dtype == np.int32
    assert h.tolist() == list(KAFKA_VECTORS.values())


def test_murmur2_vectorised_mixed_lengths_nulls_and_str():
    rng = random.Random(7)
    keys = []
    for _ in range(2000):
        r = rng.random()
        if r < 0.1:
            keys.append(None)
        elif r < 0.15:
            keys.append(b"")
        else:
            keys.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))))
    h, valid = murmur2_many(keys)
    for k, hv, ok in zip(keys, h.tolist(), valid.tolist()):
        if k is None:
            assert not ok
        else:
            assert ok and hv == murmur2(k)
    # Arrow input, string type, sliced array
    arr = pa.array(["héllo", None, "x" * 17, "abc"]).slice(1)
    h2, v2 = murmur2_many(arr)
    assert v2.tolist() == [False, True, True]
    assert h2[1:].tolist() == [murmur2(b"x" * 17), murmur2(b"abc")]


def test_murmur2_equal_length_fast_path():
    keys = [f"key-{i:06d}".encode() for i in range(5000)]
    h, _ = murmur2_many(pa.array(keys, pa.binary()))
    assert [murmur2(k) for k in keys[:200]] == h[:200].tolist()
    parts = partitions_for_keys(keys, 12)
    assert parts.tolist()[:200] == [partition_for_key(k, 12) for k in keys[:200]]
    assert set(parts.tolist()) == set(range(12))
    # the keys as a view of the data buffer: also for a slice, whose keys start mid-buffer
    sliced = pa.array(keys, pa.binary()).slice(1234, 3000)
    hs, _ = murmur2_many(sliced)
    assert hs.tolist() == [murmur2(k) for k in keys[1234:4234]]


def test_partition_for_key_is_positive_modulo():
    # toPositive(h) = h & 0x7fffffff, as Kafka's BuiltInPartitioner
    for k, h in KAFKA_VECTORS.items():
        assert partition_for_key(k, 7) == (h & 0x7FFFFFFF) % 7
    assert partitions_for_keys([None, b"abc"], 7).tolist() == [-1, (479470107 & 0x7FFFFFFF) % 7]


# ----------------------------------------------------------------------------------------- sticky
def test_sticky_partitioner_sticks_until_batch_sent():
    sp = StickyPartitioner(random.Random(1))
    p = sp.partition("t", 5)
    assert all(sp.partition("t", 5) == p for _ in range(10))
    sp.on_batch_sent("t", (p + 1) % 5, 5)   # another partition's batch: no switch
    assert sp.partition("t", 5) == p
    sp.on_batch_sent("t", p, 5)
    q = sp.partition("t", 5)
    assert q != p
    # prefers available partitions
    sp.on_batch_sent("t", q, 5, available=[3])
    assert sp.partition("t", 5) == 3 or q == 3
    assert StickyPartitioner().partition("single", 1) == 0


# ----------------------------------------------------------------------------------------- futures
def test_record_futures_share_state_and_complete_in_o1():
    st = BatchState("t")
    futs = [RecordFuture(st, i) for i in range(4)]
    seen = []
    futs[0].add_done_callback(lambda f: seen.append(f))
    assert not futs[0].done()
    st.set_rows(np.array([0, 1, 0, 1]))
    st.add_pieces(2)
    st.seal()
    st.piece_succeeded(np.array([0, 2]), 10)
    assert not futs[0].done()
    st.piece_succeeded(np.array([1, 3]), 50)
    assert all(f.done() for f in futs)
    assert seen == [futs[0]]
    assert futs[2].result() == RecordMetadata("t", 0, 11)
    assert futs[3].result(timeout=0) == RecordMetadata("t", 1, 51)
    assert futs[1].exception() is None
    late = []
    futs[1].add_done_callback(late.append)   # already done: called immediately
    assert late == [futs[1]]


def test_future_partial_failure_and_exception():
    st = BatchState("t")
    st.set_rows(np.array([0, 1, 0]))
    st.add_pieces(2)
    st.seal()
    err = NotLeaderOrFollowerError("boom")
    st.piece_failed(np.array([1]), err)
    st.piece_succeeded(np.array([0, 2]), 0)
    f0, f1 = RecordFuture(st, 0), RecordFuture(st, 1)
    assert f0.result().offset == 0
    assert f1.exception() is err
    with pytest.raises(NotLeaderOrFollowerError):
        f1.result()
    bf = BatchFuture(st)
    with pytest.raises(NotLeaderOrFollowerError):
        bf.result()
    assert bf.state.offsets.tolist() == [0, -1, 1]


def test_future_timeout_and_cross_thread_completion():
    st = BatchState("t")
    f = RecordFuture(st, 0)
    t0 = time.monotonic()
    with pytest.raises(BrokerTimeoutError):
        f.result(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04
    with pytest.raises(TimeoutError):   # BrokerTimeoutError is also a TimeoutError
        f.exception(timeout=0.01)
    st.set_rows(np.array([3]))
    st.add_pieces(1)
    st.seal()
    threading.Timer(0.05, lambda: st.piece_succeeded(np.array([0]), 7)).start()
    assert f.result(timeout=5) == RecordMetadata("t", 3, 7)


def test_future_fail_all_and_callback_errors_are_contained():
    st = BatchState("t", 2)
    f = BatchFuture(st)
    f.add_done_callback(lambda _: 1 / 0)   # logged, not raised
    calls = []
    f.add_done_callback(calls.append)
    st.fail(RecordTooLargeError("big"))
    assert calls == [f]
    with pytest.raises(RecordTooLargeError):
        f.result()
    st.fail(ValueError("second"))          # no effect once complete
    assert isinstance(f.exception(), RecordTooLargeError)


def test_batch_future_result():
    st = BatchState("t", 3)
    st.set_rows(np.array([2, 2, 2]))
    st.add_pieces(1)
    st.piece_succeeded(np.arange(3), 100)
    st.seal()
    md = BatchFuture(st).result()
    assert isinstance(md, BatchMetadata)
    assert md.offsets.tolist() == [100, 101, 102] and md.partitions.tolist() == [2, 2, 2]


def test_idempotence_state_sequences_wrap():
    s = IdempotenceState()
    assert s.assign("t", 0, 5) == (-1, -1, -1)
    s.enabled, s.producer_id, s.producer_epoch = True, 9, 1
    assert s.assign("t", 0, 3) == (9, 1, 5)
    assert s.assign("t", 1, 3) == (9, 1, 0)
    s.next_sequence[("t", 0)] = SEQUENCE_MODULUS - 2
    assert s.assign("t", 0, 5)[2] == SEQUENCE_MODULUS - 2
    assert s.next_sequence[("t", 0)] == 3


# ----------------------------------------------------------------------------------------- batches
def test_normalize_casts_strings_and_fills_timestamp():
    t = pa.table({"key": pa.array(["a", None], pa.large_string()), "value": ["x", "y"]})
    b = normalize_batch(t, None, now=1234)
    assert b.schema.equals(stored_schema(None))
    assert b.column("key").to_pylist() == [b"a", None]
    assert b.column("value").to_pylist() == [b"x", b"y"]
    assert b.column("timestamp").cast(pa.int64()).to_pylist() == [1234, 1234]
    assert b.column("headers").null_count == 2


def test_normalize_timestamp_variants_and_headers():
    hdrs = pa.array([[("h", b"1")], None], HEADERS_TYPE)
    b = normalize_batch(pa.record_batch({"value": [b"a", b"b"], "headers": hdrs,
                                         "timestamp": pa.array([5, None], pa.int64())}), None, now=99)
    assert b.column("timestamp").cast(pa.int64()).to_pylist() == [5, 99]
    assert b.column("headers").to_pylist()[0] == [{"key": "h", "value": b"1"}]
    ts = pa.array([1_000_000_000], pa.timestamp("ns"))
    b2 = normalize_batch(pa.record_batch({"value": [b"a"], "timestamp": ts}), None)
    assert b2.column("timestamp").type == TIMESTAMP_TYPE
    assert b2.column("timestamp").cast(pa.int64()).to_pylist() == [1000]


def test_normalize_schema_mismatches_raise():
    with pytest.raises(SchemaMismatchError):
        normalize_batch(pa.record_batch({"value": [1, 2]}), None)
    with pytest.raises(SchemaMismatchError):
        normalize_batch(pa.record_batch({"value": [b"a"], "extra": [1]}), None)
    with pytest.raises(SchemaMismatchError):
        normalize_batch(pa.record_batch({"value": [b"a"], "timestamp": ["x"]}), None)
    user = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("name", pa.string())])
    ok = normalize_batch(pa.record_batch({"id": [1, 2]}, schema=pa.schema([pa.field("id", pa.int64())])), user)
    assert ok.schema.equals(stored_schema(user)) and ok.column("name").null_count == 2
    with pytest.raises(SchemaMismatchError):
        normalize_batch(pa.record_batch({"id": pa.array([1], pa.int32())}), user)
    with pytest.raises(SchemaMismatchError):
        normalize_batch(pa.record_batch({"name": ["x"]}), user)   # required column missing


def test_compute_partitions_explicit_keyed_sticky():
    b = normalize_batch(pa.table({"key": [b"abc", None, b"21"], "value": [b"1", b"2", b"3"]}), None, now=0)
    sp = StickyPartitioner(random.Random(3))
    parts = compute_partitions(b, 4, "t", sp, key_column="key")
    assert parts[0] == partition_for_key(b"abc", 4) and parts[2] == partition_for_key(b"21", 4)
    assert parts[1] == sp.partition("t", 4)
    assert compute_partitions(b, 4, "t", sp, partition=2).tolist() == [2, 2, 2]
    with pytest.raises(UnknownTopicOrPartitionError, match="partition 4"):
        compute_partitions(b, 4, "t", sp, partition=4)
    explicit = np.array([3, -1, -1])
    parts = compute_partitions(b, 4, "t", sp, key_column="key", explicit=explicit)
    assert parts[0] == 3 and parts[2] == partition_for_key(b"21", 4)
    # no key column: whole batch sticky
    nk = compute_partitions(b, 4, "t", sp)
    assert len(set(nk.tolist())) == 1


def test_split_by_partition_and_size():
    n = 100
    b = normalize_batch(pa.table({"value": [bytes([i % 256]) * 100 for i in range(n)]}), None, now=0)
    parts = np.array([i % 3 for i in range(n)])
    pieces = split_by_partition(b, parts)
    assert [p for p, _, _ in pieces] == [0, 1, 2]
    for p, sub, rows in pieces:
        assert (parts[rows] == p).all()
        assert sub.column("value").to_pylist() == [b.column("value")[int(r)].as_py() for r in rows]
    limit = 1000
    plan = plan_batch(b, parts, limit)
    assert all(sub.nbytes <= limit for _, sub, _ in plan)
    all_rows = np.sort(np.concatenate([rows for _, _, rows in plan]))
    assert all_rows.tolist() == list(range(n))
    for p, sub, rows in plan:   # rows stay in input order inside each partition
        assert (np.diff(rows) > 0).all()
    # partition numbers past int16 keep the int64 sort
    wide = np.array([40_000 + i % 3 for i in range(n)])
    assert [p for p, _, _ in split_by_partition(b, wide)] == [40_000, 40_001, 40_002]


def test_single_oversized_row_raises():
    b = normalize_batch(pa.table({"value": [b"x" * 10, b"y" * 5000]}), None, now=0)
    with pytest.raises(RecordTooLargeError):
        split_by_size(b, np.arange(2), 1000)
    with pytest.raises(RecordTooLargeError):
        plan_batch(b, np.zeros(2, dtype=np.int64), 1000)


def test_split_by_size_uses_the_encoded_size_not_nbytes():
    """A key/value batch whose Arrow nbytes is under the limit but whose IPC encoding (padding,
    offsets of the all-null headers column) is over it is split; every chunk encodes under it."""
    n = 60_000
    rb = normalize_batch(pa.RecordBatch.from_pydict({"key": [b"k" * 16] * n, "value": [b"v" * 100] * n}), None, 0)
    limit = (rb.nbytes + encoded_size(rb)) // 2
    assert rb.nbytes < limit < encoded_size(rb)
    chunks = split_by_size(rb, np.arange(n), limit)
    assert len(chunks) >= 2
    assert all(encoded_size(c) <= limit for c, _ in chunks)
    assert np.array_equal(np.concatenate([r for _, r in chunks]), np.arange(n))


def test_wire_format_small_batches_as_ipc_bytes_big_ones_as_batches():
    small = normalize_batch(pa.table({"key": [b"k1", None], "value": [b"v1", b"v2"]}).to_batches()[0], None)
    wire = to_wire(small)
    assert isinstance(wire, bytes)
    assert from_wire(wire).equals(small) and from_wire(small) is small
    big = pa.record_batch([pa.array([b"x" * 1000] * (WIRE_IPC_MAX_BYTES // 1000 + 10))], names=["value"])
    assert to_wire(big) is big


def test_wire_format_rejects_what_is_not_one_ipc_batch():
    from ray_broker.errors import CorruptRecordError, InvalidRequestError
    with pytest.raises(InvalidRequestError):
        from_wire({"value": [b"x"]})
    with pytest.raises(CorruptRecordError):
        from_wire(b"not arrow at all")
    wire = to_wire(pa.record_batch([pa.array([1, 2])], names=["a"]))
    with pytest.raises(CorruptRecordError):
        from_wire(wire[: len(wire) // 2])        # truncated

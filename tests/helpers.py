"""Small helpers for integration tests."""
from __future__ import annotations

import time


def wait_for(predicate, timeout=30.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def stored_batch(values, keys=None, ts=1_700_000_000_000):
    """A batch in the default topic's stored schema, for calling replica actors directly."""
    import pyarrow as pa

    from ray_broker.records import HEADERS_TYPE, TIMESTAMP_TYPE, stored_schema

    n = len(values)
    return pa.RecordBatch.from_arrays([
        pa.array([ts] * n, pa.int64()).cast(TIMESTAMP_TYPE),
        pa.array(keys if keys is not None else [None] * n, pa.binary()),
        pa.array(values, pa.binary()),
        pa.nulls(n, HEADERS_TYPE)], schema=stored_schema(None))


def replica(topic, partition, replica_id, namespace="ray_broker"):
    import ray

    return ray.get_actor(f"replica/{topic}/{partition}/{replica_id}", namespace=namespace)


def leader_of(admin, topic, partition=0):
    return admin.describe_topic(topic).partitions[partition].leader


def poll_rows(consumer, expected, polls=100, poll_s=0.2):
    """Rows polled until `expected` came or `polls` polls passed: the count (the caller asserts it)."""
    seen = 0
    for _ in range(polls):
        seen += sum(b.num_rows for b in consumer.poll(poll_s).values())
        if seen >= expected:
            break
    return seen


def read_partition(cluster, topic, partition, isolation="read_committed", timeout=60):
    """Every record of one partition as a list of (offset, key, value)."""
    import ray_broker as rb

    consumer = cluster.consumer(isolation_level=isolation, auto_offset_reset="earliest")
    tp = rb.TopicPartition(topic, partition)
    consumer.assign([tp])
    end = consumer.end_offsets([tp])[tp]
    rows = []
    deadline = time.monotonic() + timeout
    while consumer.position(tp) < end and time.monotonic() < deadline:
        for batch in consumer.poll(timeout=1.0).values():
            rows.extend(zip(batch.column("offset").to_pylist(), batch.column("key").to_pylist(),
                            batch.column("value").to_pylist()))
    consumer.close()
    return rows

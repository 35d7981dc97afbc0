"""Bad input gets the named error with a message naming the problem, and the log is unchanged."""
from __future__ import annotations

import pyarrow as pa
import pytest

import ray_broker as rb

pytestmark = pytest.mark.timeout(120)


def test_unknown_topic(broker):
    admin = broker.admin()
    with pytest.raises(rb.UnknownTopicOrPartitionError, match="no-such-topic"):
        admin.describe_topic("no-such-topic")
    producer = broker.producer()
    with pytest.raises(rb.UnknownTopicOrPartitionError, match="no-such-topic"):
        producer.send("no-such-topic", value=b"x").result(timeout=30)
    consumer = broker.consumer()
    with pytest.raises(rb.UnknownTopicOrPartitionError):
        consumer.assign([rb.TopicPartition("no-such-topic", 0)])


@pytest.mark.parametrize("name", ["bad name", "", "__internal", "x" * 250, "a/b"])
def test_bad_topic_name(broker, name):
    with pytest.raises(rb.InvalidTopicError, match="topic name"):
        broker.admin().create_topic(name)
    assert name not in broker.admin().list_topics(include_internal=True)


def test_bad_partitions_and_replication_factor(broker, topic_name):
    admin = broker.admin()
    with pytest.raises(rb.InvalidPartitionsError, match="partitions"):
        admin.create_topic(topic_name, partitions=0)
    with pytest.raises(rb.InvalidReplicationFactorError, match="replication.factor.max"):
        admin.create_topic(topic_name, replication_factor=6)
    with pytest.raises(rb.InvalidReplicationFactorError):
        admin.create_topic(topic_name, replication_factor=0)
    assert topic_name not in admin.list_topics()


def test_invalid_configs(broker, topic_name):
    admin = broker.admin()
    with pytest.raises(rb.InvalidConfigError, match="retention_mss"):
        admin.create_topic(topic_name, config={"retention.mss": 1})
    with pytest.raises(rb.InvalidConfigError, match="compression.type"):
        admin.create_topic(topic_name, config={"compression.type": "gzip"})
    with pytest.raises(rb.InvalidConfigError, match="min.insync.replicas"):
        admin.create_topic(topic_name, replication_factor=1, config={"min.insync.replicas": 2})
    assert topic_name not in admin.list_topics()
    with pytest.raises(rb.InvalidConfigError, match="lingr_ms"):
        broker.producer(lingr_ms=5)
    with pytest.raises(rb.InvalidConfigError, match="isolation.level"):
        broker.consumer(isolation_level="read_sometimes")
    with pytest.raises(rb.InvalidConfigError, match="acks"):
        broker.producer(acks="most")


def test_record_too_large_leaves_log_unchanged(broker, topic_name):
    admin = broker.admin()
    admin.create_topic(topic_name, config={"max.message.bytes": 10_000})
    producer = broker.producer(max_message_bytes=1_000_000)
    producer.send(topic_name, value=b"ok").result(timeout=30)
    with pytest.raises(rb.RecordTooLargeError):
        producer.send(topic_name, value=b"x" * 50_000).result(timeout=30)
    assert admin.describe_topic(topic_name).partitions[0].high_watermark == 1
    small = broker.producer()           # the client's own limit (8 MiB) is checked before sending
    with pytest.raises(rb.RecordTooLargeError):
        small.send(topic_name, value=b"x" * (9 * 1024 * 1024)).result(timeout=30)
    assert admin.describe_topic(topic_name).partitions[0].high_watermark == 1


def test_schema_mismatch_appends_nothing(broker, topic_name):
    admin = broker.admin()
    schema = pa.schema([("id", pa.int64()), ("score", pa.float32())])
    admin.create_topic(topic_name, schema=schema)
    producer = broker.producer()
    good = pa.record_batch({"id": pa.array([1, 2], pa.int64()), "score": pa.array([0.5, 1.5], pa.float32())})
    producer.send_batch(topic_name, good).result(timeout=30)
    wrong_type = pa.record_batch({"id": pa.array(["a", "b"]), "score": pa.array([0.5, 1.5], pa.float32())})
    with pytest.raises(rb.SchemaMismatchError, match="id"):
        producer.send_batch(topic_name, wrong_type).result(timeout=30)
    extra = good.append_column("other", pa.array([1, 2]))
    with pytest.raises(rb.SchemaMismatchError, match="other"):
        producer.send_batch(topic_name, extra).result(timeout=30)
    with pytest.raises(rb.SchemaMismatchError, match="reserved"):
        admin.create_topic(topic_name + "-r", schema=pa.schema([("offset", pa.int64())]))
    assert admin.describe_topic(topic_name).partitions[0].high_watermark == 2


def test_schema_evolution_adds_nullable_columns(broker, topic_name):
    admin = broker.admin()
    v1 = pa.schema([("id", pa.int64())])
    admin.create_topic(topic_name, schema=v1)
    producer = broker.producer()
    producer.send_batch(topic_name, pa.record_batch({"id": pa.array([1, 2], pa.int64())})).result(timeout=30)
    with pytest.raises(rb.SchemaMismatchError, match="nullable"):
        admin.alter_topic_schema(topic_name, v1.append(pa.field("y", pa.string(), nullable=False)))
    v2 = v1.append(pa.field("y", pa.string()))
    admin.alter_topic_schema(topic_name, v2)
    producer2 = broker.producer()
    producer2.send_batch(topic_name, pa.record_batch({"id": pa.array([3], pa.int64()), "y": pa.array(["new"])})
                         ).result(timeout=60)
    consumer = broker.consumer(auto_offset_reset="earliest")
    tp = rb.TopicPartition(topic_name, 0)
    consumer.assign([tp])
    rows = []
    while len(rows) < 3:
        for batch in consumer.poll(timeout=2.0).values():
            rows.extend(batch.select(["id", "y"]).to_pylist())
    assert rows == [{"id": 1, "y": None}, {"id": 2, "y": None}, {"id": 3, "y": "new"}]

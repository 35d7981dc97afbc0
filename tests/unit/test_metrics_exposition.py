"""Pure: a cluster snapshot -> Prometheus families (no Ray)."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ray_broker.group.lag import ConsumerGroupDescription, PartitionLag
from ray_broker.group.state import GroupState
from ray_broker.metrics.counters import ReplicaCounters
from ray_broker.metrics.exposition import ClusterSnapshot, render
from ray_broker.protocol import PartitionDescription, TopicDescription
from ray_broker.txn.coordinator import TxnDescription


def parse(text: str) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(m: dict, name: str, **labels):
    return m.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def part(p, leader, replicas, isr, hw):
    return PartitionDescription(p, leader, replicas, isr, leader_epoch=1, log_start_offset=0, high_watermark=hw,
                                last_stable_offset=hw)


def snapshot():
    topic = TopicDescription("t", "id", [part(0, 0, [0, 1, 2], [0, 1, 2], 10),   # healthy
                                         part(1, 1, [0, 1, 2], [1], 7),           # under min ISR 2
                                         part(2, None, [0, 1, 2], [], 0)],        # offline
                             {"min_insync_replicas": 2}, None)
    c = ReplicaCounters()
    c.produce_requests = 4
    c.on_append(10, 1234)
    reports = {"t/0/0": {"role": "leader", "log_end_offset": 10, "size_bytes": 5000,
                         "counters": {**c.as_dict(), "duplicates_dropped": 1, "out_of_order_refused": 0,
                                      "fenced_refused": 0}},
               "t/0/1": {"role": "follower", "log_end_offset": 6, "size_bytes": 3000,
                         "counters": ReplicaCounters().as_dict()}}
    group = ConsumerGroupDescription("g", GroupState.STABLE, 3, "range", None, (), {}, (),
                                     partitions=(PartitionLag("t", 0, None, None, 4, 10, 6),
                                                 PartitionLag("t", 1, None, None, None, 7, None)))
    txns = [TxnDescription("a", "ONGOING", 7, 0, 60_000, 95_000, 95_000, (("t", 0),)),
            TxnDescription("b", "PREPARE_COMMIT", 8, 0, 60_000, 99_000, 99_500, (("t", 1),)),
            TxnDescription("c", "COMPLETE_COMMIT", 9, 0, 60_000, 10_000, 11_000, ())]
    return ClusterSnapshot(5, ["n1", "n2"], [topic], reports, [group], txns, taken_ms=100_000)


def test_partition_health_counts_follow_kafkas_definitions():
    m = parse(render(snapshot()))
    assert get(m, "ray_broker_controller_epoch") == 5 and get(m, "ray_broker_nodes_alive") == 2
    assert get(m, "ray_broker_metrics_collect_errors") == 0
    partial = ClusterSnapshot(5, errors=["list_transactions: BrokerTimeoutError()"])
    assert get(parse(render(partial)), "ray_broker_metrics_collect_errors") == 1
    assert get(m, "ray_broker_under_replicated_partitions") == 2        # partitions 1 and 2
    assert get(m, "ray_broker_under_min_isr_partitions") == 1           # 1 (2 has no leader: offline)
    assert get(m, "ray_broker_offline_partitions") == 1
    assert get(m, "ray_broker_partition_leader", topic="t", partition=2) == -1
    assert get(m, "ray_broker_partition_in_sync_replicas", topic="t", partition=1) == 1
    assert get(m, "ray_broker_partition_high_watermark", topic="t", partition=0) == 10


def test_replica_counters_and_follower_lag():
    m = parse(render(snapshot()))
    lead, fol = dict(topic="t", partition=0, replica=0), dict(topic="t", partition=0, replica=1)
    assert get(m, "ray_broker_replica_records_in_total", **lead) == 10
    assert get(m, "ray_broker_replica_bytes_in_total", **lead) == 1234
    assert get(m, "ray_broker_replica_produce_requests_total", **lead) == 4
    assert get(m, "ray_broker_replica_duplicate_batches_total", **lead) == 1
    assert get(m, "ray_broker_replica_follower_lag", **fol) == 4        # leader HW 10 - follower LEO 6
    assert get(m, "ray_broker_replica_follower_lag", **lead) is None    # only followers lag
    assert get(m, "ray_broker_replica_is_leader", **fol) == 0


def test_group_lag_and_state():
    m = parse(render(snapshot()))
    assert get(m, "ray_broker_consumergroup_lag", group="g", topic="t", partition=0) == 6
    assert get(m, "ray_broker_consumergroup_lag", group="g", topic="t", partition=1) is None   # nothing committed
    assert get(m, "ray_broker_consumergroup_committed_offset", group="g", topic="t", partition=0) == 4
    assert get(m, "ray_broker_consumergroup_state", group="g", state="STABLE") == 1


def test_counters_count_fetched_rows_and_bytes():
    import pyarrow as pa

    c = ReplicaCounters()
    b = pa.record_batch({"v": pa.array([b"x" * 10] * 3)})
    c.on_fetch([b, b])
    c.on_replicate(100)
    assert (c.fetch_requests, c.records_out, c.bytes_out) == (1, 6, 2 * b.nbytes)
    assert (c.replication_requests, c.replication_bytes_in) == (1, 100)


def test_transactions_by_state_and_the_oldest_open_one():
    m = parse(render(snapshot()))
    assert get(m, "ray_broker_transactions", state="ONGOING") == 1
    assert get(m, "ray_broker_transactions", state="COMPLETE_COMMIT") == 1
    assert get(m, "ray_broker_transaction_oldest_open_seconds") == 5.0   # "a", started at 95 s; "c" ended
    none_open = ClusterSnapshot(1, taken_ms=100_000, transactions=snapshot().transactions[2:])
    assert get(parse(render(none_open)), "ray_broker_transaction_oldest_open_seconds") == 0

"""A broker snapshot as Prometheus metric families. Pure: no Ray; the snapshot is plain data.

Names follow Prometheus conventions (`ray_broker_` prefix, `_total` counters); where Kafka has a
metric with the same meaning its name is given in the help text (UnderReplicatedPartitions,
OfflinePartitionsCount, MessagesInPerSec, ...), so dashboards translate one to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

PREFIX = "ray_broker_"

# (status key, metric name without prefix/_total, help): counters every replica reports
_REPLICA_COUNTERS = (
    ("produce_requests", "replica_produce_requests", "produce calls taken as leader"),
    ("records_in", "replica_records_in", "records appended as leader (Kafka: MessagesInPerSec)"),
    ("bytes_in", "replica_bytes_in", "bytes appended as leader, Arrow frames (Kafka: BytesInPerSec)"),
    ("fetch_requests", "replica_fetch_requests", "consumer fetch calls answered"),
    ("records_out", "replica_records_out", "records returned to consumers"),
    ("bytes_out", "replica_bytes_out", "Arrow bytes returned to consumers (Kafka: BytesOutPerSec)"),
    ("replication_requests", "replica_replication_requests", "replication pushes taken as follower"),
    ("replication_bytes_in", "replica_replication_bytes_in", "bytes appended as follower"),
    ("duplicates_dropped", "replica_duplicate_batches",
     "retried batches recognised by producer id and sequence and not appended again"),
    ("out_of_order_refused", "replica_out_of_order_sequence",
     "batches refused for a sequence gap (Kafka: OUT_OF_ORDER_SEQUENCE_NUMBER)"),
    ("fenced_refused", "replica_fenced_producer", "batches refused from a fenced producer epoch"),
)


@dataclass
class ClusterSnapshot:
    """What one scrape reads from a running broker (`metrics.collect.snapshot`)."""
    controller_epoch: int
    nodes: list = field(default_factory=list)
    topics: list = field(default_factory=list)        # protocol.TopicDescription
    reports: dict = field(default_factory=dict)       # "topic/partition/replica" -> replica status dict
    groups: list = field(default_factory=list)        # group.lag.ConsumerGroupDescription
    transactions: list = field(default_factory=list)  # txn.coordinator.TxnDescription
    taken_ms: int = 0                                 # wall clock when taken (transaction ages)
    errors: list = field(default_factory=list)        # parts left out of this snapshot, and why


def _gauge(name: str, doc: str, labels: tuple = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


def metric_families(snap: ClusterSnapshot) -> list:
    out = []
    g = _gauge("controller_epoch", "epoch of the active controller")
    g.add_metric([], snap.controller_epoch)
    out.append(g)
    g = _gauge("nodes_alive", "Ray nodes alive")
    g.add_metric([], len(snap.nodes))
    out.append(g)
    g = _gauge("metrics_collect_errors", "parts of this scrape left out because a coordinator call failed "
                                         "(the broker logs which)")
    g.add_metric([], len(snap.errors))
    out.append(g)
    out += _partition_families(snap)
    out += _replica_families(snap)
    out += _group_families(snap)
    out += _transaction_families(snap)
    return out


def _partition_families(snap: ClusterSnapshot) -> list:
    labels = ("topic", "partition")
    gauges = {
        "high_watermark": _gauge("partition_high_watermark", "offset below which records are replicated to the ISR",
                                 labels),
        "last_stable_offset": _gauge("partition_last_stable_offset",
                                     "offset below which every transaction is decided (read_committed end)", labels),
        "log_start_offset": _gauge("partition_log_start_offset", "first offset still in the log", labels),
        "leader": _gauge("partition_leader", "replica id of the leader, -1 without one", labels),
        "replicas": _gauge("partition_replicas", "assigned replicas", labels),
        "isr": _gauge("partition_in_sync_replicas", "replicas in the ISR", labels),
        "under": _gauge("partition_under_replicated", "1 when the ISR is smaller than the replica set", labels),
        "under_min": _gauge("partition_under_min_isr",
                            "1 when the ISR is smaller than min.insync.replicas (acks=all writes fail)", labels),
    }
    under = offline = under_min = 0
    for t in snap.topics:
        min_isr = int((t.config or {}).get("min_insync_replicas", 1))
        for p in t.partitions:
            lv = [t.name, str(p.partition)]
            is_under = len(p.isr) < len(p.replicas)
            is_under_min = p.leader is not None and len(p.isr) < min_isr
            under += is_under
            under_min += is_under_min
            offline += p.leader is None
            for key, value in (("high_watermark", p.high_watermark), ("last_stable_offset", p.last_stable_offset),
                               ("log_start_offset", p.log_start_offset),
                               ("leader", -1 if p.leader is None else p.leader), ("replicas", len(p.replicas)),
                               ("isr", len(p.isr)), ("under", int(is_under)), ("under_min", int(is_under_min))):
                gauges[key].add_metric(lv, value)
    totals = []
    for name, doc, value in (
            ("under_replicated_partitions", "partitions whose ISR is smaller than their replica set "
                                            "(Kafka: UnderReplicatedPartitions)", under),
            ("under_min_isr_partitions", "partitions whose ISR is below min.insync.replicas "
                                         "(Kafka: UnderMinIsrPartitionCount)", under_min),
            ("offline_partitions", "partitions without a leader (Kafka: OfflinePartitionsCount)", offline)):
        g = _gauge(name, doc)
        g.add_metric([], value)
        totals.append(g)
    return list(gauges.values()) + totals


def _replica_families(snap: ClusterSnapshot) -> list:
    labels = ("topic", "partition", "replica")
    leo = _gauge("replica_log_end_offset", "offset the next appended record gets on this replica", labels)
    size = _gauge("replica_size_bytes", "bytes of the replica's segments on disk", labels)
    leader = _gauge("replica_is_leader", "1 on the partition's leader", labels)
    lag = _gauge("replica_follower_lag", "leader's high watermark minus this follower's log end offset "
                                         "(Kafka: consumer-fetch lag of a follower)", labels)
    counters = {key: CounterMetricFamily(PREFIX + name, doc, labels=list(labels))
                for key, name, doc in _REPLICA_COUNTERS}
    hw = {(t.name, p.partition): p.high_watermark for t in snap.topics for p in t.partitions}
    for key in sorted(snap.reports):
        r = snap.reports[key]
        topic, partition, replica = key.rsplit("/", 2)
        lv = [topic, partition, replica]
        leo.add_metric(lv, r.get("log_end_offset", 0))
        size.add_metric(lv, r.get("size_bytes", 0))
        is_leader = r.get("role") == "leader"
        leader.add_metric(lv, int(is_leader))
        leader_hw = hw.get((topic, int(partition)))
        if not is_leader and leader_hw is not None and leader_hw >= 0:
            lag.add_metric(lv, max(0, leader_hw - r.get("log_end_offset", 0)))
        values = r.get("counters") or {}
        for k, fam in counters.items():
            if k in values:
                fam.add_metric(lv, values[k])
    return [leo, size, leader, lag, *counters.values()]


def _group_families(snap: ClusterSnapshot) -> list:
    members = _gauge("consumergroup_members", "members of the consumer group", ("group",))
    state = _gauge("consumergroup_state", "1 for the group's current state", ("group", "state"))
    plabels = ("group", "topic", "partition")
    committed = _gauge("consumergroup_committed_offset", "the group's committed offset", plabels)
    lag = _gauge("consumergroup_lag", "last stable offset minus the committed offset "
                                      "(kafka-exporter: kafka_consumergroup_lag)", plabels)
    for d in snap.groups:
        members.add_metric([d.group_id], len(d.members))
        state.add_metric([d.group_id, getattr(d.state, "name", str(d.state))], 1)
        for p in d.partitions:
            lv = [d.group_id, p.topic, str(p.partition)]
            if p.committed is not None:
                committed.add_metric(lv, p.committed)
            if p.lag is not None:
                lag.add_metric(lv, p.lag)
    return [members, state, committed, lag]


# transactions that hold back read_committed readers (the last stable offset) until they end
_OPEN_TXN_STATES = ("ONGOING", "PREPARE_COMMIT", "PREPARE_ABORT")


def _transaction_families(snap: ClusterSnapshot) -> list:
    by_state = _gauge("transactions", "transactional ids by the state of their transaction", ("state",))
    oldest = _gauge("transaction_oldest_open_seconds",
                    "age of the oldest transaction not yet ended (0: none); a hanging transaction holds "
                    "read_committed consumers at its first offset")
    counts: dict[str, int] = {}
    age_ms = 0
    for t in snap.transactions:
        counts[t.state] = counts.get(t.state, 0) + 1
        if t.state in _OPEN_TXN_STATES and t.txn_start_ms > 0:
            age_ms = max(age_ms, snap.taken_ms - t.txn_start_ms)
    for state in sorted(counts):
        by_state.add_metric([state], counts[state])
    oldest.add_metric([], max(0, age_ms) / 1000.0)
    return [by_state, oldest]


class _Families:
    """The minimal registry `generate_latest` needs."""

    def __init__(self, families: list):
        self._families = families

    def collect(self):
        return iter(self._families)


def render(snap: ClusterSnapshot) -> str:
    """The Prometheus text exposition of a snapshot."""
    return generate_latest(_Families(metric_families(snap))).decode()

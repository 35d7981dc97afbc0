"""`ray-broker metrics`: the Prometheus exposition of a running broker, printed and served."""
from __future__ import annotations

import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

import ray_broker as rb
from ray_broker.cli import main as cli
from tests.helpers import leader_of, poll_rows, replica, stored_batch, wait_for

pytestmark = pytest.mark.timeout(120)


def samples(text: str) -> dict:
    """{(sample name, frozenset of label items): value}"""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict, name: str, **labels):
    return parsed.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def test_metrics_show_offsets_requests_refusals_replication_and_group_lag(broker, topic_name, capsys):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=1, replication_factor=2)
    lead = leader_of(admin, topic_name)
    follower = 1 - lead
    leader = replica(topic_name, 0, lead)
    pid = ray.get(broker.controller.allocate_producer_ids.remote(1))
    batch = stored_batch([b"a", b"b", b"c"])
    ray.get(leader.produce.remote(batch, -1, 5000, pid, 0, 0))
    assert ray.get(leader.produce.remote(batch, -1, 5000, pid, 0, 0)).duplicate     # a retry: dropped
    group = f"metrics-{topic_name}"
    consumer = broker.consumer(group_id=group, auto_offset_reset="earliest")
    tp = rb.TopicPartition(topic_name, 0)
    consumer.assign([tp])
    got = poll_rows(consumer, 3, polls=50)
    assert got == 3
    consumer.commit({tp: 1})
    consumer.close()
    # the follower learns the high watermark with the next push (or the idle heartbeat)
    wait_for(lambda: ray.get(replica(topic_name, 0, follower).ping.remote())["high_watermark"] == 3, timeout=10)

    assert cli.main(["metrics"]) == 0
    m = samples(capsys.readouterr().out)
    part = dict(topic=topic_name, partition=0)
    assert value(m, "ray_broker_partition_high_watermark", **part) == 3
    assert value(m, "ray_broker_partition_in_sync_replicas", **part) == 2
    assert value(m, "ray_broker_partition_under_replicated", **part) == 0
    assert value(m, "ray_broker_partition_leader", **part) == lead
    on_leader = dict(part, replica=lead)
    on_follower = dict(part, replica=follower)
    assert value(m, "ray_broker_replica_is_leader", **on_leader) == 1
    assert value(m, "ray_broker_replica_is_leader", **on_follower) == 0
    assert value(m, "ray_broker_replica_produce_requests_total", **on_leader) == 2
    assert value(m, "ray_broker_replica_records_in_total", **on_leader) == 3
    assert value(m, "ray_broker_replica_bytes_in_total", **on_leader) > 0
    assert value(m, "ray_broker_replica_duplicate_batches_total", **on_leader) == 1
    assert value(m, "ray_broker_replica_out_of_order_sequence_total", **on_leader) == 0
    assert value(m, "ray_broker_replica_records_out_total", **on_leader) == 3
    assert value(m, "ray_broker_replica_fetch_requests_total", **on_leader) >= 1
    assert value(m, "ray_broker_replica_replication_bytes_in_total", **on_follower) > 0
    assert value(m, "ray_broker_replica_log_end_offset", **on_follower) == 3
    assert value(m, "ray_broker_replica_follower_lag", **on_follower) == 0
    assert value(m, "ray_broker_consumergroup_committed_offset", group=group, **part) == 1
    assert value(m, "ray_broker_consumergroup_lag", group=group, **part) == 2
    assert value(m, "ray_broker_nodes_alive") >= 1
    assert value(m, "ray_broker_offline_partitions") == 0
    assert value(m, "ray_broker_metrics_collect_errors") == 0


def test_metrics_served_for_prometheus(broker, topic_name):
    from prometheus_client import CollectorRegistry, start_http_server

    from ray_broker.metrics.collect import BrokerCollector

    broker.admin().create_topic(topic_name)
    producer = broker.producer(acks="all")
    for i in range(5):
        producer.send(topic_name, value=b"%d" % i)
    producer.flush(timeout=60)
    producer.close()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker, include_groups=False))
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200
            m = samples(resp.read().decode())
        assert value(m, "ray_broker_partition_high_watermark", topic=topic_name, partition=0) == 5
        assert value(m, "ray_broker_replica_records_in_total", topic=topic_name, partition=0, replica=0) == 5
        # each scrape reads the broker again
        producer = broker.producer(acks="all")
        producer.send(topic_name, value=b"more")
        producer.flush(timeout=60)
        producer.close()
        with urllib.request.urlopen(url, timeout=30) as resp:
            m = samples(resp.read().decode())
        assert value(m, "ray_broker_partition_high_watermark", topic=topic_name, partition=0) == 6
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_metrics_show_an_open_transaction_until_it_ends(broker, topic_name, capsys):
    broker.admin().create_topic(topic_name)
    tid = f"metrics-{topic_name}"
    producer = broker.producer(transactional_id=tid, acks="all")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(topic_name, value=b"held")
        producer.flush(timeout=60)
        assert cli.main(["metrics", "--no-groups"]) == 0
        m = samples(capsys.readouterr().out)
        assert value(m, "ray_broker_transactions", state="ONGOING") >= 1
        assert value(m, "ray_broker_transaction_oldest_open_seconds") > 0
        # the open transaction holds read_committed readers at its first offset
        part = dict(topic=topic_name, partition=0)
        assert (value(m, "ray_broker_partition_high_watermark", **part),
                value(m, "ray_broker_partition_last_stable_offset", **part)) == (1, 0)
        producer.abort_transaction(timeout=60)
    finally:
        producer.close()
    ended = broker.admin().describe_transaction(tid)
    assert ended.state in ("COMPLETE_ABORT", "PREPARE_ABORT")


def test_a_stuck_coordinator_leaves_its_part_out_of_the_scrape(broker, topic_name):
    """A transaction coordinator that does not answer (SIGSTOP) costs the scrape its transactions
    after the short coordinator timeout, counted, not the whole scrape."""
    import os
    import signal
    import time

    from ray_broker.metrics.collect import snapshot
    from ray_broker.metrics.exposition import render
    from ray_broker.protocol import txn_coordinator_name

    broker.admin().create_topic(topic_name)
    # the controller starts the coordinators after deploy: wait until a scrape reaches them
    wait_for(lambda: not snapshot(broker, include_groups=False).errors, timeout=60)
    coord = ray.get_actor(txn_coordinator_name(0), namespace=broker.namespace)
    pid = ray.get(coord.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        snap = snapshot(broker, include_groups=False, coordinator_timeout=1.0)
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(snap.errors) == 1 and snap.errors[0].startswith("list_transactions"), snap.errors
    assert took < 20, took                   # not the admin's 60 s
    m = samples(render(snap))
    assert value(m, "ray_broker_metrics_collect_errors") == 1
    assert value(m, "ray_broker_partition_high_watermark", topic=topic_name, partition=0) == 0
    # answering again, the coordinator is back in the next scrape
    wait_for(lambda: not snapshot(broker, include_groups=False).errors, timeout=30)


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_metrics_refuses_a_bad_port_before_connecting(port, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["metrics", "--serve", port])
    assert exit_info.value.code == 2
    assert f"invalid port {port!r}" in capsys.readouterr().err

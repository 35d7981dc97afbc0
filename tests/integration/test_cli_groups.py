"""`ray-broker groups list|describe|reset-offsets`, run in-process through `main()` against the
session's broker (as test_cli.py does: `_connect` attaches to this process's Ray connection), so no
second Ray head is started."""
from __future__ import annotations

import json

import pytest

import ray_broker as rb
from ray_broker.cli import main as cli
from tests.helpers import poll_rows, wait_for

pytestmark = pytest.mark.timeout(120)

GROUP_CFG = dict(auto_offset_reset="earliest", session_timeout_ms=3000, heartbeat_interval_ms=300)


@pytest.mark.parametrize("cmd", [["groups"], ["groups", "list"], ["groups", "describe"],
                                 ["groups", "reset-offsets"]], ids=lambda c: "-".join(c))
def test_groups_help(cmd, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([*cmd, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--address" in out


@pytest.fixture
def run(broker, capsys):
    def invoke(*argv):
        rc = cli.main(list(argv))
        captured = capsys.readouterr()
        return rc, captured.out, captured.err
    return invoke


def by_partition(describe_json):
    return {p["partition"]: p for p in describe_json["partitions"]}


def test_groups_list_describe_lag_and_reset_offsets(broker, topic_name, run):
    admin = broker.admin()
    admin.create_topic(topic_name, partitions=2, replication_factor=1)
    tp0, tp1 = rb.TopicPartition(topic_name, 0), rb.TopicPartition(topic_name, 1)
    producer = broker.producer(acks="all")
    for p in (0, 1):
        for i in range(10):
            producer.send(topic_name, value=b"%d" % i, partition=p)
    producer.flush(timeout=60)
    producer.close()
    group = f"cli-{topic_name}"

    member = broker.consumer(group_id=group, client_id="cli-test-member", **GROUP_CFG)
    member.subscribe([topic_name])
    seen = poll_rows(member, 20)
    assert seen == 20
    member.commit({tp0: 10, tp1: 4})

    rc, out, err = run("groups", "list")
    assert rc == 0, err
    line = [ln for ln in out.splitlines() if ln.split()[:1] == [group]]
    assert line and "STABLE" in line[0] and "range" in line[0], out
    rc, out, _ = run("groups", "list", "--json")
    assert {"group_id": group, "state": "STABLE", "protocol": "range"} in json.loads(out)

    rc, out, err = run("groups", "describe", group)
    assert rc == 0, err
    assert "LAG" in out and "LAST-STABLE-OFFSET" in out and "cli-test-member" in out and "State: STABLE" in out
    rc, out, _ = run("groups", "describe", group, "--json")
    d = json.loads(out)
    assert d["state"] == "STABLE" and len(d["members"]) == 1
    assert sorted(map(tuple, d["members"][0]["assignment"])) == [(topic_name, 0), (topic_name, 1)]
    parts = by_partition(d)
    assert (parts[0]["committed"], parts[0]["last_stable_offset"], parts[0]["lag"]) == (10, 10, 0)
    assert (parts[1]["committed"], parts[1]["last_stable_offset"], parts[1]["lag"]) == (4, 10, 6)
    assert parts[0]["member_id"] == d["members"][0]["member_id"]

    # lag is measured against the last stable offset: an open transaction's records do not count
    txp = broker.producer(transactional_id=f"{group}-txn", transaction_timeout_ms=30_000)
    txp.init_transactions()
    txp.begin_transaction()
    for i in range(3):
        txp.send(topic_name, value=b"open-%d" % i, partition=1)
    txp.flush(timeout=30)
    assert admin.describe_topic(topic_name).partitions[1].high_watermark == 13
    _, out, _ = run("groups", "describe", group, "--json")
    assert (by_partition(json.loads(out))[1]["last_stable_offset"], by_partition(json.loads(out))[1]["lag"]) == (10, 6)
    txp.abort_transaction()
    txp.close()

    def marker_landed():
        p1 = admin.describe_topic(topic_name).partitions[1]
        return p1.last_stable_offset == p1.high_watermark == 14   # 3 aborted records + the abort marker
    wait_for(marker_landed, timeout=30, what="the abort marker")

    # refused while the group has a live member (the coordinator says NON_EMPTY_GROUP)
    rc, _, err = run("groups", "reset-offsets", group, "--topic", topic_name, "--to-earliest")
    assert rc == 2 and err.strip().startswith("error: [NON_EMPTY_GROUP]"), err
    rc, out, err = run("groups", "reset-offsets", group, "--topic", topic_name, "--to-earliest", "--dry-run")
    assert rc == 0 and "would reset" in out and "live member" in err
    assert member.committed([tp0, tp1]) == {tp0: 10, tp1: 4}
    member.close()

    rc, out, err = run("groups", "reset-offsets", group, "--topic", topic_name, "--to-earliest")
    assert rc == 0, err
    _, out, _ = run("groups", "describe", group, "--json")
    d = json.loads(out)
    assert d["state"] == "EMPTY" and d["members"] == []
    assert {p: (v["committed"], v["lag"]) for p, v in by_partition(d).items()} == {0: (0, 10), 1: (0, 14)}

    rc, out, err = run("groups", "reset-offsets", group, "--topic", topic_name, "--partition", "1",
                       "--to-offset", "100")
    assert rc == 0 and "clamped from 100" in out, (out, err)
    rc, _, _ = run("groups", "reset-offsets", group, "--topic", topic_name, "--partition", "0", "--to-offset", "7")
    assert rc == 0
    rc, out, _ = run("groups", "reset-offsets", group, "--topic", topic_name, "--to-latest", "--dry-run")
    assert rc == 0
    _, out, _ = run("groups", "describe", group, "--json")
    committed = {p: v["committed"] for p, v in by_partition(json.loads(out)).items()}
    # partition 1: clamped to its last stable offset, past the aborted records and their marker
    assert committed == {0: 7, 1: 14}

    # a new member starts where the reset put the group
    c = broker.consumer(group_id=group, **GROUP_CFG)
    c.subscribe([topic_name])
    got = []
    for _ in range(50):
        for tp, b in c.poll(0.2).items():
            got.extend((tp.partition, o) for o in b.column("offset").to_pylist())
        if len(got) >= 3:
            break
    c.close()
    assert sorted(got) == [(0, 7), (0, 8), (0, 9)]

    rc, _, err = run("groups", "describe", f"no-such-group-{topic_name}")
    assert rc == 2 and err.strip().startswith("error: [GROUP_ID_NOT_FOUND]"), err
    admin.delete_group(group)

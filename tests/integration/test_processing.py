"""The exactly-once processing helper on the session broker: a copier whose worker is killed
mid-run (Kafka's transactional copier test), a stateful pipeline whose function fails once and
which is scaled out meanwhile, and the main job (payments pipeline) as a smoke test."""
from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import ray

import ray_broker as rb
from ray_broker.processing import ExactlyOncePipeline, IntSerde, copy_records
from tests.helpers import leader_of, read_partition, replica, wait_for

pytestmark = pytest.mark.timeout(120)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# generous enough for a loaded 2-core CI box (missed heartbeats would churn the group); a killed
# worker's replacement evicts its predecessor at once, so failover does not wait for this
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500}


def read_committed_values(cluster, topic, timeout=30):
    """Every committed (key, value) of `topic`, once the last transactions' markers have landed
    (a commit returns when the decision is durable; markers follow moments later)."""
    admin = cluster.admin()
    wait_for(lambda: all(p.last_stable_offset == p.high_watermark >= 0 for p in admin.describe_topic(topic).partitions),
             timeout=timeout, what=f"no open transaction on {topic}")
    tps = [rb.TopicPartition(topic, p.partition) for p in admin.describe_topic(topic).partitions]
    c = cluster.consumer(isolation_level="read_committed", auto_offset_reset="earliest")
    c.assign(tps)
    end = c.end_offsets(tps)
    rows = []
    deadline = time.monotonic() + timeout
    while not all(c.position(tp) >= end[tp] for tp in tps):
        assert time.monotonic() < deadline, "reading the output back timed out"
        for tp, b in c.poll(timeout=0.5).items():
            rows.extend(zip(b.column("key").to_pylist(), b.column("value").to_pylist()))
    c.close()
    return rows


class Writer(threading.Thread):
    """Writes keyed batches of unique values (acks=all), paced, up to `max_rows` or until told to
    stop; remembers what was acknowledged."""

    def __init__(self, cluster, topic, rows=20, max_rows=20_000, pause_s=0.02):
        super().__init__(daemon=True)
        self.cluster, self.topic, self.rows, self.max_rows, self.pause_s = cluster, topic, rows, max_rows, pause_s
        self.stop_event = threading.Event()
        self.acked: list[bytes] = []
        self.error = None

    def run(self):
        producer = self.cluster.producer(acks="all", linger_ms=1)
        try:
            i = 0
            while i < self.max_rows and not self.stop_event.is_set():
                ids = range(i, i + self.rows)
                values = [b"v-%08d" % j for j in ids]
                batch = pa.RecordBatch.from_pydict({"key": [b"k-%d" % (j % 37) for j in ids], "value": values})
                producer.send_batch(self.topic, batch).result(timeout=60)
                self.acked.extend(values)
                i += self.rows
                self.stop_event.wait(self.pause_s)        # pacing: the input keeps arriving during the test
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            producer.close()


def _committed(pipeline, timeout=30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return dict(pipeline.committed())
        except rb.BrokerError:      # coordinator busy on a loaded machine: ask again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def committed_total(pipeline):
    return sum(v or 0 for v in _committed(pipeline).values())


def finish(writer, pipeline) -> list[dict]:
    """Stop writing, let the pipeline consume everything written, stop it; its workers' stats."""
    writer.stop_event.set()
    writer.join(timeout=60)
    assert writer.error is None, writer.error
    pipeline.wait_until_consumed(timeout=60)
    return pipeline.stop()


def test_copier_exactly_once_while_a_worker_is_killed_and_restarted(broker, topic_name):
    admin = broker.admin()
    src, dst = f"{topic_name}-in", f"{topic_name}-out"
    admin.create_topic(src, partitions=3, replication_factor=2)
    admin.create_topic(dst, partitions=2, replication_factor=2)
    pipeline = ExactlyOncePipeline(broker, [src], dst, copy_records, group_id=f"copier-{topic_name}", workers=2,
                                   commit_interval_ms=100, consumer_config=FAST_GROUP,
                                   producer_config={"transaction_timeout_ms": 10_000})
    writer = Writer(broker, src)
    pipeline.start()
    try:
        writer.start()
        wait_for(lambda: committed_total(pipeline) >= 200, timeout=60, what="the copier to make progress")
        victim = pipeline.worker_handle(0)
        ray.kill(victim)                                  # no_restart: the supervisor must replace it
        wait_for(lambda: pipeline.restarts >= 1, timeout=30, what="the supervisor to restart worker 0")
        at_restart = committed_total(pipeline)
        wait_for(lambda: committed_total(pipeline) >= at_restart + 200, timeout=60,
                 what="progress after the restart")
        # partition leaders die under the copier: an input leader and an output leader
        for topic in (src, dst):
            old = leader_of(admin, topic, 0)
            ray.kill(replica(topic, 0, old))
            wait_for(lambda t=topic, o=old: leader_of(admin, t, 0) not in (None, o), timeout=30,
                     what=f"a new leader for {topic}/0")
        at_kill = committed_total(pipeline)
        wait_for(lambda: committed_total(pipeline) >= at_kill + 200, timeout=60,
                 what="progress after the leader kills")
        stats = finish(writer, pipeline)
    finally:
        writer.stop_event.set()
        pipeline.stop(timeout=30)
    assert pipeline.error is None, pipeline.error
    assert {s["status"] for s in stats} == {"stopped"}, stats
    replacement = [s for s in stats if s["index"] == 0][0]
    assert replacement["incarnation"] > 1
    out = read_committed_values(broker, dst)
    values = [v for _, v in out]
    assert len(values) == len(set(values)), "duplicates in the read_committed output"
    assert sorted(values) == sorted(writer.acked), (len(values), len(writer.acked))
    # keys were copied with their records
    assert all(k == b"k-%d" % (int(v[2:]) % 37) for k, v in out)


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_paused_worker_resumes_as_a_zombie_and_cannot_commit(broker, topic_name):
    """A worker frozen (SIGSTOP, by a failpoint) with an open transaction - output written, input
    offsets staged, commit not yet sent - past its session and transaction timeouts: the group
    gives its partitions to the other worker, the coordinator aborts the open transaction and bumps
    the epoch; resumed, the zombie's commit is fenced. The read_committed output holds every input
    exactly once (the frozen transaction's output was in the log, and stays invisible)."""
    admin = broker.admin()
    src, dst = f"{topic_name}-in", f"{topic_name}-out"
    admin.create_topic(src, partitions=2, replication_factor=1)
    admin.create_topic(dst, partitions=2, replication_factor=1)
    pipeline = ExactlyOncePipeline(broker, [src], dst, copy_records, group_id=f"zombie-{topic_name}", workers=2,
                                   consumer_config=FAST_GROUP, producer_config={"transaction_timeout_ms": 8000})
    writer = Writer(broker, src)
    pipeline.start()
    pid = None
    try:
        writer.start()
        wait_for(lambda: committed_total(pipeline) >= 200, timeout=60, what="the copier to make progress")
        zombie = pipeline.worker_handle(0)
        pid = ray.get(zombie.pid.remote(), timeout=30)
        txn_id = pipeline.stats()[0]["transactional_id"]
        # freeze at the next commit of a transaction that wrote output. Seen on a loaded box (not
        # understood yet, noted on #5): the worker froze with its transaction's commit already on
        # its way (PREPARE_COMMIT, or ONGOING then committed); then the scene is not set: resume it
        # and try again
        misses = []
        for _attempt in range(3):
            ray.get(zombie.arm_failpoint.remote("worker.before_commit", "stop"), timeout=30)
            wait_for(lambda: _process_state(pid) == "T", timeout=60, what="the worker to freeze before a commit")
            frozen = admin.describe_transaction(txn_id)
            time.sleep(1.0)
            settled = admin.describe_transaction(txn_id)
            if frozen.state == settled.state == "ONGOING" and frozen.producer_epoch == settled.producer_epoch:
                break
            os.kill(pid, signal.SIGCONT)
            time.sleep(1.0)
            misses.append((frozen, settled, pipeline.stats(timeout=5)))
            print(f"froze without an open transaction, trying again: {misses[-1]}", flush=True)
        assert frozen.state == "ONGOING", misses
        assert (dst, 0) in frozen.partitions or (dst, 1) in frozen.partitions, frozen
        assert any(t == "__consumer_offsets" for t, _ in frozen.partitions), frozen
        held = [tuple(tp) for st in pipeline.stats(timeout=2) if st.get("index") == 1 for tp in st["assignment"]]
        frozen_parts = [tp for tp in _committed(pipeline) if tuple(tp) not in held]
        assert frozen_parts, (held, _committed(pipeline))
        at_freeze = _committed(pipeline)
        # the other worker takes the frozen worker's partitions over after the session timeout; it
        # can commit for them only once the frozen transaction (holding offsets for them) is
        # aborted by its timeout (require_stable)
        wait_for(lambda: all((_committed(pipeline).get(tp) or 0) >= (at_freeze.get(tp) or 0) + 100
                             for tp in frozen_parts), timeout=90,
                 what="the surviving worker to commit for the frozen worker's partitions")
        aborted = admin.describe_transaction(txn_id)
        why = (frozen, aborted, pipeline.stats(timeout=2))
        assert aborted.producer_epoch > frozen.producer_epoch or aborted.producer_id != frozen.producer_id, why
        assert aborted.state in ("PREPARE_ABORT", "COMPLETE_ABORT"), why
        os.kill(pid, signal.SIGCONT)
        pid = None
        # resumed, its commit_transaction() is fenced: the worker recreates its clients and rejoins
        wait_for(lambda: pipeline.stats()[0].get("fenced", 0) >= 1, timeout=60,
                 what="the zombie's commit to be fenced and the worker to recreate its clients")
        resumed = committed_total(pipeline)
        wait_for(lambda: committed_total(pipeline) >= resumed + 200, timeout=60, what="progress after the resume")
        stats = finish(writer, pipeline)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        writer.stop_event.set()
        pipeline.stop(timeout=30)
    assert pipeline.error is None, pipeline.error
    values = [v for _, v in read_committed_values(broker, dst)]
    assert len(values) == len(set(values)), "duplicates in the read_committed output"
    assert sorted(values) == sorted(writer.acked), (len(values), len(writer.acked))
    assert {s["status"] for s in stats} == {"stopped"}, stats
    # the frozen transaction's output is in the log (read_uncommitted), and stays invisible
    raw = [v for p in range(2) for _, _, v in read_partition(broker, dst, p, isolation="read_uncommitted")]
    assert len(raw) > len(values), (len(raw), len(values))
    # the same process (incarnation 1, never replaced) resumed, was fenced and carried on
    assert stats[0]["incarnation"] == 1 and stats[0]["fenced"] >= 1 and stats[0]["recreations"] >= 1, stats[0]


def test_stateful_pipeline_aborts_on_a_failing_function_and_scales_out(broker, topic_name, tmp_path):
    """Counts per key kept as state: a failure in the middle of a transaction is aborted and its
    input re-read (state rolled back); a third worker joins meanwhile; counts stay exact."""
    admin = broker.admin()
    src, dst, state = f"{topic_name}-in", f"{topic_name}-out", f"{topic_name}-state"
    for t in (src, dst, state):
        admin.create_topic(t, partitions=2, replication_factor=1)
    fail_flag = tmp_path / "fail-once"
    fail_flag.write_text("x")

    def count(batch, ctx):
        keys = batch.column("key")
        enc = keys.dictionary_encode()
        uniq = enc.dictionary.to_pylist()
        adds = np.bincount(enc.indices.to_numpy(zero_copy_only=False), minlength=len(uniq))
        before = np.array(ctx.state.get_many(uniq, default=0), dtype=np.int64)
        ctx.state.put_many(uniq, (before + adds).tolist())
        if os.path.exists(fail_flag):                     # fail once, after changing the state
            os.remove(fail_flag)
            raise RuntimeError("injected failure")
        return {"key": uniq, "value": [b"%d" % c for c in (before + adds).tolist()]}

    producer = broker.producer(acks="all")
    n_keys, per_round = 10, 200
    expected: dict[bytes, int] = {}

    def write_round(r):
        keys = [b"key-%d" % ((r * 7 + i) % n_keys) for i in range(per_round)]
        for k in keys:
            expected[k] = expected.get(k, 0) + 1
        producer.send_batch(src, pa.RecordBatch.from_pydict({"key": keys, "value": [b"x"] * per_round}))
        producer.flush(timeout=60)

    with ExactlyOncePipeline(broker, src, dst, count, group_id=f"counter-{topic_name}", workers=2,
                             commit_interval_ms=50, state_topic=state, state_serde=IntSerde,
                             consumer_config=FAST_GROUP) as pipeline:
        write_round(0)
        pipeline.wait_until_consumed(timeout=60)
        assert not fail_flag.exists()                     # the failure happened and was survived
        assert pipeline.add_worker() == 2
        for r in range(1, 4):
            write_round(r)
        pipeline.wait_until_consumed(timeout=60)
        stats = pipeline.stats()
    producer.close()
    assert pipeline.error is None, pipeline.error
    assert len(stats) == 3 and sum(s["aborts"] for s in stats) >= 1, stats
    latest: dict[bytes, int] = {}
    for k, v in read_committed_values(broker, state):
        latest[k] = int(v)
    assert latest == expected
    out_latest: dict[bytes, int] = {}
    for k, v in read_committed_values(broker, dst):
        out_latest[k] = max(out_latest.get(k, 0), int(v))
    assert out_latest == expected


def test_main_job_payments_pipeline_smoke(broker, capsys):
    spec = importlib.util.spec_from_file_location("main_job_smoke", os.path.join(REPO, "jobs", "main_job.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    rc = job.main(["--records", "3000", "--accounts", "40", "--partitions", "2", "--replication-factor", "1",
                   "--batch-rows", "500", "--send-records", "100", "--timeout", "90"])
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT "), out
    fields = dict(kv.split("=") for kv in last.split()[1:-1])
    assert fields == {"input": "3000", "output": "3000", "duplicates": "0", "missing": "0",
                      "balance_mismatches": "0", "running_balance_mismatches": "0"}, last
    assert last.endswith(" OK") and rc == 0, out

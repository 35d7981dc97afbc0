"""The main job: produce a few hundred thousand records to a replicated topic and read them all back.

    python jobs/main_job.py                       # embedded local Ray + broker, data in a fresh temp dir
    python jobs/main_job.py --records 1000000 --data-dir ./ray_broker_data
    RAY_ADDRESS=host:6379 python jobs/main_job.py # a broker already deployed (`ray-broker start --address ...`)

Steps: create topic `main-job` (3 partitions, replication factor 3, min.insync.replicas=2) if it is
missing; produce `--records` records with acks=all, most with `send_batch` (Arrow batches of
`--batch-rows` rows) and the rest (`--send-records`) one by one with `send()`; consume them all back
with a read_committed consumer; check every record id arrived exactly once. Exit status 1 on any
duplicate or missing record. (Later this job becomes an exactly-once consume-transform-produce
pipeline; today it checks the replicated, acknowledged log end to end.)

Each record: key `key-%012d` (16 bytes), value = the 12-digit record id, a run id, padding to
`--value-bytes` (default 100). The run id makes reruns against the same topic count only their own
records.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import ray_broker as rb  # noqa: E402

def connect_embedded(data_dir: str, namespace: str = "ray_broker"):
    """An embedded broker on a NEW local Ray instance (same as `rb.connect(data_dir=...)`), but with
    `ray.init(address="local")`: a bare `ray.init()` attaches to whatever cluster
    /tmp/ray/ray_current_cluster names (e.g. another `ray start` on this machine)."""
    import ray

    ray.init(address="local", namespace=namespace, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, configure_logging=False)
    rb.deploy(namespace, data_dir)
    return rb.connect(namespace=namespace)


def shutdown_embedded(cluster) -> None:
    import ray

    cluster.shutdown()
    try:
        ray.get(cluster.controller.shutdown_broker.remote(), timeout=10)
    except Exception:  # noqa: BLE001
        pass
    ray.shutdown()


TOPIC = "main-job"


def make_values(ids: np.ndarray, run: str, value_bytes: int) -> pa.Array:
    pad = max(0, value_bytes - 12 - 1 - len(run) - 1)
    return pa.array([b"%012d|%s|%s" % (i, run.encode(), b"x" * pad) for i in ids.tolist()], pa.binary())


def make_keys(ids: np.ndarray) -> pa.Array:
    return pa.array([b"key-%012d" % i for i in ids.tolist()], pa.binary())


def ensure_topic(admin, partitions: int, rf: int, min_isr: int) -> None:
    try:
        admin.create_topic(TOPIC, partitions=partitions, replication_factor=rf,
                           config={"min.insync.replicas": min_isr})
        print(f"created topic {TOPIC!r}: {partitions} partitions, replication factor {rf}, "
              f"min.insync.replicas {min_isr}")
    except rb.TopicAlreadyExistsError:
        print(f"topic {TOPIC!r} exists; reusing it")


def produce(cluster, n: int, n_send: int, batch_rows: int, value_bytes: int, run: str) -> tuple[float, int]:
    producer = cluster.producer({"acks": "all"})
    t0 = time.perf_counter()
    n_batch = n - n_send
    futures = []
    nbytes = 0
    for start in range(0, n_batch, batch_rows):
        ids = np.arange(start, min(n_batch, start + batch_rows))
        batch = pa.RecordBatch.from_arrays([make_keys(ids), make_values(ids, run, value_bytes)], ["key", "value"])
        nbytes += batch.nbytes
        futures.append(producer.send_batch(TOPIC, batch))
    record_futures = []
    for i in range(n_batch, n):
        value = b"%012d|%s|%s" % (i, run.encode(), b"x" * max(0, value_bytes - 14 - len(run)))
        record_futures.append(producer.send(TOPIC, value=value, key=b"key-%012d" % i))
        nbytes += len(value) + 16
    producer.flush(timeout=600)
    elapsed = time.perf_counter() - t0
    acked = 0
    for f in futures:
        acked += len(f.result(timeout=60))
    for f in record_futures:
        f.result(timeout=60)
        acked += 1
    producer.close()
    if acked != n:
        raise SystemExit(f"producer acknowledged {acked} of {n} records")
    return elapsed, nbytes


def consume(cluster, partitions: list, run: str, expect: int, timeout_s: float) -> tuple[np.ndarray, float, int]:
    consumer = cluster.consumer({"isolation_level": "read_committed", "auto_offset_reset": "earliest"})
    consumer.assign(partitions)
    end = consumer.end_offsets(partitions)
    marker = f"|{run}|".encode()
    ids: list[np.ndarray] = []
    seen_rows = 0
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(consumer.position(tp) >= end[tp] for tp in partitions):
            break
        for tp, batch in consumer.poll(timeout=1.0).items():
            seen_rows += batch.num_rows
            values = batch.column(batch.schema.get_field_index("value"))
            mine = pc.match_substring(values.cast(pa.string()), marker.decode())
            own = pc.filter(values, mine)
            if len(own):
                head = pc.utf8_slice_codeunits(own.cast(pa.string()), 0, 12)
                ids.append(head.cast(pa.int64()).to_numpy())
    elapsed = time.perf_counter() - t0
    consumer.close()
    got = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return got, elapsed, seen_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=300_000, help="records to produce (default 300000)")
    ap.add_argument("--send-records", type=int, default=None,
                    help="how many of them go through per-record send() (default: 10%%, at most 30000)")
    ap.add_argument("--batch-rows", type=int, default=10_000, help="rows per send_batch Arrow batch")
    ap.add_argument("--value-bytes", type=int, default=100, help="bytes per value (default 100)")
    ap.add_argument("--data-dir", default=None,
                    help="broker data dir for the embedded broker (default: a fresh temp dir, removed at the end)")
    ap.add_argument("--address", default=None, help="Ray address of a deployed broker (default: $RAY_ADDRESS)")
    ap.add_argument("--namespace", default="ray_broker")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for reading everything back")
    args = ap.parse_args(argv)
    n = args.records
    n_send = args.send_records if args.send_records is not None else min(30_000, n // 10)
    n_send = max(0, min(n_send, n))

    remote = bool(args.address or os.environ.get("RAY_ADDRESS"))
    tmp = None
    data_dir = args.data_dir
    if not remote and data_dir is None:
        tmp = data_dir = tempfile.mkdtemp(prefix="ray_broker_main_job_")
    run = uuid.uuid4().hex[:8]
    if remote:
        cluster = rb.connect(address=args.address, namespace=args.namespace)
    else:
        cluster = connect_embedded(data_dir, args.namespace)
    try:
        print(f"broker: {'Ray cluster at ' + (args.address or os.environ['RAY_ADDRESS']) if remote else 'embedded'}"
              f"{'' if remote else ', data dir ' + data_dir}; run id {run}")
        admin = cluster.admin()
        ensure_topic(admin, partitions=3, rf=3, min_isr=2)
        desc = admin.describe_topic(TOPIC)
        tps = [rb.TopicPartition(TOPIC, p.partition) for p in desc.partitions]

        p_s, nbytes = produce(cluster, n, n_send, args.batch_rows, args.value_bytes, run)
        got, c_s, seen = consume(cluster, tps, run, n, args.timeout)

        uniq, counts = np.unique(got, return_counts=True)
        duplicates = int((counts - 1).sum())
        valid = uniq[(uniq >= 0) & (uniq < n)]
        missing = n - len(valid)
        print(f"records produced:  {n:>10,} ({n - n_send:,} by send_batch in Arrow batches of {args.batch_rows:,}, "
              f"{n_send:,} by send()), acks=all")
        print(f"records consumed:  {len(got):>10,} (read_committed; {seen:,} rows read in total)")
        print(f"duplicates:        {duplicates:>10,}")
        print(f"missing:           {missing:>10,}")
        print(f"produce:           {n / p_s:>10,.0f} records/s ({nbytes / p_s / 1e6:,.1f} MB/s, {p_s:.2f} s)")
        print(f"consume:           {len(got) / c_s if c_s else 0:>10,.0f} records/s ({c_s:.2f} s)")
        ok = duplicates == 0 and missing == 0 and len(got) == n
        print("OK" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        cluster.shutdown() if remote else shutdown_embedded(cluster)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

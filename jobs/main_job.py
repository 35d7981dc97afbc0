"""The main job: an exactly-once payments pipeline (read-process-write transactions on Ray actors).

    python jobs/main_job.py                       # embedded local Ray + broker, data in a fresh temp dir
    python jobs/main_job.py --records 200000 --workers 3 --data-dir ./ray_broker_data
    RAY_ADDRESS=host:6379 python jobs/main_job.py # a broker already deployed (`ray-broker start --address ...`)

Steps (topic names carry a run id, so reruns against one broker do not mix):

1. Create `payments-<run>` (input; `--partitions`, `--replication-factor`, `--min-insync-replicas`),
   `payments-enriched-<run>` (output, an Arrow-schema topic) and `balances-<run>` (state, as many
   partitions as the input).
2. Start `ray_broker.processing.ExactlyOncePipeline` with `--workers` worker actors (consumer group
   `payments-enricher-<run>`, read_committed, one transactional producer each, committing every
   `--commit-interval-ms`), then produce `--records` payments (account key, amount in cents;
   most by `send_batch` in Arrow batches of `--batch-rows`, `--send-records` of them one by one
   with `send()`).
3. Each worker runs `enrich_payments` over whole Arrow batches (vectorised): it parses the
   payments, computes every payment's balance after it from the per-account balance state, and
   returns the enriched events; the changed balances go to the state topic, the events to the
   output topic and the input offsets to the group, all in one transaction.
4. Once the group has committed the whole input, stop the pipeline and check with read_committed
   consumers: every payment id appears exactly once in the output; the latest balance per account
   in the state topic equals the sum of that account's input amounts; every event's balance equals
   the running sum of its account's amounts up to it (input order).

The last line is `RESULT input=N output=N duplicates=0 missing=0 balance_mismatches=0
running_balance_mismatches=0 OK` (MISMATCH and exit status 1 otherwise).
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
from ray_broker.processing import ExactlyOncePipeline, IntSerde, Output  # noqa: E402

ENRICHED_SCHEMA = pa.schema([
    pa.field("payment_id", pa.int64(), nullable=False),
    pa.field("account", pa.string(), nullable=False),
    pa.field("amount", pa.int64(), nullable=False),          # cents; negative = withdrawal
    pa.field("balance_after", pa.int64(), nullable=False),   # the account's balance after this payment
    pa.field("overdrawn", pa.bool_(), nullable=False),
    pa.field("input_partition", pa.int32(), nullable=False),
    pa.field("input_offset", pa.int64(), nullable=False),
])


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


# ------------------------------------------------------------------------------------------ payments
def account_keys(accounts: np.ndarray) -> pa.Array:
    return pa.array([b"acct-%05d" % a for a in accounts.tolist()], pa.binary())


def payment_values(ids: np.ndarray, amounts: np.ndarray, value_bytes: int) -> pa.Array:
    """`<payment id>|<amount cents>|<padding>`, padded to about `value_bytes`."""
    out = []
    for i, a in zip(ids.tolist(), amounts.tolist()):
        v = b"%d|%d|" % (i, a)
        out.append(v + b"x" * max(0, value_bytes - len(v)))
    return pa.array(out, pa.binary())


def parse_payments(batch) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(account keys, payment ids, amounts) of a batch of the payments topic; vectorised."""
    parts = pc.split_pattern(batch.column(batch.schema.get_field_index("value")).cast(pa.string()), "|",
                             max_splits=2)
    ids = pc.list_element(parts, 0).cast(pa.int64()).to_numpy(zero_copy_only=False)
    amounts = pc.list_element(parts, 1).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return batch.column(batch.schema.get_field_index("key")), ids, amounts


def running_balances(group: np.ndarray, amounts: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Balance after every row (rows in input order; `group` = account index per row, `start` =
    balance per account before the rows) and the final balance per account; vectorised."""
    n = len(amounts)
    after = np.empty(n, dtype=np.int64)
    final = start.astype(np.int64).copy()
    if n == 0:
        return after, final
    order = np.argsort(group, kind="stable")
    g, a = group[order], amounts[order].astype(np.int64)
    cs = np.cumsum(a)
    first = np.empty(n, dtype=bool)
    first[0] = True
    first[1:] = g[1:] != g[:-1]
    base = (cs - a)[first][np.cumsum(first) - 1]        # cumulative sum before each account's first row
    sorted_after = start[g] + (cs - base)
    after[order] = sorted_after
    last = np.empty(n, dtype=bool)
    last[-1] = True
    last[:-1] = g[1:] != g[:-1]
    final[g[last]] = sorted_after[last]
    return after, final


def enrich_payments(batch: pa.RecordBatch, ctx) -> pa.RecordBatch:
    """The pipeline's function: one Arrow batch of one input partition in, enriched events out;
    per-account balances kept in `ctx.state` (written to the state topic with the transaction)."""
    keys, ids, amounts = parse_payments(batch)
    enc = keys.dictionary_encode()
    accounts = enc.dictionary.to_pylist()                # distinct account keys (bytes) of this batch
    group = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    start = np.array(ctx.state.get_many(accounts, default=0), dtype=np.int64)
    after, final = running_balances(group, amounts, start)
    ctx.state.put_many(accounts, final.tolist())
    n = batch.num_rows
    return pa.RecordBatch.from_arrays([
        pa.array(ids, pa.int64()),
        pc.take(pa.array(accounts, pa.binary()).cast(pa.string()), pa.array(group)),
        pa.array(amounts, pa.int64()),
        pa.array(after, pa.int64()),
        pa.array(after < 0, pa.bool_()),
        pa.array(np.full(n, ctx.partition.partition, dtype=np.int32)),
        batch.column(batch.schema.get_field_index("offset")).cast(pa.int64()),
    ], schema=ENRICHED_SCHEMA)


def make_enricher(output_topic: str):
    """`enrich_payments` with its events keyed by account in `output_topic` (per-account order)."""
    def enrich(batch, ctx):
        return Output(output_topic, enrich_payments(batch, ctx), key_column="account")
    return enrich


# ------------------------------------------------------------------------------------------ steps
def create_topics(admin, names: dict, partitions: int, rf: int, min_isr: int) -> None:
    cfg = {"min.insync.replicas": min_isr}
    admin.create_topic(names["input"], partitions=partitions, replication_factor=rf, config=cfg)
    admin.create_topic(names["output"], partitions=partitions, replication_factor=rf, config=cfg,
                       schema=ENRICHED_SCHEMA)
    admin.create_topic(names["state"], partitions=partitions, replication_factor=rf, config=cfg)
    print(f"created topics {names['input']!r}, {names['output']!r}, {names['state']!r}: {partitions} partitions "
          f"each, replication factor {rf}, min.insync.replicas {min_isr}")


def produce_payments(cluster, topic: str, n: int, n_send: int, batch_rows: int, accounts: int, value_bytes: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Write payments 0..n-1; returns (account per payment, amount per payment, seconds)."""
    rng = np.random.default_rng(seed)
    acct = rng.integers(0, accounts, size=n)
    amount = rng.integers(-5_000, 10_000, size=n)
    producer = cluster.producer(acks="all")
    t0 = time.perf_counter()
    n_batch = n - n_send
    futures = []
    for start in range(0, n_batch, batch_rows):
        ids = np.arange(start, min(n_batch, start + batch_rows))
        batch = pa.RecordBatch.from_arrays([account_keys(acct[ids]), payment_values(ids, amount[ids], value_bytes)],
                                           ["key", "value"])
        futures.append(producer.send_batch(topic, batch))
    record_futures = []
    for i in range(n_batch, n):
        v = payment_values(np.array([i]), amount[i:i + 1], value_bytes)[0].as_py()
        record_futures.append(producer.send(topic, value=v, key=b"acct-%05d" % acct[i]))
    producer.flush(timeout=600)
    acked = sum(len(f.result(timeout=60)) for f in futures)
    for f in record_futures:
        f.result(timeout=60)
        acked += 1
    producer.close()
    if acked != n:
        raise SystemExit(f"producer acknowledged {acked} of {n} payments")
    return acct, amount, time.perf_counter() - t0


def wait_stable(admin, topic: str, timeout_s: float) -> None:
    """Until no transaction is open on `topic` (LSO = HW everywhere): a commit returns once the
    decision is durable, its markers land on the partitions moments later."""
    deadline = time.monotonic() + timeout_s
    while not all(p.last_stable_offset == p.high_watermark >= 0 for p in admin.describe_topic(topic).partitions):
        if time.monotonic() > deadline:
            raise SystemExit(f"{topic!r} still has open transactions after {timeout_s} s")
        time.sleep(0.05)


def read_all(cluster, topic: str, timeout_s: float) -> list[tuple[int, pa.RecordBatch]]:
    """Every committed record of `topic`: [(partition, batch)] in offset order per partition."""
    admin = cluster.admin()
    wait_stable(admin, topic, timeout_s)
    tps = [rb.TopicPartition(topic, p.partition) for p in admin.describe_topic(topic).partitions]
    consumer = cluster.consumer(isolation_level="read_committed", auto_offset_reset="earliest")
    consumer.assign(tps)
    end = consumer.end_offsets(tps)
    out = []
    deadline = time.monotonic() + timeout_s
    while not all(consumer.position(tp) >= end[tp] for tp in tps):
        if time.monotonic() > deadline:
            raise SystemExit(f"reading {topic!r} back timed out")
        for tp, batch in consumer.poll(timeout=1.0).items():
            out.append((tp.partition, batch))
    consumer.close()
    return out


def check(cluster, names: dict, timeout_s: float) -> dict:
    """Read input, output and state back (read_committed) and compare them."""
    # input: payments in (partition, offset) order; each account lives in one partition
    ids_l, amt_l, key_l = [], [], []
    for _, batch in read_all(cluster, names["input"], timeout_s):
        keys, ids, amounts = parse_payments(batch)
        ids_l.append(ids)
        amt_l.append(amounts)
        key_l.append(keys)
    in_ids = np.concatenate(ids_l) if ids_l else np.zeros(0, np.int64)
    in_amt = np.concatenate(amt_l) if amt_l else np.zeros(0, np.int64)
    in_keys = pa.chunked_array(key_l, pa.binary()).combine_chunks() if key_l else pa.array([], pa.binary())
    enc = in_keys.dictionary_encode()
    accounts = enc.dictionary.to_pylist()
    group = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    after, final = running_balances(group, in_amt, np.zeros(len(accounts), np.int64))
    expected_balance = dict(zip(accounts, final.tolist()))
    size = int(max(in_ids.max(initial=-1), 0)) + 1
    expected_after = np.zeros(size, np.int64)
    expected_after[in_ids] = after

    # output: enriched events
    out_ids_l, out_after_l = [], []
    for _, batch in read_all(cluster, names["output"], timeout_s):
        out_ids_l.append(batch.column(batch.schema.get_field_index("payment_id")).to_numpy())
        out_after_l.append(batch.column(batch.schema.get_field_index("balance_after")).to_numpy())
    out_ids = np.concatenate(out_ids_l) if out_ids_l else np.zeros(0, np.int64)
    out_after = np.concatenate(out_after_l) if out_after_l else np.zeros(0, np.int64)
    uniq, counts = np.unique(out_ids, return_counts=True)
    duplicates = int((counts - 1).sum())
    input_set = np.unique(in_ids)
    missing = int(len(np.setdiff1d(input_set, uniq)))
    unexpected = int(len(np.setdiff1d(uniq, input_set)))
    known = (out_ids >= 0) & (out_ids < size)
    running_bad = int((expected_after[out_ids[known]] != out_after[known]).sum()) + int((~known).sum())

    # state: latest balance per account
    state: dict = {}
    for _, batch in read_all(cluster, names["state"], timeout_s):
        for k, v in zip(batch.column(batch.schema.get_field_index("key")).to_pylist(),
                        batch.column(batch.schema.get_field_index("value")).to_pylist()):
            state[k] = None if v is None else int(v)
    balance_bad = sum(1 for a in set(expected_balance) | set(state) if state.get(a) != expected_balance.get(a))
    return {"input": int(len(in_ids)), "input_distinct": int(len(input_set)), "output": int(len(out_ids)),
            "duplicates": duplicates, "missing": missing, "unexpected": unexpected,
            "balance_mismatches": balance_bad, "running_balance_mismatches": running_bad,
            "accounts": len(expected_balance), "state_accounts": len(state)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20_000, help="payments to produce (default 20000)")
    ap.add_argument("--send-records", type=int, default=None,
                    help="how many of them go through per-record send() (default: 5%%, at most 1000)")
    ap.add_argument("--batch-rows", type=int, default=5_000, help="rows per send_batch Arrow batch (default 5000)")
    ap.add_argument("--value-bytes", type=int, default=64, help="bytes per payment value (default 64)")
    ap.add_argument("--accounts", type=int, default=200, help="number of accounts (default 200)")
    ap.add_argument("--workers", type=int, default=2, help="pipeline worker actors (default 2)")
    ap.add_argument("--commit-interval-ms", type=int, default=100, help="transaction commit interval (default 100)")
    ap.add_argument("--partitions", type=int, default=2, help="partitions per topic (default 2; every replica is a Ray actor process)")
    ap.add_argument("--replication-factor", type=int, default=2, help="replication factor (default 2)")
    ap.add_argument("--min-insync-replicas", type=int, default=None,
                    help="min.insync.replicas (default: 2 if the replication factor allows, else 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the payment generator")
    ap.add_argument("--data-dir", default=None,
                    help="broker data dir for the embedded broker (default: a fresh temp dir, removed at the end)")
    ap.add_argument("--address", default=None, help="Ray address of a deployed broker (default: $RAY_ADDRESS)")
    ap.add_argument("--namespace", default="ray_broker")
    ap.add_argument("--keep-topics", action="store_true",
                    help="keep the run's topics and group on an attached broker (default: delete them)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for processing and reading back")
    args = ap.parse_args(argv)
    n = args.records
    if n < 1 or args.accounts < 1 or args.workers < 1 or args.partitions < 1:
        ap.error("--records, --accounts, --workers and --partitions must be >= 1")
    n_send = args.send_records if args.send_records is not None else min(1_000, n // 20)
    n_send = max(0, min(n_send, n))
    min_isr = args.min_insync_replicas or min(2, args.replication_factor)

    import ray

    attached = ray.is_initialized()          # called from a process that already runs Ray (tests)
    remote = not attached and bool(args.address or os.environ.get("RAY_ADDRESS"))
    tmp = None
    data_dir = args.data_dir
    if not (attached or remote) and data_dir is None:
        tmp = data_dir = tempfile.mkdtemp(prefix="ray_broker_main_job_")
    run = uuid.uuid4().hex[:8]
    if attached:
        cluster = rb.connect(namespace=args.namespace)
    elif remote:
        cluster = rb.connect(address=args.address, namespace=args.namespace)
    else:
        cluster = connect_embedded(data_dir, args.namespace)
    names = {"input": f"payments-{run}", "output": f"payments-enriched-{run}", "state": f"balances-{run}"}
    group = f"payments-enricher-{run}"
    pipeline = None
    try:
        where = ("this process's Ray" if attached else f"Ray cluster at {args.address or os.environ['RAY_ADDRESS']}"
                 if remote else f"embedded, data dir {data_dir}")
        print(f"broker: {where}; run id {run}")
        t_start = time.perf_counter()
        admin = cluster.admin()
        create_topics(admin, names, args.partitions, args.replication_factor, min_isr)

        pipeline = ExactlyOncePipeline(
            cluster, [names["input"]], names["output"], make_enricher(names["output"]), group,
            workers=args.workers, commit_interval_ms=args.commit_interval_ms, state_topic=names["state"],
            state_serde=IntSerde, consumer_config={"session_timeout_ms": 6_000, "heartbeat_interval_ms": 500})
        pipeline.start()
        _, _, p_s = produce_payments(cluster, names["input"], n, n_send, args.batch_rows, args.accounts,
                                     args.value_bytes, args.seed)
        t_proc = time.perf_counter()
        pipeline.wait_until_consumed(timeout=args.timeout)
        proc_s = time.perf_counter() - t_proc
        stats = pipeline.stop()
        pipeline = None
        t_check = time.perf_counter()
        r = check(cluster, names, args.timeout)
        check_s = time.perf_counter() - t_check
        commits = sum(s.get("commits", 0) for s in stats)
        aborts = sum(s.get("aborts", 0) for s in stats)
        print(f"payments produced:  {n:>9,} ({n - n_send:,} by send_batch in Arrow batches of {args.batch_rows:,}, "
              f"{n_send:,} by send()) in {p_s:.2f} s")
        print(f"pipeline:           {args.workers} workers, {commits} transactions committed, {aborts} aborted; "
              f"input fully committed {proc_s:.2f} s after the last payment was acknowledged")
        print(f"accounts:           {r['accounts']:>9,} in the input, {r['state_accounts']:,} in the state topic")
        print(f"check:              {check_s:.2f} s; whole run {time.perf_counter() - t_start:.2f} s")
        ok = (r["input"] == n and r["input_distinct"] == n and r["output"] == n and r["duplicates"] == 0
              and r["missing"] == 0 and r["unexpected"] == 0 and r["balance_mismatches"] == 0
              and r["running_balance_mismatches"] == 0)
        print(f"RESULT input={r['input']} output={r['output']} duplicates={r['duplicates']} missing={r['missing']} "
              f"balance_mismatches={r['balance_mismatches']} "
              f"running_balance_mismatches={r['running_balance_mismatches']} {'OK' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    finally:
        if pipeline is not None:
            pipeline.stop(timeout=30)
        if attached or remote:
            if not args.keep_topics:
                admin = cluster.admin()
                for t in names.values():
                    try:
                        admin.delete_topic(t)
                    except Exception:  # noqa: BLE001 - not created
                        pass
                try:
                    admin.delete_group(group)
                except Exception:  # noqa: BLE001
                    pass
            cluster.shutdown()
        else:
            shutdown_embedded(cluster)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

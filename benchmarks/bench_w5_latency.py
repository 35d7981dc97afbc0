"""W5: end-to-end latency at a fixed rate (10,000 records/s): idempotent and transactional.

    python benchmarks/bench_w5_latency.py            # 10 s per mode
    python benchmarks/bench_w5_latency.py --smoke

One fresh topic per mode (`--partitions` 6, `--replication-factor` 3, min.insync.replicas 2).
The driver sends records one by one with `send()` (keys distinct, values of 100 bytes starting
with the send time in ns and the transaction number, `datagen.stamped_value`) at `--rate` records/s,
paced in 1 ms ticks (like the peer benchmark). A consumer in its own Ray actor process (num_cpus=0;
manual assignment of all partitions, from the beginning) stamps each polled batch with its arrival
time; latency = arrival - send time, per record (same machine, same clock).

Modes:
- `idempotent`: acks=all idempotent producer (linger.ms 5, the default), read_uncommitted consumer
  (as the peer's; without transactions read_committed reads the same).
- `transactional`: transactional producer, commit_transaction() every `--commit-interval-ms`
  (sending pauses during the commit, as with librdkafka), read_committed consumer. Also:
  commit_transaction() call latency, and visibility after commit = arrival of a transaction's last
  record at the consumer - return of its commit_transaction() (negative = visible before the commit
  call returned; counted, clamped to 0 in the percentiles).

Warm-up records (connections, producer id, first transaction) are sent and acknowledged before the
timed window and ignored by the consumer. Targets (issue 7): idempotent RF 3 p99 <= 10 ms;
transactional p99 <= commit interval + 15 ms; commit p50 <= 3 ms, p99 <= 10 ms; visibility p99 <= 10 ms.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from ray_broker.testing import datagen  # noqa: E402

FULL = {"rate": 10_000, "seconds": 10.0, "partitions": 6, "replication_factor": 3, "commit_interval_ms": 100,
        "modes": "idempotent,transactional"}
SMOKE = {"rate": 1_000, "seconds": 0.5, "partitions": 1, "replication_factor": 1, "commit_interval_ms": 100,
         "modes": "idempotent,transactional"}


def parser():
    ap = bl.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, help="records per second (default 10000)")
    ap.add_argument("--seconds", type=float, help="timed window per mode (default 10)")
    ap.add_argument("--partitions", type=int, help="partitions (default 6)")
    ap.add_argument("--replication-factor", type=int, help="replication factor (default 3)")
    ap.add_argument("--commit-interval-ms", type=int, help="transactional mode: commit period (default 100)")
    ap.add_argument("--modes", help="comma-separated: idempotent,transactional (default both)")
    return ap


def paced_send(producer, name: str, rate: int, seconds: float, txn: bool, commit_interval_s: float,
               keys: list) -> dict:
    """Send rate*seconds stamped records in 1 ms ticks; in txn mode commit every interval. A transaction
    that fails abortably is aborted and counted (its records never become visible)."""
    from ray_broker.errors import TransactionAbortableError

    total = int(rate * seconds)
    per_s = float(rate)
    send = producer.send
    sent = seq = in_txn = 0
    commit_s: list[float] = []
    commit_end_ns: dict[int, int] = {}
    aborted, aborted_records, first_abort = 0, 0, None
    behind_max = 0

    def end_txn(failure: BaseException | None) -> None:
        nonlocal seq, in_txn, aborted, aborted_records, first_abort
        try:
            if failure is not None:
                raise failure
            c0 = time.perf_counter()
            producer.commit_transaction(timeout=60)
            commit_s.append(time.perf_counter() - c0)
            commit_end_ns[seq] = time.time_ns()
        except TransactionAbortableError as exc:
            aborted += 1
            aborted_records += in_txn
            first_abort = first_abort or repr(exc)[:500]
            bl.log(f"W5: transaction aborted: {exc!r}"[:300])
            producer.abort_transaction(timeout=60)
        seq += 1
        in_txn = 0

    t0 = time.perf_counter()
    next_commit = t0 + commit_interval_s
    if txn:
        producer.begin_transaction()
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - t0) * per_s) + 1)
        behind_max = max(behind_max, due - sent)
        failure = None
        while sent < due:
            try:
                send(name, datagen.stamped_value(time.time_ns(), seq), keys[sent % len(keys)])
            except TransactionAbortableError as exc:
                failure = exc
                break
            sent += 1
            in_txn += 1
        if txn and (failure is not None or time.perf_counter() >= next_commit):
            end_txn(failure)
            producer.begin_transaction()
            next_commit = time.perf_counter() + commit_interval_s
        tick = t0 + (int((time.perf_counter() - t0) * 1000) + 1) / 1000.0
        sl = tick - time.perf_counter()
        if sl > 0:
            time.sleep(sl)
    if txn:
        end_txn(None)
    producer.flush(timeout=60)
    elapsed = time.perf_counter() - t0
    return {"sent": sent, "seconds": elapsed, "commit_s": commit_s, "commit_end_ns": commit_end_ns,
            "max_records_behind_schedule": behind_max, "aborted_transactions": aborted,
            "aborted_records": aborted_records, "first_abort_error": first_abort}


def one_mode(cluster, args, mode: str) -> tuple[dict, list]:
    txn = mode == "transactional"
    isolation = "read_committed" if txn else "read_uncommitted"
    keys = datagen.kv_lists(0, 10_000)[0]
    with bl.topic(cluster, f"w5-{mode[:3]}", args.partitions, args.replication_factor) as name:
        if txn:
            producer = cluster.producer(acks="all", transactional_id=bl.unique("w5"))
            producer.init_transactions()
            with producer.transaction():
                for p in range(args.partitions):   # every partition joins a transaction once before timing
                    producer.send(name, datagen.stamped_value(0, -1), partition=p)
        else:
            producer = cluster.producer(acks="all")
            for p in range(args.partitions):
                producer.send(name, datagen.stamped_value(0, -1), partition=p)
            producer.flush(timeout=60)
        consumer = bl.LatencyConsumer.remote(cluster.namespace, name, args.partitions, isolation)
        expected = int(args.rate * args.seconds)
        ref = consumer.run.remote(expected, 10.0)
        deadline = time.monotonic() + 60
        while not ray.get(consumer.started.remote(), timeout=60):
            if time.monotonic() > deadline:
                raise TimeoutError("latency consumer did not start")
            time.sleep(0.02)
        bl.log(f"W5 {mode}: {args.rate} records/s for {args.seconds} s ...")
        counters_before = bl.replica_counters(cluster, name)
        try:
            sent = paced_send(producer, name, args.rate, args.seconds, txn, args.commit_interval_ms / 1000.0, keys)
        finally:
            producer.close()
        if sent["aborted_records"]:
            ray.get(consumer.set_expected.remote(sent["sent"] - sent["aborted_records"]), timeout=60)
        res = ray.get(ref, timeout=120)
        ray.kill(consumer)
        calls = bl.calls_per_batch(counters_before, bl.replica_counters(cluster, name))
    lat_s = res["latencies_ns"] / 1e9
    r = {"sent": sent["sent"], "received": res["received"], "achieved_rate": bl.rate(sent["sent"], sent["seconds"]),
         "max_records_behind_schedule": sent["max_records_behind_schedule"], "isolation_level": isolation}
    if txn:
        r["aborted_transactions"] = sent["aborted_transactions"]
        if sent["aborted_transactions"]:
            r.update({"aborted_records": sent["aborted_records"], "first_abort_error": sent["first_abort_error"]})
    r.update(bl.percentiles_ms(lat_s))
    r["replica_calls"] = calls     # this topic's replicas, timed window plus the drain after it
    targets = []
    if txn:
        c = bl.percentiles_ms(sent["commit_s"], qs=(50, 99))
        r.update({"commits": len(sent["commit_s"]), "commit_p50_ms": c["p50_ms"], "commit_p99_ms": c["p99_ms"],
                  "commit_max_ms": c["max_ms"]})
        arrivals = res["seq_last_arrival_ns"]
        vis = np.array([arrivals[s] - t for s, t in sent["commit_end_ns"].items() if s in arrivals], dtype=np.float64)
        v = bl.percentiles_ms(np.clip(vis, 0, None) / 1e9, qs=(50, 99))
        r.update({"visibility_p50_ms": v["p50_ms"], "visibility_p99_ms": v["p99_ms"], "visibility_max_ms": v["max_ms"],
                  "visible_before_commit_returned": int((vis < 0).sum()),
                  "transactions_seen": len(vis)})
        limit = args.commit_interval_ms + 15
        targets += [bl.target(f"W5 txn read_committed e2e p99 <= {limit} ms", r["p99_ms"], "<=", limit, "ms"),
                    bl.target("W5 commit_transaction p50 <= 3 ms", r["commit_p50_ms"], "<=", 3, "ms"),
                    bl.target("W5 commit_transaction p99 <= 10 ms", r["commit_p99_ms"], "<=", 10, "ms"),
                    bl.target("W5 visibility after commit p99 <= 10 ms", r["visibility_p99_ms"], "<=", 10, "ms")]
    else:
        targets.append(bl.target(f"W5 idempotent rf{args.replication_factor} e2e p99 <= 10 ms", r["p99_ms"], "<=",
                                 10, "ms"))
    r["errors"] = sent["sent"] - sent["aborted_records"] - res["received"]
    return r, targets


def run(cluster, argv) -> dict:
    args = bl.finish_args(parser().parse_args(argv), FULL, SMOKE)
    t_start = time.perf_counter()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results, targets, ok = {}, [], True
    for mode in modes:
        r, t = one_mode(cluster, args, mode)
        bl.log(f"W5 {mode}: {r}")
        results.setdefault(f"rf{args.replication_factor}", {})[mode] = r
        targets += t
        ok = ok and r["errors"] == 0
    settings = {"rate": args.rate, "seconds": args.seconds, "partitions": args.partitions,
                "replication_factor": args.replication_factor, "min_insync_replicas": min(2, args.replication_factor),
                "commit_interval_ms": args.commit_interval_ms, "modes": modes, "value_bytes": datagen.VALUE_BYTES,
                "key_bytes": datagen.KEY_BYTES, "acks": "all", "linger_ms": 5, "tick_ms": 1,
                "consumer": "separate Ray actor process, manual assignment"}
    return bl.result("w5_latency", "W5", args, settings, results, targets, t_start, ok)


def main(argv=None) -> int:
    return bl.script_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

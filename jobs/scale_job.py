"""The scale job: W3/W4 with N producer and M consumer actors spread over a multi-node Ray cluster.

    python jobs/scale_job.py                          # embedded local Ray + broker, data in a fresh temp dir
    python jobs/scale_job.py --smoke                  # about a second of producing, tiny batches
    RAY_ADDRESS=host:6379 python jobs/scale_job.py --producers 8 --consumers 4 --partitions 12
    python jobs/scale_job.py --address host:6379 --replication-factor 3 --seconds 60

Steps (the topic name carries a run id, so reruns against one broker do not mix):

1. Create `scale-<run>` (`--partitions`, `--replication-factor`, min.insync.replicas min(2, RF)).
2. Start `--producers` producer and `--consumers` consumer actors, round-robin over the alive
   nodes that have CPUs (NodeAffinitySchedulingStrategy, soft: a full or lost node does not stall
   the job); each reports the node it runs on.
3. W3: every producer runs its own transactional loop (own transactional.id, acks=all) for
   `--seconds`: begin; `send_batch()` Arrow batches of `--batch-rows` keyed records (16-byte key,
   100-byte value) for `--commit-interval-ms`; commit. The key is (producer index, sequence) as two
   big-endian int64s; an aborted transaction's sequences are reused, so producer i's committed
   records are exactly sequences 0 .. committed_i - 1.
4. W4: once no transaction is open on the topic, every consumer (read_committed, manually assigned
   the partitions p with p % M == its index: disjoint subsets, no group) reads its partitions from
   the beginning to their end offsets, decoding the keys vectorised into a bitmap of the ids seen.
5. Check: records read == records committed, no duplicates (ids seen twice, also across
   consumers), none missing, none unexpected (an id outside the committed ranges).

Prints ONE JSON line of figures (aggregate produce records/s and MB/s, consume records/s, per-node
and per-actor figures, settings), then `RESULT produced=N consumed=N duplicates=0 missing=0 OK`
(MISMATCH and exit status 1 otherwise, also on producer errors).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]  # run from a checkout; main_job is a sibling

import ray_broker as rb  # noqa: E402
from main_job import wait_stable  # noqa: E402
from ray_broker.testing import datagen  # noqa: E402

# The actor classes go to Ray workers by value: workers cannot import this script by its name.
if __name__ != "__main__" and __name__ in sys.modules:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FULL = {"seconds": 10.0, "batch_rows": 60_000, "partitions": 6}   # W3/W4 sizes
SMOKE = {"seconds": 1.0, "batch_rows": 500, "partitions": 2}
RECORD_BYTES = datagen.record_bytes()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rate(n: float, seconds: float, scale: float = 1.0) -> float:
    return round(n / seconds / scale, 2) if seconds > 0 else 0.0


def id_keys(producer: int, start: int, rows: int) -> pa.Array:
    """16-byte keys (producer, sequence start..start+rows-1) as two big-endian int64s: 0.3-2 ms per
    60,000 rows here, where ASCII digits (`datagen.kv_keys`) take 13-16 ms, most of the 20 ms such
    a batch may take at W3's target of 3M records/s."""
    m = np.empty((rows, 2), ">i8")
    m[:, 0] = producer
    m[:, 1] = np.arange(start, start + rows)
    return datagen.fixed_width_binary(m.view(np.uint8).reshape(rows, 16))


# A sliver of a CPU, not 0: Ray places a task or actor that asks for no resources on any node and
# ignores its soft node affinity (seen with ray.cluster_utils.Cluster, Ray 2.60).
ACTOR_CPUS = 0.01


def where() -> dict:
    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}


@ray.remote(num_cpus=ACTOR_CPUS)
class ScaleProducer:
    """One transactional producer (W3 loop) in its own process."""

    def __init__(self, namespace: str, topic: str, index: int, transactional_id: str, batch_rows: int):
        self.cluster = rb.connect(namespace=namespace)
        self.topic, self.index, self.rows, self.txn_id = topic, index, batch_rows, transactional_id
        self.values = datagen.kv_values(0, batch_rows)          # values need not be unique: built once
        # batch.size 8 MiB as in W3 (benchmarks/bench_w3_send_batch.py): fewer, larger produce calls
        self.producer = self.cluster.producer(acks="all", transactional_id=transactional_id, batch_size=8 << 20)
        self.producer.init_transactions()

    def where(self) -> dict:
        return where()

    def run(self, seconds: float, commit_interval_s: float) -> dict:
        from ray_broker.errors import TransactionAbortableError

        p = self.producer
        seq = 0                              # next sequence; committed ids are 0 .. seq-1
        commits, aborts, errors, first_error = [], 0, 0, None
        t0 = time.perf_counter()
        end = t0 + seconds
        try:
            while True:
                p.begin_transaction()
                t_end = min(time.perf_counter() + commit_interval_s, end)
                n = 0
                try:
                    while True:
                        keys = id_keys(self.index, seq + n, self.rows)
                        p.send_batch(self.topic, pa.RecordBatch.from_arrays([keys, self.values], ["key", "value"]))
                        n += self.rows
                        if time.perf_counter() >= t_end:
                            break
                    c0 = time.perf_counter()
                    p.commit_transaction(timeout=120)
                    commits.append(time.perf_counter() - c0)
                    seq += n
                except TransactionAbortableError as exc:
                    aborts += 1                  # its sequences are sent again in the next transaction
                    first_error = first_error or repr(exc)[:500]
                    p.abort_transaction(timeout=120)
                # past the deadline only to get one commit in (at most 20 aborts)
                if time.perf_counter() >= end and (commits or aborts > 20):
                    break
        except Exception as exc:  # noqa: BLE001 - fatal (fenced, timeout): reported, fails the job
            errors += 1
            first_error = repr(exc)[:500]
        elapsed = time.perf_counter() - t0
        try:
            p.close()
        except Exception:  # noqa: BLE001
            pass
        ms = np.asarray(commits) * 1000.0
        p50, p99 = (np.percentile(ms, [50, 99]).round(3).tolist() if ms.size else (None, None))
        return {"index": self.index, "transactional_id": self.txn_id, **where(), "records": seq,
                "seconds": round(elapsed, 3), "records_per_s": rate(seq, elapsed),
                "mb_per_s": rate(seq * RECORD_BYTES, elapsed, 1e6), "commits": len(commits),
                "commit_p50_ms": p50, "commit_p99_ms": p99, "aborted_transactions": aborts, "errors": errors,
                "first_error": first_error}


@ray.remote(num_cpus=ACTOR_CPUS)
class ScaleConsumer:
    """One read_committed consumer (W4) of a fixed partition subset, in its own process."""

    def __init__(self, namespace: str, topic: str, index: int, partitions: list[int]):
        self.cluster = rb.connect(namespace=namespace)
        self.index = index
        self.tps = [rb.TopicPartition(topic, p) for p in partitions]

    def where(self) -> dict:
        return where()

    def run(self, committed: list[int], timeout_s: float) -> dict:
        """Read to the end offsets; `committed[i]` = producer i's committed count. Returns figures
        and `seen`, the packed bitmap of the ids read: bit base_i + seq for (producer i, seq), where
        base_i = the records committed by producers 0 .. i-1. `valid`: records with such an id."""
        lim = np.asarray(committed, dtype=np.int64)
        base = np.concatenate([[0], np.cumsum(lim)[:-1]]).astype(np.int64)
        seen = np.zeros(int(lim.sum()), dtype=bool)
        consumer = self.cluster.consumer(isolation_level="read_committed", auto_offset_reset="earliest")
        records = valid = arrow_bytes = 0
        try:
            consumer.assign(self.tps)
            consumer.seek_to_beginning(self.tps)
            end = consumer.end_offsets(self.tps)
            t0 = time.perf_counter()
            deadline = time.monotonic() + timeout_s
            todo = [tp for tp in self.tps if consumer.position(tp) < end[tp]]
            while todo and time.monotonic() < deadline:
                for batch in consumer.poll(timeout=1.0).values():
                    prod, sq = datagen.decode_stamps(batch.column(batch.schema.get_field_index("key")))
                    ok = (prod >= 0) & (prod < len(lim))
                    ok &= (sq >= 0) & (sq < lim[np.where(ok, prod, 0)])
                    seen[base[prod[ok]] + sq[ok]] = True
                    records += batch.num_rows
                    valid += int(ok.sum())
                    arrow_bytes += batch.nbytes
                todo = [tp for tp in todo if consumer.position(tp) < end[tp]]
            elapsed = time.perf_counter() - t0
        finally:
            consumer.close()
        return {"index": self.index, **where(), "partitions": [tp.partition for tp in self.tps],
                "records": records, "seconds": round(elapsed, 3), "records_per_s": rate(records, elapsed),
                "mb_per_s": rate(records * RECORD_BYTES, elapsed, 1e6), "arrow_bytes": arrow_bytes,
                "complete": not todo, "valid": valid, "seen": np.packbits(seen)}


# ------------------------------------------------------------------------------------------ driver
def placement_nodes() -> list[dict]:
    """Alive nodes with CPUs to spread actors over (a head started with --num-cpus=0 is meant to
    stay free of work)."""
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise SystemExit("no alive Ray node with CPUs to run the producer and consumer actors on")
    return nodes


def on_node(node_id: str):
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)


def check(producers: list[dict], consumers: list[dict]) -> dict:
    """Records read vs committed; duplicates and missing ids over all consumers' bitmaps."""
    total = sum(p["records"] for p in producers)
    union = np.zeros(total, dtype=bool)
    for c in consumers:
        union |= np.unpackbits(c.pop("seen"), count=total).view(bool)
    distinct = int(union.sum())
    valid = sum(c["valid"] for c in consumers)
    consumed = sum(c["records"] for c in consumers)
    return {"produced": total, "consumed": consumed, "duplicates": valid - distinct, "missing": total - distinct,
            "unexpected": consumed - valid}


def node_figures(producers: list[dict], consumers: list[dict]) -> dict:
    """Per node: actors on it and the records/s they produced and consumed (records of the node's
    actors / the longest of their run times: they run at the same time)."""
    out: dict = {}
    for kind, actors in (("produce", producers), ("consume", consumers)):
        for a in actors:
            n = out.setdefault(a["node_id"], {"ip": a["ip"], "producers": 0, "consumers": 0, "produce_records": 0,
                                              "produce_seconds": 0.0, "consume_records": 0, "consume_seconds": 0.0})
            n["producers" if kind == "produce" else "consumers"] += 1
            n[kind + "_records"] += a["records"]
            n[kind + "_seconds"] = max(n[kind + "_seconds"], a["seconds"])
    for n in out.values():
        for kind in ("produce", "consume"):
            n[kind + "_records_per_s"] = rate(n[kind + "_records"], n[kind + "_seconds"])
        n["produce_mb_per_s"] = rate(n["produce_records"] * RECORD_BYTES, n["produce_seconds"], 1e6)
    return out


def run(cluster, args, run_id: str) -> dict:
    """Create the topic, run producers then consumers, check; the figures (one JSON object)."""
    ids = [n["NodeID"] for n in placement_nodes()]
    admin = cluster.admin()
    topic = f"scale-{run_id}"
    admin.create_topic(topic, partitions=args.partitions, replication_factor=args.replication_factor,
                       config={"min.insync.replicas": min(2, args.replication_factor)})
    log(f"topic {topic!r}: {args.partitions} partitions, RF {args.replication_factor}; {args.producers} producers "
        f"and {args.consumers} consumers over {len(ids)} nodes")
    # all actors start now, in parallel (each is a new process); consumers stay idle until step 4
    prods = [ScaleProducer.options(scheduling_strategy=on_node(ids[i % len(ids)])).remote(
        cluster.namespace, topic, i, f"scale-{run_id}-p{i}", args.batch_rows) for i in range(args.producers)]
    cons = [ScaleConsumer.options(scheduling_strategy=on_node(ids[j % len(ids)])).remote(
        cluster.namespace, topic, j, list(range(j, args.partitions, args.consumers))) for j in range(args.consumers)]
    try:
        ray.get([a.where.remote() for a in prods + cons], timeout=args.timeout)
        log(f"W3: transactional send_batch({args.batch_rows} rows) for {args.seconds} s on every producer ...")
        t0 = time.perf_counter()
        producers = ray.get([a.run.remote(args.seconds, args.commit_interval_ms / 1000.0) for a in prods],
                            timeout=args.seconds + args.timeout)
        produce_wall = time.perf_counter() - t0
        wait_stable(admin, topic, args.timeout)
        committed = [p["records"] for p in producers]
        log(f"W4: read_committed read-back of {sum(committed)} records ...")
        t0 = time.perf_counter()
        consumers = ray.get([a.run.remote(committed, args.timeout) for a in cons], timeout=args.timeout + 60)
        consume_wall = time.perf_counter() - t0
    finally:
        for a in prods + cons:
            ray.kill(a)
        if not args.keep_topic:
            try:
                admin.delete_topic(topic)
            except Exception as exc:  # noqa: BLE001
                log(f"could not delete topic {topic}: {exc}")
    result = check(producers, consumers)
    result["errors"] = sum(p["errors"] for p in producers)
    result["incomplete_consumers"] = sum(not c["complete"] for c in consumers)
    p_s = max(p["seconds"] for p in producers)
    c_s = max(c["seconds"] for c in consumers)
    return {
        "job": "scale_job", "workload": "W3+W4 multi-node",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "smoke": args.smoke,
        "ok": all_ok(result), "check": result,
        "produce": {"records": result["produced"], "seconds": round(p_s, 3), "wall_seconds": round(produce_wall, 3),
                    "records_per_s": rate(result["produced"], p_s),
                    "mb_per_s": rate(result["produced"] * RECORD_BYTES, p_s, 1e6),
                    "commits": sum(p["commits"] for p in producers),
                    "aborted_transactions": sum(p["aborted_transactions"] for p in producers)},
        "consume": {"records": result["consumed"], "seconds": round(c_s, 3), "wall_seconds": round(consume_wall, 3),
                    "records_per_s": rate(result["consumed"], c_s),
                    "mb_per_s": rate(result["consumed"] * RECORD_BYTES, c_s, 1e6)},
        "nodes": node_figures(producers, consumers), "producers": producers, "consumers": consumers,
        "settings": {"topic": topic, "producers": args.producers, "consumers": args.consumers,
                     "partitions": args.partitions, "replication_factor": args.replication_factor,
                     "seconds": args.seconds, "batch_rows": args.batch_rows,
                     "commit_interval_ms": args.commit_interval_ms, "key_bytes": datagen.KEY_BYTES,
                     "value_bytes": datagen.VALUE_BYTES, "acks": "all", "isolation_level": "read_committed",
                     "consumer_assignment": "manual, partition p to consumer p % consumers"},
        "cluster": {"nodes": len(ids), "cpus": ray.cluster_resources().get("CPU"), "ray": ray.__version__},
    }


def all_ok(r: dict) -> bool:
    return (r["produced"] > 0 and r["consumed"] == r["produced"] and r["duplicates"] == 0 and r["missing"] == 0
            and r["unexpected"] == 0 and r["errors"] == 0 and r["incomplete_consumers"] == 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default=None, help="Ray address of a deployed broker (default: $RAY_ADDRESS)")
    ap.add_argument("--producers", type=int, default=2, help="producer actors (default 2)")
    ap.add_argument("--consumers", type=int, default=2, help="consumer actors, at most --partitions (default 2)")
    ap.add_argument("--partitions", type=int, default=None, help="partitions (default 6; 2 with --smoke)")
    ap.add_argument("--replication-factor", type=int, default=1, help="replication factor (default 1)")
    ap.add_argument("--seconds", type=float, default=None, help="produce this long (default 10; 1 with --smoke)")
    ap.add_argument("--batch-rows", type=int, default=None,
                    help="rows per send_batch Arrow batch (default 60000, 7 MB; 500 with --smoke)")
    ap.add_argument("--commit-interval-ms", type=int, default=100, help="transaction length (default 100)")
    ap.add_argument("--data-dir", default=None,
                    help="broker data dir for the embedded broker (default: a fresh temp dir, removed at the end)")
    ap.add_argument("--namespace", default="ray_broker")
    ap.add_argument("--keep-topic", action="store_true", help="keep the run's topic (default: delete it)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for each phase beyond --seconds")
    ap.add_argument("--smoke", action="store_true", help="about a second of producing, tiny batches")
    args = ap.parse_args(argv)
    for k, v in (SMOKE if args.smoke else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if min(args.producers, args.consumers, args.partitions, args.batch_rows) < 1:
        ap.error("--producers, --consumers, --partitions and --batch-rows must be >= 1")
    if args.consumers > args.partitions:
        ap.error("--consumers must be at most --partitions (each consumer reads its own partitions)")

    embedded = not ray.is_initialized() and not (args.address or os.environ.get("RAY_ADDRESS"))
    tmp = None
    if embedded and args.data_dir is None:
        tmp = args.data_dir = tempfile.mkdtemp(prefix="ray_broker_scale_job_")
    # attached (Ray already up), --address / RAY_ADDRESS, or a new local Ray + broker: rb.connect decides
    cluster = rb.connect(address=args.address, namespace=args.namespace, data_dir=args.data_dir if embedded else None)
    try:
        out = run(cluster, args, uuid.uuid4().hex[:8])
    finally:
        cluster.shutdown()                   # stops Ray and the broker only if connect started them
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out), flush=True)
    r = out["check"]
    print(f"RESULT produced={r['produced']} consumed={r['consumed']} duplicates={r['duplicates']} "
          f"missing={r['missing']} {'OK' if out['ok'] else 'MISMATCH'}", flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

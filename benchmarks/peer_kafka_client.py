"""The peer side of bench_peer.py: W1/W2/W4/W5 against a Kafka-API broker with confluent-kafka (librdkafka).

Runs in the scratch venv that bench_peer.py creates (it needs `confluent_kafka`, which ray_broker's
environment does not have); bench_peer.py starts it as

    <venv>/bin/python benchmarks/peer_kafka_client.py --bootstrap 127.0.0.1:PORT --broker-pid PID [...]

and reads the ONE JSON line it prints. Not a benchmark script by itself (run_all only runs bench_*.py).

Same shapes as ours: 16-byte keys, 100-byte values, one fresh topic of `--partitions` per workload,
acks=all, idempotent, linger.ms 5, batch.size 1 MB. Consumers are manually assigned (no group join:
Tansu answers JoinGroup only after session.timeout.ms/2) with fetch.wait.max.ms 10 (Tansu does not
wake a waiting fetch when data arrives).

- w1: idempotent producer, produce() one record at a time for `--seconds`, then flush.
- w2: transactional producer, produce() one at a time, commit every `--commit-interval-ms`.
- w4: a transactional producer fills a topic with `--w4-records` (commits every 100 ms, untimed);
  then one read_committed consumer reads them back (timed).
- w5: end-to-end latency at `--rate` records/s in 1 ms ticks, consumer in a forked process:
  idempotent (read_uncommitted) and transactional (read_committed, a commit every interval; commit
  call latency; visibility after commit = arrival of a transaction's last record - commit return).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import struct
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
import confluent_kafka
from confluent_kafka.admin import AdminClient, NewTopic

STAMP = struct.Struct(">qq")
CLK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pcts(samples_s: list[float], qs=(50, 90, 99, 99.9)) -> dict:
    xs = sorted(samples_s)
    n = len(xs)
    out = {}
    for q in qs:
        key = "p" + (str(q).replace(".", "") if q != int(q) else str(int(q))) + "_ms"
        if not n:
            out[key] = None
            continue
        # linear interpolation, like numpy.percentile
        pos = (n - 1) * q / 100.0
        lo = int(pos)
        hi = min(n - 1, lo + 1)
        out[key] = round((xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)) * 1000.0, 3)
    out["max_ms"] = round(xs[-1] * 1000.0, 3) if n else None
    out["samples"] = n
    return out


def cpu_s(pid):
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / CLK
    except OSError:
        return None


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, TypeError):
        return None


class Cpu:
    def __init__(self, pid):
        self.pid = pid

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), cpu_s(self.pid)
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        c1 = cpu_s(self.pid)
        self.pct = round(100 * (c1 - self.c0) / wall, 1) if c1 is not None and self.c0 is not None else None
        return False


def keys_values(n: int, key_bytes: int = 16, value_bytes: int = 100):
    keys = [b"s%015d" % i for i in range(n)]
    values = [b"%012d" % i + b"s" * (value_bytes - 12) for i in range(n)]
    return keys, values


def create_topic(bs: str, parts: int, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    adm = AdminClient({"bootstrap.servers": bs})
    for f in adm.create_topics([NewTopic(name, num_partitions=parts, replication_factor=1)]).values():
        f.result(30)
    for _ in range(200):
        t = adm.list_topics(name, timeout=5).topics.get(name)
        if t is not None and t.error is None and len(t.partitions) == parts:
            return name
        time.sleep(0.05)
    raise RuntimeError(f"topic {name} metadata not ready")


def producer_conf(bs: str, **extra) -> dict:
    c = {"bootstrap.servers": bs, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
         "batch.size": 1_000_000, "compression.type": "none", "queue.buffering.max.messages": 1_000_000,
         "queue.buffering.max.kbytes": 1_048_576}
    c.update(extra)
    return c


class Errs:
    def __init__(self):
        self.n = 0
        self.first = None

    def cb(self, err, msg):
        if err is not None:
            self.n += 1
            self.first = self.first or str(err)


def produce(p, topic, value, key, cb):
    while True:
        try:
            p.produce(topic, value=value, key=key, on_delivery=cb)
            return
        except BufferError:
            p.poll(0.005)


# ------------------------------------------------------------------------------------------ W1 / W2
def w1(bs, a, pid, keys, values) -> dict:
    topic = create_topic(bs, a.partitions, "w1")
    errs = Errs()
    p = Producer(producer_conf(bs, **{"delivery.report.only.error": True}))
    p.produce(topic, value=b"warm-up", key=b"warm-up")
    if p.flush(30) != 0:
        raise RuntimeError("warm-up not delivered")
    n = 0
    pool = len(keys)
    with Cpu(pid) as cpu:
        t0 = time.perf_counter()
        end = t0 + a.seconds
        while True:
            i = n % pool
            j = min(pool, i + 1000)
            for k, v in zip(keys[i:j], values[i:j]):
                produce(p, topic, v, k, errs.cb)
            n += j - i
            p.poll(0)
            if time.perf_counter() >= end:
                break
        loop_s = time.perf_counter() - t0
        left = p.flush(120)
        elapsed = time.perf_counter() - t0
    ok = n - errs.n - left
    return {"records": ok, "seconds": round(elapsed, 3), "records_per_s": round(ok / elapsed, 1),
            "mb_per_s": round(ok * 116 / elapsed / 1e6, 2), "send_calls_per_s": round(n / loop_s, 1),
            "errors": errs.n + left, "first_error": errs.first, "broker_cpu_pct": cpu.pct}


def txn_fill(bs, topic, seconds, interval_s, keys, values, max_records=None, pid=None) -> dict:
    errs = Errs()
    p = Producer(producer_conf(bs, **{"transactional.id": f"bench-{uuid.uuid4().hex[:8]}",
                                      "transaction.timeout.ms": 60000, "delivery.report.only.error": True}))
    p.init_transactions(30)
    n = 0
    pool = len(keys)
    commit_s = []
    with Cpu(pid) as cpu:
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            p.begin_transaction()
            t_end = min(time.perf_counter() + interval_s, end)
            k = 0
            while True:
                i = (n + k) % pool
                j = min(pool, i + 200)
                for kk, v in zip(keys[i:j], values[i:j]):
                    produce(p, topic, v, kk, errs.cb)
                k += j - i
                p.poll(0)
                if time.perf_counter() >= t_end or (max_records and n + k >= max_records):
                    break
            c0 = time.perf_counter()
            p.commit_transaction(60)
            commit_s.append(time.perf_counter() - c0)
            n += k
            if time.perf_counter() >= end or (max_records and n >= max_records):
                break
        elapsed = time.perf_counter() - t0
    c = pcts(commit_s, (50, 99))
    return {"records": n - errs.n, "seconds": round(elapsed, 3), "records_per_s": round((n - errs.n) / elapsed, 1),
            "mb_per_s": round((n - errs.n) * 116 / elapsed / 1e6, 2), "commits": len(commit_s),
            "commit_p50_ms": c["p50_ms"], "commit_p99_ms": c["p99_ms"], "commit_max_ms": c["max_ms"],
            "errors": errs.n, "first_error": errs.first, "broker_cpu_pct": cpu.pct}


def w2(bs, a, pid, keys, values) -> dict:
    topic = create_topic(bs, a.partitions, "w2")
    return txn_fill(bs, topic, a.seconds, a.commit_interval_ms / 1000.0, keys, values, pid=pid)


# ------------------------------------------------------------------------------------------ W4
def consumer_conf(bs, isolation, fetch_wait_ms) -> dict:
    return {"bootstrap.servers": bs, "group.id": f"bench-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "isolation.level": isolation, "fetch.wait.max.ms": fetch_wait_ms,
            "fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 4_194_304,
            "queued.max.messages.kbytes": 262_144, "enable.partition.eof": False}


def w4(bs, a, pid, keys, values) -> dict:
    topic = create_topic(bs, a.partitions, "w4")
    fill = txn_fill(bs, topic, a.w4_fill_seconds, 0.1, keys, values, max_records=a.w4_records)
    expected = fill["records"]
    c = Consumer(consumer_conf(bs, "read_committed", a.fetch_wait_ms))
    c.assign([TopicPartition(topic, p, -2) for p in range(a.partitions)])
    n = nbytes = 0
    with Cpu(pid) as cpu:
        t0 = time.perf_counter()
        t_last = t0
        while n < expected:
            msgs = c.consume(10000, 0.1)   # waits for 10000 or the timeout: keep the tail wait short
            now = time.perf_counter()
            if not msgs:
                if now - t_last > 5:
                    break
                continue
            for m in msgs:
                if m.error():
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        log(f"consume error {m.error()}")
                    continue
                n += 1
                nbytes += len(m.value()) + len(m.key() or b"")
            t_last = now
        elapsed = max(t_last - t0, 1e-9)
    c.close()
    return {"records": n, "expected": expected, "seconds": round(elapsed, 3), "records_per_s": round(n / elapsed, 1),
            "mb_per_s": round(nbytes / elapsed / 1e6, 2), "fill_records_per_s": fill["records_per_s"],
            "broker_cpu_pct": cpu.pct, "note": "read_committed on this peer also returns aborted records"}


# ------------------------------------------------------------------------------------------ W5
def _lat_consumer(bs, topic, parts, isolation, fetch_wait_ms, expected, q, ready):
    c = Consumer(consumer_conf(bs, isolation, fetch_wait_ms))
    c.assign([TopicPartition(topic, p, -2) for p in range(parts)])
    for _ in range(5):
        c.poll(0.1)
    ready.set()
    lats, seq_last = [], {}
    got = 0
    t_last = time.time()
    while got < expected and time.time() - t_last < 10:
        m = c.poll(0.05)        # poll(), not consume(n, t): the batch call waits for n or t
        if m is None:
            continue
        now = time.time_ns()
        t_last = time.time()
        if m.error():
            continue
        ts, seq = STAMP.unpack_from(m.value())
        if seq < 0:
            continue
        got += 1
        lats.append((now - ts) / 1e9)
        seq_last[seq] = now
    c.close()
    q.put((lats, seq_last))


def w5_mode(bs, a, pid, txn: bool) -> dict:
    parts = a.partitions
    topic = create_topic(bs, parts, "w5txn" if txn else "w5idem")
    total = int(a.rate * a.w5_seconds)
    ctx = mp.get_context("fork")
    q, ready = ctx.Queue(), ctx.Event()
    isolation = "read_committed" if txn else "read_uncommitted"
    proc = ctx.Process(target=_lat_consumer, args=(bs, topic, parts, isolation, a.fetch_wait_ms, total, q, ready))
    proc.start()
    ready.wait(60)
    extra = {"transactional.id": f"lat-{uuid.uuid4().hex[:8]}", "transaction.timeout.ms": 60000} if txn else {}
    p = Producer(producer_conf(bs, **extra))
    pad = b"x" * (a.value_bytes - STAMP.size)
    keys = [b"s%015d" % i for i in range(10_000)]
    warm = STAMP.pack(0, -1) + pad
    if txn:
        p.init_transactions(30)
        p.begin_transaction()
        for part in range(parts):
            p.produce(topic, value=warm, partition=part)
        p.commit_transaction(30)
    else:
        for part in range(parts):
            p.produce(topic, value=warm, partition=part)
        p.flush(30)
    errs = Errs()
    sent = seq = behind = 0
    commit_s, commit_end = [], {}
    interval = a.commit_interval_ms / 1000.0
    with Cpu(pid) as cpu:
        t0 = time.perf_counter()
        next_commit = t0 + interval
        if txn:
            p.begin_transaction()
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - t0) * a.rate) + 1)
            behind = max(behind, due - sent)
            while sent < due:
                produce(p, topic, STAMP.pack(time.time_ns(), seq) + pad, keys[sent % len(keys)], errs.cb)
                sent += 1
            p.poll(0)
            if txn and time.perf_counter() >= next_commit:
                c0 = time.perf_counter()
                p.commit_transaction(30)
                commit_s.append(time.perf_counter() - c0)
                commit_end[seq] = time.time_ns()
                seq += 1
                p.begin_transaction()
                next_commit = time.perf_counter() + interval
            sl = t0 + (int((time.perf_counter() - t0) * 1000) + 1) / 1000.0 - time.perf_counter()
            if sl > 0:
                time.sleep(sl)
        if txn:
            c0 = time.perf_counter()
            p.commit_transaction(30)
            commit_s.append(time.perf_counter() - c0)
            commit_end[seq] = time.time_ns()
        p.flush(30)
        elapsed = time.perf_counter() - t0
        lats, seq_last = q.get(timeout=120)
    proc.join(15)
    out = {"sent": sent, "received": len(lats), "achieved_rate": round(sent / elapsed, 1),
           "max_records_behind_schedule": behind, "isolation_level": isolation, "errors": errs.n,
           "broker_cpu_pct": cpu.pct}
    out.update(pcts(lats))
    if txn:
        c = pcts(commit_s, (50, 99))
        vis = [seq_last[s] - t for s, t in commit_end.items() if s in seq_last]
        v = pcts([max(0, x) / 1e9 for x in vis], (50, 99))
        out.update({"commits": len(commit_s), "commit_p50_ms": c["p50_ms"], "commit_p99_ms": c["p99_ms"],
                    "commit_max_ms": c["max_ms"], "visibility_p50_ms": v["p50_ms"],
                    "visibility_p99_ms": v["p99_ms"], "visibility_max_ms": v["max_ms"],
                    "visible_before_commit_returned": sum(1 for x in vis if x < 0), "transactions_seen": len(vis)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--broker-pid", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=10.0, help="W1/W2 duration")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--commit-interval-ms", type=int, default=100)
    ap.add_argument("--w4-records", type=int, default=2_000_000)
    ap.add_argument("--w4-fill-seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=10_000)
    ap.add_argument("--w5-seconds", type=float, default=10.0)
    ap.add_argument("--value-bytes", type=int, default=100)
    ap.add_argument("--fetch-wait-ms", type=int, default=10)
    ap.add_argument("--pool", type=int, default=200_000)
    ap.add_argument("--workloads", default="w1,w2,w4,w5")
    a = ap.parse_args(argv)
    wl = set(a.workloads.split(","))
    pid = a.broker_pid
    keys, values = keys_values(a.pool)
    ver = confluent_kafka.version()
    ver = ver[0] if isinstance(ver, tuple) else ver
    res = {"client": f"confluent-kafka {ver} / librdkafka {confluent_kafka.libversion()[0]}",
           "broker_rss_mb_start": rss_mb(pid),
           "settings": {k: v for k, v in vars(a).items() if k not in ("bootstrap",)}}
    if "w1" in wl:
        log("W1 idempotent produce() ...")
        res["w1"] = w1(a.bootstrap, a, pid, keys, values)
        log(json.dumps(res["w1"]))
    if "w2" in wl:
        log("W2 transactional produce() ...")
        res["w2"] = w2(a.bootstrap, a, pid, keys, values)
        log(json.dumps(res["w2"]))
    if "w4" in wl:
        log("W4 read_committed consume ...")
        res["w4"] = w4(a.bootstrap, a, pid, keys, values)
        log(json.dumps(res["w4"]))
    if "w5" in wl:
        log("W5 latency, idempotent ...")
        res["w5_idempotent"] = w5_mode(a.bootstrap, a, pid, False)
        log(json.dumps(res["w5_idempotent"]))
        log("W5 latency, transactional ...")
        res["w5_transactional"] = w5_mode(a.bootstrap, a, pid, True)
        log(json.dumps(res["w5_transactional"]))
    res["broker_rss_mb_end"] = rss_mb(pid)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared plumbing of the benchmark scripts (not a benchmark itself: run_all only runs bench_*.py).

Every `bench_*.py` script follows one protocol so that `run_all.py` can run them either as separate
processes (one Ray each) or all inside ONE process on one embedded Ray (`run_all.py --smoke`):

    def run(cluster, argv: list[str]) -> dict    # the figures (one JSON object), on a broker given to it
    def main(argv=None) -> int                    # own embedded Ray + broker, prints ONE JSON line

`script_main(run, argv)` implements `main` for them. Options common to all scripts: `--smoke`
(tiny sizes, seconds), `--data-dir`. Records come from `ray_broker.testing.datagen`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):   # run from a checkout: `python benchmarks/bench_x.py`
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import ray  # noqa: E402

import ray_broker as rb  # noqa: E402
from ray_broker.protocol import RAY_SYSTEM_CONFIG  # noqa: E402

NAMESPACE = "ray_broker"

# Actor classes below are shipped to Ray workers by value: this module is not importable there.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------------------------------ basics
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def r3(x: float | None) -> float | None:
    return None if x is None else round(float(x), 3)


def percentiles_ms(samples_s, qs=(50, 90, 99, 99.9)) -> dict:
    """{"p50_ms": .., "p90_ms": .., "p99_ms": .., "p999_ms": .., "max_ms": ..} of samples in seconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1000.0
    out = {}
    for q in qs:
        key = "p" + (str(q).replace(".", "") if q != int(q) else str(int(q))) + "_ms"
        out[key] = r3(np.percentile(a, q)) if a.size else None
    out["max_ms"] = r3(a.max()) if a.size else None
    out["samples"] = int(a.size)
    return out


def rate(records: float, seconds: float) -> float:
    return round(records / seconds, 1) if seconds > 0 else 0.0


def mb_per_s(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 2) if seconds > 0 else 0.0


def machine() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    import pyarrow

    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_gib": mem_gib,
            "loadavg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "ray": ray.__version__, "pyarrow": pyarrow.__version__, "ray_broker": rb.__version__}


def target(name: str, value, op: str, threshold, unit: str = "") -> dict:
    """One target of issue 7: value `op` threshold ('>=' or '<=')."""
    met = None
    if value is not None:
        met = bool(value >= threshold) if op == ">=" else bool(value <= threshold)
    return {"target": name, "value": value, "op": op, "threshold": threshold, "unit": unit, "met": met}


# ------------------------------------------------------------------------------------------ memory
def _proc_kb(pid: int, path: str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_mb(pid: int) -> float | None:
    """Proportional set size of a process from /proc/<pid>/smaps_rollup, MB (MiB)."""
    kb = _proc_kb(pid, "smaps_rollup", "Pss")
    return None if kb is None else round(kb / 1024, 1)


def pss_parts_mb(pid: int) -> dict:
    """PSS split by kind (smaps_rollup): anon (the process's own heap), file (mapped files: for a
    replica, the page cache of its segments) and shmem (for a Ray worker, Ray's object store)."""
    out: dict = {"anon": None, "file": None, "shmem": None}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:       # one read: the sampler calls this often
            for line in f:
                kind = line.split(":")[0].removeprefix("Pss_").lower()
                if line.startswith("Pss_") and kind in out:
                    out[kind] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def rss_mb(pid: int) -> float | None:
    kb = _proc_kb(pid, "smaps_rollup", "Rss")
    return None if kb is None else round(kb / 1024, 1)


def actor_pid(handle) -> int:
    return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60))


@ray.remote(num_cpus=0)
class BareActor:
    """The baseline of the memory benchmark: a Ray actor that does nothing."""

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
class SinkActor:
    """The platform baseline under load: a Ray actor that receives Arrow batches the way a leader
    does (the same arguments through Ray) and writes each to a file once, keeping nothing."""

    def __init__(self):
        fd, self._path = tempfile.mkstemp(prefix="ray_broker_sink_")
        os.close(fd)

    def pid(self) -> int:
        return os.getpid()

    def take(self, batch) -> int:
        import pyarrow as pa
        with pa.OSFile(self._path, "wb") as f, pa.ipc.new_stream(f, batch.schema) as w:
            w.write_batch(batch)
        return batch.num_rows

    def close(self) -> None:
        os.unlink(self._path)


# ------------------------------------------------------------------------------------------ platform floor
@ray.remote(num_cpus=0)
class LogSinkActor:
    """The platform floor of a partition replica: receives Arrow batches through Ray (the argument a
    leader gets) and appends each to an Arrow IPC stream on the local disk. A leader forwards each
    batch to its followers and replies once they appended it (acks=all). Nothing else: no index, CRC,
    producer state, transactions or fetches. It keeps what it wrote until `close()`, as a log does:
    on this VM a write into new page-cache pages costs ~10x one into pages freed moments ago
    (RESULTS.md), so a floor that truncated its file would not pay what a log pays."""

    def __init__(self, followers: list | None = None):
        self._followers = list(followers or [])
        fd, self._path = tempfile.mkstemp(prefix="ray_broker_floor_")
        os.close(fd)
        self._file = self._writer = None

    async def append(self, batch) -> int:
        import asyncio

        import pyarrow as pa

        acks = [f.append.remote(batch) for f in self._followers]
        if self._writer is None:
            self._file = pa.OSFile(self._path, "wb")
            self._writer = pa.ipc.new_stream(self._file, batch.schema)
        self._writer.write_batch(batch)
        if acks:
            await asyncio.gather(*acks)
        return batch.num_rows

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        os.unlink(self._path)


class PlatformFloor:
    """What Ray, Arrow and the disk alone allow for a produce workload's shape: the records of keyed
    Arrow batches hashed (murmur2, vectorised) and split by partition in the driver, one Ray call per
    partition per call round to that partition's `LogSinkActor` (followers behind it at RF > 1), at
    most `in_flight` calls out per partition (Kafka's max.in.flight default). Each call carries about
    as many rows as one of `batches` (W3: 60,000 rows, 7.4 MB, about the producer's largest call at
    batch.size 8 MiB), so the floor pays no more calls per byte than the broker may. A benchmark
    runs it beside the broker in the same process and reports the broker's figure over it."""

    def __init__(self, batches: list, partitions: int, replication_factor: int, in_flight: int = 5):
        import pyarrow as pa

        from ray_broker.client.partitioner import partitions_for_keys

        self._hash = partitions_for_keys
        self.partitions = partitions
        self.in_flight = in_flight
        # an input batch per call round: every partition's call gets about one batch's rows
        n = len(batches)
        self._inputs = [pa.Table.from_batches([batches[(k * partitions + j) % n] for j in range(partitions)])
                        .combine_chunks().to_batches(max_chunksize=None)[0] for k in range(2)]
        self._followers = [[LogSinkActor.remote() for _ in range(replication_factor - 1)] for _ in range(partitions)]
        self._leaders = [LogSinkActor.remote(f) for f in self._followers]
        warm = batches[0].slice(0, 1)
        ray.get([s.append.remote(warm) for s in self._leaders], timeout=120)

    def run(self, seconds: float) -> dict:
        """records/s over `seconds` (every call acknowledged)."""
        import collections

        from ray_broker.client.batching import split_by_partition

        queues = [collections.deque() for _ in range(self.partitions)]
        records = calls = i = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            batch = self._inputs[i % len(self._inputs)]
            i += 1
            for p, sub, _ in split_by_partition(batch, self._hash(batch.column(0), self.partitions)):
                q = queues[p]
                if len(q) >= self.in_flight:
                    records += ray.get(q.popleft())
                q.append(self._leaders[p].append.remote(sub))
                calls += 1
        for q in queues:
            records += sum(ray.get(list(q)))
        elapsed = time.perf_counter() - t0
        return {"records": records, "seconds": r3(elapsed), "records_per_s": rate(records, elapsed),
                "calls": calls, "rows_per_call": round(records / max(1, calls))}

    def close(self) -> None:
        actors = self._leaders + [f for fs in self._followers for f in fs]
        try:
            ray.get([a.close.remote() for a in actors], timeout=60)
        except Exception as exc:  # noqa: BLE001 - a leftover temp file is not worth failing a benchmark
            log(f"platform floor: close failed: {exc}")
        for a in actors:
            ray.kill(a)


def floor_figures(ours: float, runs: list[dict]) -> dict:
    """The floor's runs (alternating with the broker's), its records/s over all of them, and the
    broker's figure over that."""
    records = sum(r["records"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    floor = rate(records, seconds)
    return {"platform_floor": {"runs": runs, "records_per_s": floor,
                               "broker_over_floor": round(ours / floor, 3) if floor else None}}


# ------------------------------------------------------------------------------------------ broker
def start_embedded(data_dir: str | None = None, config: dict | None = None):
    """A NEW local Ray (never an existing cluster) with a broker; returns (cluster, temp dir or None)."""
    tmp = None
    if data_dir is None:
        tmp = data_dir = tempfile.mkdtemp(prefix="ray_broker_bench_")
    for attempt in range(2):
        try:
            ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False, configure_logging=False, _system_config=dict(RAY_SYSTEM_CONFIG))
            break
        except Exception as exc:  # noqa: BLE001 - "node timed out during startup" on an overloaded machine
            ray.shutdown()
            if attempt:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            log(f"ray.init failed ({exc}); retrying once")
            time.sleep(5)
    rb.deploy(NAMESPACE, data_dir, config)
    return rb.connect(namespace=NAMESPACE), tmp


def stop_embedded(cluster, tmp: str | None) -> None:
    try:
        cluster.shutdown()
    except Exception:  # noqa: BLE001
        pass
    try:
        ray.get(cluster.controller.shutdown_broker.remote(), timeout=10)
    except Exception:  # noqa: BLE001
        pass
    ray.shutdown()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextmanager
def topic(cluster, prefix: str, partitions: int, replication_factor: int, config: dict | None = None,
          schema=None):
    """A fresh topic, deleted afterwards (every replica is an actor process: keep few alive)."""
    name = unique(prefix)
    cfg = {"min.insync.replicas": min(2, replication_factor)}
    cfg.update(config or {})
    admin = cluster.admin()
    admin.create_topic(name, partitions=partitions, replication_factor=replication_factor, config=cfg,
                       schema=schema)
    try:
        yield name
    finally:
        try:
            admin.delete_topic(name)
        except Exception as exc:  # noqa: BLE001
            log(f"could not delete topic {name}: {exc}")


def high_watermarks(cluster, name: str) -> list[int]:
    return [p.high_watermark for p in cluster.admin().describe_topic(name).partitions]


def replica_counters(cluster, name: str) -> dict[str, int]:
    """The request counters (`ray-broker metrics`) of every replica of topic `name`, summed."""
    reports = ray.get(cluster.controller.replica_reports.remote(), timeout=60)
    out: dict[str, int] = {}
    for key, r in reports.items():
        if key.rsplit("/", 2)[0] == name:
            for k, v in (r.get("counters") or {}).items():
                out[k] = out.get(k, 0) + v
    return out


def calls_per_batch(before: dict, after: dict) -> dict:
    """Ray calls the replicas took between two `replica_counters`, per produce call."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    produce = d.get("produce_requests", 0)
    out = {"produce_calls": produce, "replication_calls": d.get("replication_requests", 0),
           "fetch_calls": d.get("fetch_requests", 0), "records_in": d.get("records_in", 0)}
    if produce:
        out["records_per_produce_call"] = round(out["records_in"] / produce, 1)
        out["replica_calls_per_produce_call"] = round((produce + out["replication_calls"] + out["fetch_calls"])
                                                      / produce, 2)
    return out


def wait_for_leader(cluster, name: str, partition: int, timeout_s: float = 60.0) -> int:
    """The partition's leader, waiting through an election in progress."""
    admin = cluster.admin()
    deadline = time.monotonic() + timeout_s
    while True:
        leader = admin.describe_topic(name).partitions[partition].leader
        if leader is not None:
            return leader
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}/{partition} has no leader after {timeout_s} s")
        time.sleep(0.05)


def wait_stable(cluster, name: str, timeout_s: float = 60.0) -> None:
    """Until every partition's last stable offset equals its high watermark (markers written)."""
    admin = cluster.admin()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parts = admin.describe_topic(name).partitions
        if all(p.last_stable_offset == p.high_watermark >= 0 for p in parts):
            return
        time.sleep(0.05)
    raise TimeoutError(f"topic {name} not stable after {timeout_s} s")


def consume_all(cluster, name: str, partitions: int, isolation: str = "read_committed",
                timeout_s: float = 300.0, record_bytes: int | None = None, config: dict | None = None,
                on_poll: Callable | None = None) -> dict:
    """Read `name` from the beginning up to its end offsets (as of the start) with one consumer,
    manually assigned to every partition; throughput figures. MB/s counts `record_bytes` per record
    (payload), arrow_mb_per_s the bytes of the Arrow batches received (offset and timestamp included).
    `config`: more consumer configs (fetch sizes, ...); `on_poll(consumer, polled)` runs after every poll."""
    tps = [rb.TopicPartition(name, p) for p in range(partitions)]
    consumer = cluster.consumer(config, isolation_level=isolation, auto_offset_reset="earliest")
    try:
        consumer.assign(tps)
        consumer.seek_to_beginning(tps)
        end = consumer.end_offsets(tps)
        records = nbytes = polls = 0
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        todo = [tp for tp in tps if consumer.position(tp) < end[tp]]
        while todo and time.monotonic() < deadline:
            polled = consumer.poll(timeout=1.0)
            if on_poll is not None:
                on_poll(consumer, polled)
            for _, batch in polled.items():
                records += batch.num_rows
                nbytes += batch.nbytes
            polls += 1
            todo = [tp for tp in todo if consumer.position(tp) < end[tp]]
        elapsed = max(time.perf_counter() - t0, 1e-9)
        out = {"records": records, "seconds": r3(elapsed), "records_per_s": rate(records, elapsed),
               "arrow_mb_per_s": mb_per_s(nbytes, elapsed), "polls": polls, "complete": not todo}
        if record_bytes:
            out["mb_per_s"] = mb_per_s(records * record_bytes, elapsed)
        return out
    finally:
        consumer.close()


# ------------------------------------------------------------------------------------------ produce loops
class TxnLoop:
    """Transactional produce loop: begin, call `step()` until `commit_interval_s` passed, commit; repeat
    until `seconds` passed (or `max_records`). `step()` queues some records and returns how many.

    A transaction that fails abortably (`TransactionAbortableError`, from a send or the commit) is
    aborted and counted (`aborted_transactions`, `aborted_records`, `first_abort_error`); the loop
    goes on (past `seconds` until one transaction committed). `records` counts committed records
    only. Fatal errors raise."""

    def __init__(self, producer, commit_interval_s: float):
        self.producer = producer
        self.interval = commit_interval_s
        self.commit_s: list[float] = []
        self.records = 0
        self.elapsed = 0.0
        self.aborts = 0
        self.aborted_records = 0
        self.first_abort_error: str | None = None

    def _aborted(self, exc: BaseException, n: int) -> None:
        self.aborts += 1
        self.aborted_records += n
        if self.first_abort_error is None:
            self.first_abort_error = repr(exc)[:500]
            log(f"transaction aborted: {self.first_abort_error}")
        self.producer.abort_transaction(timeout=120)

    def run(self, step: Callable[[], int], seconds: float, max_records: int | None = None,
            min_commits: int = 1) -> None:
        """Until `seconds` passed and at least `min_commits` transactions committed (at most 20 aborts
        past the deadline), or `max_records` committed."""
        from ray_broker.errors import TransactionAbortableError

        p = self.producer
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            p.begin_transaction()
            t_end = min(time.perf_counter() + self.interval, end)
            n = 0
            try:
                while True:
                    n += step()
                    if time.perf_counter() >= t_end or (max_records is not None and self.records + n >= max_records):
                        break
                c0 = time.perf_counter()
                p.commit_transaction(timeout=120)
                self.commit_s.append(time.perf_counter() - c0)
                self.records += n
            except TransactionAbortableError as exc:
                self._aborted(exc, n)
            now = time.perf_counter()
            if max_records is not None and self.records >= max_records:
                break
            if now >= end and (len(self.commit_s) >= min_commits or self.aborts > 20):
                break
        self.elapsed = time.perf_counter() - t0

    @classmethod
    def merged(cls, loops: list["TxnLoop"]) -> "TxnLoop":
        """One loop's figures over several runs (records and time summed, commits pooled)."""
        out = cls(loops[0].producer, loops[0].interval)
        for lp in loops:
            out.commit_s += lp.commit_s
            out.records += lp.records
            out.elapsed += lp.elapsed
            out.aborts += lp.aborts
            out.aborted_records += lp.aborted_records
            out.first_abort_error = out.first_abort_error or lp.first_abort_error
        return out

    def figures(self, record_bytes: int | None = None) -> dict:
        c = percentiles_ms(self.commit_s, qs=(50, 99))
        out = {"records": self.records, "seconds": r3(self.elapsed), "records_per_s": rate(self.records, self.elapsed),
               "commits": len(self.commit_s), "commit_p50_ms": c["p50_ms"], "commit_p99_ms": c["p99_ms"],
               "commit_max_ms": c["max_ms"], "aborted_transactions": self.aborts}
        if self.aborts:
            out.update({"aborted_records": self.aborted_records, "first_abort_error": self.first_abort_error})
        if record_bytes:
            out["mb_per_s"] = mb_per_s(self.records * record_bytes, self.elapsed)
        return out


# ------------------------------------------------------------------------------------------ latency consumer
@ray.remote(num_cpus=0, max_concurrency=2)
class LatencyConsumer:
    """Reads a topic from the beginning in its own process and records, per record, arrival time minus
    the send time stamped in the value (`datagen.stamped_value`), and per sequence number (e.g. the
    transaction) the arrival time of its last record. seq < 0 marks warm-up records (ignored)."""

    def __init__(self, namespace: str, topic: str, partitions: int, isolation: str):
        import ray_broker as rb_

        self.cluster = rb_.connect(namespace=namespace)
        self.consumer = self.cluster.consumer(isolation_level=isolation, auto_offset_reset="earliest")
        self.consumer.assign([rb_.TopicPartition(topic, p) for p in range(partitions)])
        self.consumer.poll(timeout=0.2)
        self.running = False

    def started(self) -> bool:
        return self.running

    def set_expected(self, expected: int) -> None:
        """Fewer records will come (aborted transactions): stop at this count."""
        self.expected = expected

    def run(self, expected: int, idle_timeout_s: float = 10.0) -> dict:
        from ray_broker.testing.datagen import decode_stamps

        self.expected = expected
        self.running = True
        lats: list[np.ndarray] = []
        seq_last: dict[int, int] = {}
        got = 0
        last = time.monotonic()
        while got < self.expected and time.monotonic() - last < idle_timeout_s:
            out = self.consumer.poll(timeout=0.05)
            if not out:
                continue
            now = time.time_ns()
            last = time.monotonic()
            for batch in out.values():
                ts, seq = decode_stamps(batch.column(batch.schema.get_field_index("value")))
                keep = seq >= 0
                ts, seq = ts[keep], seq[keep]
                got += len(ts)
                lats.append(now - ts)
                for s in np.unique(seq).tolist():
                    seq_last[s] = now
        self.consumer.close()
        lat = np.concatenate(lats) if lats else np.empty(0, np.int64)
        return {"latencies_ns": lat, "seq_last_arrival_ns": seq_last, "received": got}


# ------------------------------------------------------------------------------------------ client in its own process
@ray.remote(num_cpus=0)
class ClientProcess:
    """A producer or a consumer in a Ray worker process of its own, so that its memory (`pss_mb(pid)`,
    sampled from the driver) is the client's and not the driver's. One client per actor: the memory
    benchmark starts a fresh one per measurement. Records: `datagen.kv_batch` (16-byte key, 100-byte
    value). Nothing returned by the client is kept (no futures, no polled batches), so whatever grows
    with the amount of data is the client's own."""

    def __init__(self, namespace: str):
        import ray_broker as rb_

        self.cluster = rb_.connect(namespace=namespace)
        self.producer = None
        self.batches: list = []

    def pid(self) -> int:
        return os.getpid()

    def open_producer(self, topic: str, config: dict, batch_rows: int) -> int:
        """Make the producer and the send_batch batches (cycled), warm up with one record of each kind
        (metadata, sender thread, first produce calls); returns the records written."""
        from ray_broker.testing import datagen

        self.batches = [datagen.kv_batch(i * batch_rows, batch_rows) for i in range(4)]
        self.producer = self.cluster.producer(config)
        self.producer.send_batch(topic, self.batches[0].slice(0, 1)).result(timeout=60)
        self.producer.send(topic, b"warm-up", b"warm-up").result(timeout=60)
        return 2

    def produce(self, topic: str, records: int, per_record: bool, chunk: int = 10_000) -> dict:
        """Write `records` records with `send()` (`per_record`) or send_batch, flush, close. The
        producer's reserved bytes (`_used_bytes`: queued plus unacknowledged) are sampled every 5 ms."""
        from ray_broker.testing import datagen

        p = self.producer
        stop = threading.Event()
        used = [0, 0]    # max, samples
        errors: list = []

        def sample() -> None:
            while not stop.wait(0.005):
                used[0] = max(used[0], p._used_bytes)
                used[1] += 1

        def done(fut) -> None:
            if fut.exception(timeout=0) is not None:
                errors.append(repr(fut.exception(timeout=0))[:300])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        sent = 0
        try:
            while sent < records:
                if per_record:
                    n = min(chunk, records - sent)
                    keys, values = datagen.kv_lists(sent, n)
                    for k, v in zip(keys, values):
                        p.send(topic, v, k)
                    del keys, values
                else:
                    batch = self.batches[(sent // max(1, self.batches[0].num_rows)) % len(self.batches)]
                    n = min(batch.num_rows, records - sent)
                    p.send_batch(topic, batch if n == batch.num_rows else batch.slice(0, n)).add_done_callback(done)
                sent += n
            p.flush(timeout=300)
            elapsed = time.perf_counter() - t0
        finally:
            stop.set()
            sampler.join(timeout=5)
        p.close()
        return {"records": sent, "seconds": r3(elapsed), "records_per_s": rate(sent, elapsed),
                "max_used_bytes": used[0], "used_bytes_samples": used[1], "errors": len(errors),
                "first_error": errors[0] if errors else None}

    def open_consumer(self, topic: str, partitions: int, config: dict) -> None:
        """Warm up: a consumer with `config` looks up the partitions' offsets (metadata, leader handles)."""
        tps = [rb.TopicPartition(topic, p) for p in range(partitions)]
        c = self.cluster.consumer(config)
        c.assign(tps)
        c.beginning_offsets(tps)
        c.end_offsets(tps)
        c.close()

    def consume(self, topic: str, partitions: int, config: dict, record_bytes: int) -> dict:
        """`consume_all` with `config`; also the most the consumer held fetched but not yet returned
        plus what one poll returned (Arrow nbytes, taken after every poll: fetch results are added
        only inside poll, before it hands batches out), and the largest batch seen."""
        peak = {"held": 0, "poll": 0, "batch": 0}

        def on_poll(consumer, polled) -> None:
            left = [b.nbytes for ps in consumer._parts.values() for b in ps.buffer]
            got = [b.nbytes for b in polled.values()]
            peak["held"] = max(peak["held"], sum(left) + sum(got))
            peak["poll"] = max(peak["poll"], sum(got))
            peak["batch"] = max(peak["batch"], max(left, default=0), max(got, default=0))

        out = consume_all(self.cluster, topic, partitions, "read_committed", record_bytes=record_bytes,
                          config=config, on_poll=on_poll)
        out.update({"max_held_bytes": peak["held"], "max_poll_bytes": peak["poll"],
                    "largest_batch_bytes": peak["batch"]})
        return out

    def consume_passes(self, topic: str, partitions: int, config: dict, record_bytes: int, passes: int) -> dict:
        """`consume_all` `passes` times over the same topic in this one process, a fresh consumer each
        pass: this process's PSS peak per pass (sampled in-process every 0.05 s). Whether a client's
        memory grows with what it has read shows here without a topic many times larger."""
        pid = os.getpid()
        peaks, records = [], []
        for _ in range(passes):
            with Sampler(lambda: pss_mb(pid), 0.05) as s:
                out = consume_all(self.cluster, topic, partitions, "read_committed", record_bytes=record_bytes,
                                  config=config)
            peaks.append(max(s.values, default=None))
            records.append(out["records"])
        return {"records_per_pass": records, "complete": all(r == records[0] for r in records),
                "pss_peak_per_pass_mb": peaks}


# ------------------------------------------------------------------------------------------ script protocol
def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmark runs, in seconds")
    ap.add_argument("--data-dir", default=None, help="broker data dir (default: a fresh temp dir, removed after)")
    return ap


def finish_args(args, full: dict, smoke: dict):
    """Options left at None take the full-run default, or the smoke default with --smoke."""
    defaults = dict(full)
    if args.smoke:
        defaults.update(smoke)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def ints(csv: str) -> list[int]:
    return [int(x) for x in str(csv).split(",") if x.strip()]


def result(benchmark: str, workload: str, args, settings: dict, results: dict, targets: list | None,
           t_start: float, ok: bool = True, notes: list | None = None) -> dict:
    out = {"benchmark": benchmark, "workload": workload, "date": now_iso(), "smoke": bool(args.smoke),
           "ok": bool(ok), "settings": settings, "results": results, "targets": targets or [],
           "environment": machine(), "wall_seconds": round(time.perf_counter() - t_start, 1)}
    if notes:
        out["notes"] = notes
    return out


def script_main(run: Callable, argv=None) -> int:
    """`main()` of a bench script: its own embedded Ray + broker, ONE JSON line on stdout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    data_dir = None
    if "--data-dir" in argv:
        data_dir = argv[argv.index("--data-dir") + 1]
    if "-h" in argv or "--help" in argv:
        run(None, argv)           # argparse prints the help and exits
        return 0
    cluster, tmp = start_embedded(data_dir)
    try:
        out = run(cluster, argv)
    finally:
        stop_embedded(cluster, tmp)
    print(json.dumps(out), flush=True)
    return 0 if out.get("ok", True) else 1


class Sampler:
    """Calls `fn()` every `interval_s` in a background thread; keeps the values (None skipped)."""

    def __init__(self, fn: Callable, interval_s: float = 0.25):
        self.fn = fn
        self.interval = interval_s
        self.values: list = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self.fn()
            if v is not None:
                self.values.append(v)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=5)
        return False

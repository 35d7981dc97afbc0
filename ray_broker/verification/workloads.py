"""Workloads for `ray-broker verify`: client threads that drive the broker and record a `History`.

Every value written is a unique string "<worker>-<n>" (e.g. "q1-17", "t0-42"), so each read can be
traced back to exactly one send. Workers run as threads of the driver; they share a `RunContext`
(the history, the current `Cluster`, a stop flag and the "gate" the nemesis uses to park every
client around a whole-cluster restart).

- topics: two topics (3 partitions, RF 3, min.insync.replicas 2) shared by the run's workloads;
  two assigned readers (read_committed and read_uncommitted) poll every partition back, now and
  then seeking backwards.
- `queue`: idempotent (non-transactional, acks=all) producers send 1-8 single records to random
  partitions, then wait for the acknowledgements.
- `txn`: transactional producers write 2-10 records per transaction to random partitions and
  commit (70 %) or abort at random.
  A producer whose commit/abort outcome is unknown, or that is fenced, is replaced by a new instance
  with the same transactional.id (which fences the old one and resolves its transaction).
- `final_read`: after the run, wait for LSO == HW and read every partition completely under both
  isolation levels (`FinalRead` events: the ground truth for the checker).

- `copier`: Kafka's transactional-copier system test. Copiers in one consumer group (read_committed,
  subscribed to the shared topics) copy every record they poll to an output topic inside a
  transaction that also carries their input offsets (`send_offsets_to_transaction`); each output
  value names its input, so the checker can demand exactly one visible output per committed input.
  Run alone, it brings its own idempotent input writer.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable

from .history import (
    READ_COMMITTED, READ_UNCOMMITTED, Assign, CopyOutput, FinalRead, History, OffsetCommit, Poll, Rebalance, Seek,
    SendFail, SendOk, SendUnknown, TxnAbort, TxnBegin, TxnCommit, TxnCommitStart,
)

log = logging.getLogger(__name__)

WORKLOADS = ("queue", "txn", "copier")
COPIER_OUTPUT = "copier_out"

PRODUCER_TIMEOUTS = {"delivery_timeout_ms": 30_000, "request_timeout_ms": 10_000, "max_block_ms": 30_000,
                     "linger_ms": 2}
CONSUMER_TIMEOUTS = {"request_timeout_ms": 10_000, "fetch_max_wait_ms": 200}


class RunContext:
    """State shared by workers and the nemesis."""

    def __init__(self, cluster, history: History, seed: int, run_id: str, connect: Callable[[], Any] | None = None):
        self.cluster = cluster
        self.history = history
        self.seed = seed
        self.run_id = run_id
        self.connect = connect          # makes a new Cluster after a whole-cluster restart (embedded only)
        self.node_cluster = None        # ray.cluster_utils.Cluster of a multi-node run (--nodes N)
        self.node_count = 1
        self._main_calls: "queue.Queue[tuple[Callable[[], Any], Future]]" = queue.Queue()
        self.stop = threading.Event()
        self.generation = 0             # bumped by every cluster restart: clients must be rebuilt
        self.topics: dict[str, list[str]] = {}   # workload -> topics
        self.partitions = 3
        self.workers: list["Worker"] = []
        # gate: workers hold it (shared) around each operation; a cluster restart takes it exclusively
        self._gate = threading.Condition()
        self._active = 0
        self._closed = False

    def record(self, event):
        return self.history.record(event)

    @contextmanager
    def op(self):
        with self._gate:
            while self._closed:
                self._gate.wait(0.5)
                if self.stop.is_set() and self._closed:
                    break
            self._active += 1
        try:
            yield
        finally:
            with self._gate:
                self._active -= 1
                self._gate.notify_all()

    @contextmanager
    def exclusive(self, timeout: float = 90.0):
        """Park every worker between operations (waiting up to `timeout` for in-flight ones)."""
        with self._gate:
            self._closed = True
            deadline = time.monotonic() + timeout
            while self._active > 0 and time.monotonic() < deadline:
                self._gate.wait(0.2)
            parked = self._active == 0
        try:
            yield parked
        finally:
            with self._gate:
                self._closed = False
                self._gate.notify_all()

    def call_in_main(self, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run `fn` on the driver's main thread (Ray starts node processes with signal handlers,
        which only the main thread may install) and return its result."""
        fut: Future = Future()
        self._main_calls.put((fn, fut))
        return fut.result(timeout)

    def run_main_calls(self) -> None:
        """Serve `call_in_main` requests; the runner calls this from its main-thread loops."""
        while True:
            try:
                fn, fut = self._main_calls.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def all_tps(self, workload: str | None = None) -> list[tuple[str, int]]:
        topics = self.topics.get(workload, []) if workload else [t for ts in self.topics.values() for t in ts]
        return [(t, p) for t in topics for p in range(self.partitions)]


def setup_topics(ctx: RunContext, workloads: list[str], partitions: int = 3, replication_factor: int = 3,
                 min_isr: int = 2, topics: int = 2) -> None:
    """`topics` topics shared by all workloads of the run (values name their writer, so idempotent and
    transactional writes can share partitions; that also checks the LSO with mixed traffic, and
    halves the replica actors to start on a small machine)."""
    from ..errors import BrokerTimeoutError, TopicAlreadyExistsError

    admin = ctx.cluster.admin()
    ctx.partitions = partitions
    names = []
    for i in range(topics):
        # Work-around for a controller liveness bug (docs/verification.md, "Known problems"): on a
        # loaded machine replicas slower than the controller's startup grace leave the ISR before a
        # first leader exists, and the partition stays leaderless. Such a topic is deleted and
        # created again under a new name.
        for attempt in range(4):
            name = f"verify-{ctx.run_id}-{i}" + (f"-r{attempt}" if attempt else "")
            try:
                admin.create_topic(name, partitions=partitions, replication_factor=replication_factor,
                                   config={"min.insync.replicas": min_isr})
                names.append(name)
                break
            except TopicAlreadyExistsError:
                names.append(name)
                break
            except BrokerTimeoutError as exc:
                log.warning("create_topic %s: %s", name, exc)
            if _has_leaders(admin, name, timeout=30.0):
                names.append(name)
                break
            print(f"topic {name}: partitions without a leader after create_topic (controller bug, see "
                  f"docs/verification.md); deleting it and trying again", flush=True)
            try:
                admin.delete_topic(name)
            except Exception as exc:  # noqa: BLE001
                log.warning("delete_topic %s: %s", name, exc)
        else:
            raise TimeoutError(f"could not create topic {i} with leaders for every partition")
    ctx.topics = {"shared": names}
    if "copier" in workloads:
        out = f"verify-{ctx.run_id}-out"
        try:
            admin.create_topic(out, partitions=partitions, replication_factor=replication_factor,
                               config={"min.insync.replicas": min_isr})
        except TopicAlreadyExistsError:
            pass
        ctx.topics[COPIER_OUTPUT] = [out]
    if not wait_stable(ctx, timeout=120):
        raise TimeoutError(f"topics {names} have no leaders / LSO != HW after 120 s")


def _has_leaders(admin, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(p.leader is not None for p in admin.describe_topic(name).partitions):
                return True
        except Exception:  # noqa: BLE001
            pass
        time.sleep(1.0)
    return False


def _err(exc: BaseException) -> str:
    s = f"{type(exc).__name__}: {exc}"
    return s if len(s) <= 300 else s[:297] + "..."


def _definite_failure(exc: BaseException) -> bool:
    """True only when the error proves the record was NOT written. Conservative (KAFKA-13574's
    lesson): a batch can fail with a definite-looking error (fenced, out of order ...) after an
    earlier attempt of it had an ambiguous outcome, so only "never sent" counts as a failure:
    `TransactionAbortableError` for records the producer dropped unsent (abort / earlier failure).
    Errors raised by `send()` itself are recorded as failures where it is called."""
    from ..errors import TransactionAbortableError

    return isinstance(exc, TransactionAbortableError)


class Worker(threading.Thread):
    """A client thread; `run_loop` does one operation per call until the run stops."""

    def __init__(self, ctx: RunContext, name: str, seed: int):
        super().__init__(name=f"verify-{name}", daemon=True)
        self.ctx = ctx
        self.wid = name
        self.rng = random.Random(seed)
        self.generation = -1
        self.ops = 0
        self.errors = 0
        self.last_error = ""

    def run(self) -> None:
        while not self.ctx.stop.is_set():
            try:
                with self.ctx.op():
                    if self.ctx.stop.is_set():
                        break
                    if self.generation != self.ctx.generation:
                        self.generation = self.ctx.generation
                        self.rebuild()
                    self.step()
                    self.ops += 1
            except Exception as exc:  # noqa: BLE001 - a worker must survive any fault
                self.errors += 1
                self.last_error = _err(exc)
                log.info("%s: %s", self.wid, self.last_error)
                try:
                    self.on_error(exc)
                except Exception:  # noqa: BLE001
                    pass
                self.ctx.stop.wait(0.5)
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def rebuild(self) -> None: ...
    def step(self) -> None: ...
    def on_error(self, exc: BaseException) -> None: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------ queue
class QueueProducer(Worker):
    """Idempotent producer: a few single-record sends to random partitions, then wait for them."""

    def __init__(self, ctx, name, seed, tps):
        super().__init__(ctx, name, seed)
        self.tps = tps
        self.n = 0
        self.producer = None

    def rebuild(self):
        self.producer = self.ctx.cluster.producer(acks="all", enable_idempotence=True, client_id=self.wid,
                                                  **PRODUCER_TIMEOUTS)

    def step(self):
        sent = []
        for _ in range(self.rng.randint(1, 8)):
            topic, partition = self.rng.choice(self.tps)
            value = f"{self.wid}-{self.n}"
            self.n += 1
            try:
                fut = self.producer.send(topic, value=value.encode(), partition=partition)
            except Exception as exc:  # noqa: BLE001 - raised by send(): nothing was queued
                self.ctx.record(SendFail(self.wid, topic, partition, value, _err(exc)))
                raise
            sent.append((topic, partition, value, fut))
        for topic, partition, value, fut in sent:
            try:
                md = fut.result(timeout=60)
                self.ctx.record(SendOk(self.wid, topic, partition, value, int(md.offset)))
            except Exception as exc:  # noqa: BLE001
                cls = SendFail if _definite_failure(exc) else SendUnknown
                self.ctx.record(cls(self.wid, topic, partition, value, _err(exc)))

    def close(self):
        if self.producer is not None:
            self.producer.close(timeout=10)


# ------------------------------------------------------------------------------------------------ txn
class TxnProducer(Worker):
    """Transactional producer: begin, 2-10 sends, commit (70 %) or abort; replaced on unknown outcomes."""

    COMMIT_P = 0.7

    def __init__(self, ctx, name, seed, tps):
        super().__init__(ctx, name, seed)
        self.tps = tps
        self.n = 0
        self.t = 0
        self.producer = None
        self.transactional_id = f"verify-{ctx.run_id}-{name}"
        self.kill_requested = threading.Event()   # nemesis kill_client: abandon mid-transaction
        self.killed = threading.Event()            # set once the replacement instance is ready
        self.instances = 0

    def rebuild(self):
        self._new_instance()

    def _new_instance(self, abandon_old: bool = True):
        old = self.producer
        self.producer = None
        if old is not None and abandon_old:
            # the old instance is a zombie: let its sender finish in the background, never wait on it
            threading.Thread(target=_quiet_close, args=(old,), daemon=True).start()
        p = self.ctx.cluster.producer(transactional_id=self.transactional_id, client_id=f"{self.wid}.{self.instances}",
                                      transaction_timeout_ms=20_000, **PRODUCER_TIMEOUTS)
        self.instances += 1
        p.init_transactions(timeout=60)
        self.producer = p

    def step(self):
        if self.producer is None:
            self._new_instance()
        p = self.producer
        self.t += 1
        txn_id = f"{self.wid}-t{self.t}"
        p.begin_transaction()
        self.ctx.record(TxnBegin(self.wid, txn_id))
        sent = []
        k = self.rng.randint(2, 10)
        half = self.rng.randint(1, k - 1)
        try:
            for i in range(k):
                if i == half and self.kill_requested.is_set():
                    self._abandon(sent, txn_id)
                    return
                topic, partition = self.rng.choice(self.tps)
                value = f"{self.wid}-{self.n}"
                self.n += 1
                try:
                    fut = p.send(topic, value=value.encode(), partition=partition)
                except Exception as exc:  # noqa: BLE001 - nothing queued
                    self.ctx.record(SendFail(self.wid, topic, partition, value, _err(exc), txn_id=txn_id))
                    raise
                sent.append((topic, partition, value, fut))
            try:
                p.flush(timeout=45)
            except Exception:  # noqa: BLE001 - futures tell what happened
                pass
        except Exception:
            self._record_sends(sent, txn_id)
            self._finish_abort(txn_id)
            raise
        self._record_sends(sent, txn_id)
        if self.rng.random() < self.COMMIT_P:
            self.ctx.record(TxnCommitStart(self.wid, txn_id))
            try:
                p.commit_transaction(timeout=60)
            except Exception as exc:  # noqa: BLE001
                from ..errors import TransactionAbortableError

                if isinstance(exc, TransactionAbortableError):
                    # a record failed: nothing was committed; abort (its records must stay invisible)
                    self.ctx.record(TxnCommit(self.wid, txn_id, False))
                    self._finish_abort(txn_id)
                else:
                    self.ctx.record(TxnCommit(self.wid, txn_id, None))
                    self.last_error = _err(exc)
                    self._new_instance()
                return
            self.ctx.record(TxnCommit(self.wid, txn_id, True))
        else:
            self._finish_abort(txn_id)

    def _finish_abort(self, txn_id: str) -> None:
        try:
            self.producer.abort_transaction(timeout=60)
            self.ctx.record(TxnAbort(self.wid, txn_id, True))
        except Exception as exc:  # noqa: BLE001
            self.ctx.record(TxnAbort(self.wid, txn_id, None))
            self.last_error = _err(exc)
            self._new_instance()

    def _record_sends(self, sent, txn_id: str) -> None:
        _record_sends(self.ctx, self.wid, sent, txn_id)

    def _abandon(self, sent, txn_id: str) -> None:
        """kill_client: the instance "crashes" mid-transaction (no commit, no abort); a new instance
        with the same transactional.id takes over and must fence it and abort its transaction."""
        self._record_sends(sent, txn_id)
        self._new_instance()
        self.kill_requested.clear()
        self.killed.set()

    def on_error(self, exc):
        # the instance may be in any state (fatal, abortable, mid-commit ...): replace it; the new
        # instance's init_transactions() fences it and resolves its open transaction
        old, self.producer = self.producer, None
        if old is not None:
            threading.Thread(target=_quiet_close, args=(old,), daemon=True).start()

    def close(self):
        if self.producer is not None:
            _quiet_close(self.producer)


def _record_sends(ctx: RunContext, wid: str, sent, txn_id: str) -> None:
    """What each (topic, partition, value, future) of a transaction is known to have become."""
    for topic, partition, value, fut in sent:
        if not fut.done():
            ctx.record(SendUnknown(wid, topic, partition, value, "not completed", txn_id=txn_id))
            continue
        try:
            md = fut.result(timeout=0)
            ctx.record(SendOk(wid, topic, partition, value, int(md.offset), txn_id=txn_id))
        except Exception as exc:  # noqa: BLE001
            cls = SendFail if _definite_failure(exc) else SendUnknown
            ctx.record(cls(wid, topic, partition, value, _err(exc), txn_id=txn_id))


def _quiet_close(p, **kw) -> None:
    try:
        p.close(timeout=10, **kw)
    except Exception:  # noqa: BLE001
        pass


# ------------------------------------------------------------------------------------------------ copier
class Copier(Worker):
    """Read-process-write: poll (read_committed, group member), send one output per input record,
    send the input offsets to the transaction, commit. Output values are "<copier>-<n>|<input>": one
    per copy attempt, so a re-copied input shows up as two distinct outputs (duplicate_offset_commit)
    and an input below a committed offset without a visible output as lost_offset_commit."""

    def __init__(self, ctx, name, seed, input_tps, output_topic: str):
        super().__init__(ctx, name, seed)
        self.input_topics = sorted({t for t, _ in input_tps})
        self.output_topic = output_topic
        self.group = f"verify-{ctx.run_id}-copier"
        self.transactional_id = f"verify-{ctx.run_id}-{name}"
        self.kill_requested = threading.Event()
        self.killed = threading.Event()
        self.producer = None
        self.consumer = None
        self.n = 0
        self.t = 0
        self.instances = 0

    def rebuild(self):
        self._new_instance()

    def _new_instance(self, crash: bool = False):
        """A fresh consumer (resumes from the committed offsets) and producer (fences the old one).
        `crash`: the old consumer stops heartbeating without leaving (its session expires), as a
        killed process's would; otherwise it leaves the group."""
        old_p, old_c = self.producer, self.consumer
        self.producer = self.consumer = None
        if old_p is not None:
            threading.Thread(target=_quiet_close, args=(old_p,), daemon=True).start()
        if old_c is not None:
            threading.Thread(target=_quiet_close, args=(old_c,), kwargs={"leave_group": not crash},
                             daemon=True).start()
        p = self.ctx.cluster.producer(transactional_id=self.transactional_id,
                                      client_id=f"{self.wid}.{self.instances}", transaction_timeout_ms=20_000,
                                      **PRODUCER_TIMEOUTS)
        self.instances += 1
        p.init_transactions(timeout=60)
        c = self.ctx.cluster.consumer(group_id=self.group, isolation_level=READ_COMMITTED,
                                      auto_offset_reset="earliest", enable_auto_commit=False,
                                      session_timeout_ms=10_000, client_id=self.wid, **CONSUMER_TIMEOUTS)
        c.subscribe(self.input_topics)
        self.producer, self.consumer = p, c

    def step(self):
        from ..records import TopicPartition

        if self.producer is None:
            self._new_instance()
        polled = self.consumer.poll(timeout=0.5)
        inputs = []
        offsets: dict = {}
        for tp, batch in polled.items():
            offs = batch.column("offset").to_pylist()
            vals = batch.column("value").to_pylist()
            inputs.extend((tp.partition, _decode(v)) for v in vals)
            if offs:
                offsets[TopicPartition(tp.topic, tp.partition)] = int(offs[-1]) + 1
        if not offsets:
            return
        p = self.producer
        self.t += 1
        txn_id = f"{self.wid}-t{self.t}"
        p.begin_transaction()
        self.ctx.record(TxnBegin(self.wid, txn_id))
        sent = []
        try:
            for i, (partition, value) in enumerate(inputs):
                if i == len(inputs) // 2 and self.kill_requested.is_set():
                    self._abandon(sent, txn_id)
                    return
                out = f"{self.wid}-{self.n}|{value}"
                self.n += 1
                self.ctx.record(CopyOutput(value, out, txn_id))
                fut = p.send(self.output_topic, value=out.encode(), partition=partition)
                sent.append((self.output_topic, partition, out, fut))
            p.send_offsets_to_transaction(offsets, self.consumer.group_metadata(), timeout=60)
            self.ctx.record(OffsetCommit(self.group, self.wid, {(tp.topic, tp.partition): o
                                                                for tp, o in offsets.items()}, txn_id=txn_id))
            try:
                p.flush(timeout=45)
            except Exception:  # noqa: BLE001 - futures tell what happened
                pass
        except Exception:
            _record_sends(self.ctx, self.wid, sent, txn_id)
            self.ctx.record(TxnAbort(self.wid, txn_id, None))
            raise                           # on_error: new instance, rewound to the committed offsets
        _record_sends(self.ctx, self.wid, sent, txn_id)
        self.ctx.record(TxnCommitStart(self.wid, txn_id))
        try:
            p.commit_transaction(timeout=60)
        except Exception:
            self.ctx.record(TxnCommit(self.wid, txn_id, None))
            raise
        self.ctx.record(TxnCommit(self.wid, txn_id, True))

    def _abandon(self, sent, txn_id: str) -> None:
        """kill_client: stop mid-transaction; the new instance fences this one and aborts its work."""
        _record_sends(self.ctx, self.wid, sent, txn_id)
        self._new_instance(crash=True)
        self.kill_requested.clear()
        self.killed.set()

    def on_error(self, exc):
        old_p, old_c = self.producer, self.consumer
        self.producer = self.consumer = None
        for old in (old_p, old_c):
            if old is not None:
                threading.Thread(target=_quiet_close, args=(old,), daemon=True).start()

    def close(self):
        for c in (self.producer, self.consumer):
            if c is not None:
                _quiet_close(c)


# ------------------------------------------------------------------------------------------------ readers
class Reader(Worker):
    """An assigned consumer polling every partition of its topics; now and then seeks backwards."""

    SEEK_P = 0.02

    def __init__(self, ctx, name, seed, tps, isolation: str):
        super().__init__(ctx, name, seed)
        self.tps = tps
        self.isolation = isolation
        self.consumer = None
        self.next: dict[tuple, int] = {tp: 0 for tp in tps}

    def rebuild(self):
        from ..records import TopicPartition

        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception:  # noqa: BLE001
                pass
            self.consumer = None
        c = self.ctx.cluster.consumer(isolation_level=self.isolation, auto_offset_reset="earliest",
                                      client_id=self.wid, **CONSUMER_TIMEOUTS)
        c.assign([TopicPartition(t, p) for t, p in self.tps])
        self.ctx.record(Assign(self.wid, list(self.tps)))
        for (t, p), off in self.next.items():
            c.seek(TopicPartition(t, p), off)
            self.ctx.record(Seek(self.wid, t, p, off))
        self.consumer = c

    def step(self):
        from ..records import TopicPartition

        if self.consumer is None:
            self.rebuild()
        if self.rng.random() < self.SEEK_P:
            t, p = self.rng.choice(self.tps)
            off = self.rng.randint(0, max(0, self.next[(t, p)]))
            self.consumer.seek(TopicPartition(t, p), off)
            self.ctx.record(Seek(self.wid, t, p, off))
            self.next[(t, p)] = off
        out = self.consumer.poll(timeout=0.5)
        records = []
        for tp, batch in out.items():
            offs = batch.column("offset").to_pylist()
            vals = batch.column("value").to_pylist()
            for o, v in zip(offs, vals):
                records.append((tp.topic, tp.partition, int(o), _decode(v)))
            if offs:
                self.next[(tp.topic, tp.partition)] = int(offs[-1]) + 1
        if records:
            self.ctx.record(Poll(self.wid, self.isolation, records))

    def on_error(self, exc):
        # start a fresh consumer at the positions reached (recorded as Assign + Seek)
        self.consumer = None
        self.ctx.record(Rebalance(self.wid))

    def close(self):
        if self.consumer is not None:
            self.consumer.close()


def _decode(v) -> str | None:
    if v is None:
        return None
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def make_workers(ctx: RunContext, workloads: list[str], producers: int = 3) -> list[Worker]:
    """Producers of each workload, plus one read_committed and one read_uncommitted reader of
    every partition."""
    rng = random.Random(ctx.seed)
    workers: list[Worker] = []
    tps = ctx.all_tps("shared")
    for w in workloads:
        if w == "queue":
            for i in range(producers):
                workers.append(QueueProducer(ctx, f"q{i}", rng.randrange(2 ** 32), tps))
        elif w == "txn":
            for i in range(producers):
                workers.append(TxnProducer(ctx, f"t{i}", rng.randrange(2 ** 32), tps))
        elif w == "copier":
            if workloads == ["copier"]:   # something to copy
                workers.append(QueueProducer(ctx, "cin", rng.randrange(2 ** 32), tps))
            output = ctx.topics[COPIER_OUTPUT][0]
            for i in range(2):
                workers.append(Copier(ctx, f"c{i}", rng.randrange(2 ** 32), tps, output))
        else:
            raise ValueError(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    every = ctx.all_tps()   # the copier's output is read back too
    workers.append(Reader(ctx, "r-rc", rng.randrange(2 ** 32), every, READ_COMMITTED))
    workers.append(Reader(ctx, "r-ru", rng.randrange(2 ** 32), every, READ_UNCOMMITTED))
    ctx.workers = workers
    return workers


# ------------------------------------------------------------------------------------------------ final read
def wait_stable(ctx: RunContext, timeout: float = 120.0) -> bool:
    """Wait until every partition has a leader and LSO == HW (no transaction left open)."""
    admin = ctx.cluster.admin()
    deadline = time.monotonic() + timeout
    topics = [t for ts in ctx.topics.values() for t in ts]
    while time.monotonic() < deadline:
        try:
            ok = True
            for t in topics:
                for p in admin.describe_topic(t).partitions:
                    if p.leader is None or p.last_stable_offset != p.high_watermark:
                        ok = False
            if ok:
                return True
        except Exception as exc:  # noqa: BLE001
            log.info("wait_stable: %s", _err(exc))
        time.sleep(0.5)
    return False


def read_partition(cluster, topic: str, partition: int, isolation: str, timeout: float = 120.0):
    """Every record of one partition: ([(offset, value)], end offset)."""
    from ..records import TopicPartition

    tp = TopicPartition(topic, partition)
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        c = cluster.consumer(isolation_level=isolation, auto_offset_reset="earliest", **CONSUMER_TIMEOUTS)
        try:
            c.assign([tp])
            end = c.end_offsets([tp])[tp]
            c.seek(tp, 0)
            rows = []
            while c.position(tp) < end:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"final read of {topic}-{partition} stuck at {c.position(tp)} < {end}")
                for batch in c.poll(timeout=1.0).values():
                    rows.extend(zip((int(o) for o in batch.column("offset").to_pylist()),
                                    (_decode(v) for v in batch.column("value").to_pylist())))
            return [r for r in rows if r[0] < end], end
        except Exception as exc:  # noqa: BLE001 - retry with a fresh consumer
            last_exc = exc
            time.sleep(1.0)
        finally:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
    raise TimeoutError(f"final read of {topic}-{partition} ({isolation}) failed: {last_exc!r}")


def final_read(ctx: RunContext, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout + 120.0
    stable = wait_stable(ctx, timeout=120.0)
    info = {"stable": stable, "partitions": 0, "failed": []}
    for t, p in ctx.all_tps():
        for iso in (READ_COMMITTED, READ_UNCOMMITTED):
            remaining = deadline - time.monotonic()
            if remaining < 5:
                info["failed"].append(f"{t}-{p}/{iso}: no time left")
                continue
            try:
                rows, end = read_partition(ctx.cluster, t, p, iso, timeout=min(60.0, remaining))
            except Exception as exc:  # noqa: BLE001 - leave it out: its values stay unjudged
                info["failed"].append(f"{t}-{p}/{iso}: {_err(exc)}")
                continue
            ctx.record(FinalRead(t, p, iso, rows, end))
            info["partitions"] += 1
    return info

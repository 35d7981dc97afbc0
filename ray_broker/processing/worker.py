"""One exactly-once read-process-write worker: a consumer-group member + a transactional producer.

`WorkerLoop` is the loop (plain Python, runs wherever Ray is initialised); `PipelineWorker` is the
Ray actor that runs it. One iteration::

    records = consumer.poll(...)                 # read_committed; rebalance callbacks run in here
    begin_transaction() if none is open
    out = fn(batch[, ctx])  per input partition  # vectorised: one Arrow batch in, Arrow data out
    producer.send_batch(out ...)                 # into the open transaction
    every commit_interval_ms:
        state changes -> state topic             # same transaction
        send_offsets_to_transaction(next offsets, consumer.group_metadata())
        commit_transaction()

Errors: the transaction is aborted, the state changes rolled back, the consumer rewound to the
first offset the transaction read (= the committed offset), and the loop carries on; after
`max_failures` consecutive failures the worker ends "failed". A fenced producer (another instance
with this transactional.id, or the coordinator aborted a transaction past transaction.timeout.ms)
makes the worker recreate its producer and consumer: everything is re-derived from what the broker
committed. Rebalances: revoked partitions first commit the open transaction (``on_revoke``); lost
partitions (session expired) abort it; newly assigned partitions restore their state from the
state topic once no transaction is open on it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..errors import (BrokerError, BrokerTimeoutError, InvalidProducerEpochError, InvalidRequestError,
                      ProducerFencedError)
from ..records import TopicPartition
from ..testing import failpoints
from .core import (CommitPolicy, ErrorAction, KeyValueState, ProcessContext, TxnTracker, classify_error,
                   normalize_outputs, transactional_id_for, wants_context)

log = logging.getLogger(__name__)

__all__ = ["WorkerSpec", "WorkerLoop", "PipelineWorkerActor", "PipelineWorker"]

OPEN_TXN_STATES = ("IN_TRANSACTION", "ABORTABLE_ERROR", "ABORTING")
QUIET_RESET_S = 5.0   # consecutive-failure count resets after this long without an error


@dataclass
class WorkerSpec:
    """Everything a worker needs; picklable (the function travels as cloudpickle bytes)."""
    namespace: str
    group_id: str
    input_topics: tuple[str, ...]
    output_topic: str | None
    fn_bytes: bytes
    state_topic: str | None = None
    state_serde: Any = None
    commit_policy: CommitPolicy = field(default_factory=CommitPolicy)
    consumer_config: dict = field(default_factory=dict)
    producer_config: dict = field(default_factory=dict)
    transactional_id_prefix: str | None = None
    assignor: str = "range"
    max_failures: int = 5
    restore_timeout_s: float = 60.0


class WorkerLoop:
    """The read-process-write loop of worker `index` (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, index: int, incarnation: int = 0):
        self.spec = spec
        self.index = index
        self.incarnation = incarnation
        self.transactional_id = transactional_id_for(spec.group_id, index, spec.transactional_id_prefix)
        self.fn = None            # unpickled in run(): a function that cannot be loaded fails the worker
        self._with_ctx = False
        self.policy = spec.commit_policy
        self.tracker = TxnTracker()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._contexts: dict[TopicPartition, ProcessContext] = {}
        self._callback_error: BaseException | None = None
        self._closing = False
        self._last_idle_check = 0.0
        self._txn_records_out = 0
        self.cluster = self.producer = self.consumer = None
        self._restore_rc = self._restore_ru = None
        self.status = "starting"
        self.counters = {"records_in": 0, "records_out": 0, "state_records": 0, "commits": 0, "aborts": 0,
                         "idle_commits": 0, "recreations": 0, "restores": 0, "rebalances": 0, "fenced": 0,
                         "evicted_predecessors": 0}
        self.last_error: str | None = None

    # ================================================================================ lifecycle
    def request_stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        c = self.consumer
        member = None
        assignment: list = []
        if c is not None:
            try:
                meta = c.group_metadata()
                member = meta.member_id
                assignment = sorted(c.assignment())
            except Exception:  # noqa: BLE001 - closed meanwhile
                pass
        with self._lock:
            return {"index": self.index, "incarnation": self.incarnation, "status": self.status,
                    "transactional_id": self.transactional_id, "member_id": member,
                    "assignment": [tuple(tp) for tp in assignment], "last_error": self.last_error,
                    **self.counters}

    def run(self) -> dict:
        """Run until `request_stop()` (graceful: commits the open transaction) or until it gives
        up; returns `stats()` with status "stopped" or "failed"."""
        failures = 0
        last_failure = 0.0
        try:
            import cloudpickle

            self.fn = cloudpickle.loads(self.spec.fn_bytes)
            self._with_ctx = wants_context(self.fn)
        except BaseException as exc:  # noqa: BLE001 - e.g. its module cannot be imported here
            self.last_error = f"cannot load the processing function: {exc!r}"
            self.status = "failed"
            return self.stats()
        while True:
            try:
                self._setup()
                break
            except BaseException as exc:  # noqa: BLE001 - the broker may still be starting
                failures += 1
                self.last_error = repr(exc)
                log.warning("worker %s: setup failed (%d): %r", self.transactional_id, failures, exc)
                self._close_clients(graceful=False)
                if failures > self.spec.max_failures or self._stop.is_set():
                    self._teardown(graceful=False)
                    self.status = "failed"
                    return self.stats()
                time.sleep(min(0.1 * 2 ** (failures - 1), 2.0))
        failures = 0
        self.status = "running"
        while True:
            if self._stop.is_set():
                self._teardown(graceful=True)
                self.status = "stopped"
                return self.stats()
            try:
                committed = self._step()
                # a commit proves progress; so does a quiet while without errors (an idle worker)
                if committed or (failures and time.monotonic() - last_failure > QUIET_RESET_S):
                    failures = 0
            except BaseException as exc:  # noqa: BLE001 - sorted by classify_error
                failures += 1
                last_failure = time.monotonic()
                action = classify_error(exc, failures, self.spec.max_failures)
                self.last_error = repr(exc)
                if isinstance(exc, (ProducerFencedError, InvalidProducerEpochError)):
                    self.counters["fenced"] += 1     # a newer instance / the coordinator fenced this one
                log.warning("worker %s: %r -> %s (failure %d)", self.transactional_id, exc, action.value, failures)
                if action is ErrorAction.FAIL:
                    self._teardown(graceful=False)
                    self.status = "failed"
                    return self.stats()
                time.sleep(min(0.05 * 2 ** (failures - 1), 2.0))
                try:
                    if action is ErrorAction.RECREATE:
                        self._recreate()
                    else:
                        self._abort()
                except BaseException as exc2:  # noqa: BLE001 - e.g. fenced while aborting: recreate
                    self.last_error = repr(exc2)
                    log.warning("worker %s: recovery failed (%r); recreating clients", self.transactional_id, exc2)
                    try:
                        self._recreate()
                    except BaseException as exc3:  # noqa: BLE001 - next iteration retries / fails
                        self.last_error = repr(exc3)
                        failures += 1

    # ================================================================================ setup
    def _setup(self) -> None:
        import ray_broker as rb

        s = self.spec
        if self.cluster is None:
            self.cluster = rb.connect(namespace=s.namespace)
        pcfg = {"linger_ms": 2, **s.producer_config, "transactional_id": self.transactional_id,
                "client_id": self.transactional_id}
        self.producer = self.cluster.producer(pcfg)
        self.producer.init_transactions()        # fences the previous instance; aborts its open transaction
        self._evict_predecessors()
        ccfg = {"auto_offset_reset": "earliest", **s.consumer_config, "group_id": s.group_id,
                "isolation_level": "read_committed", "enable_auto_commit": False,
                "client_id": self.transactional_id}
        self.consumer = self.cluster.consumer(ccfg)
        self._closing = False
        self.consumer.subscribe(list(s.input_topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost, assignor=s.assignor)

    def _evict_predecessors(self) -> None:
        """Members of the group with this worker's client id are earlier instances of this worker
        (the actor is named: no two live at once) that died without leaving: remove them now
        instead of waiting for their session to expire (what static membership gives Kafka)."""
        from ..client.membership import CoordinatorClient

        cc = CoordinatorClient(self.spec.group_id, self.spec.namespace, 10_000)
        try:
            desc = cc.call("describe_group", self.spec.group_id, timeout_s=10.0)
        except Exception as exc:  # noqa: BLE001 - an optimisation only
            log.info("describe_group before join failed: %r", exc)
            return
        for m in getattr(desc, "members", ()):
            if m.client_id == self.transactional_id:
                try:
                    cc.call("leave_group", self.spec.group_id, m.member_id, timeout_s=10.0)
                    self.counters["evicted_predecessors"] += 1
                except Exception as exc:  # noqa: BLE001 - it may have expired meanwhile
                    log.info("evicting %s failed: %r", m.member_id, exc)

    def _recreate(self) -> None:
        """New producer (init_transactions fences whatever is left) and consumer (rejoins; positions
        from the committed offsets; state restored again)."""
        self.counters["recreations"] += 1
        self._close_clients(graceful=False)
        self._setup()

    def _close_clients(self, graceful: bool) -> None:
        self._closing = True
        if self.tracker.open:
            if graceful:
                try:
                    self._commit()
                except BaseException as exc:  # noqa: BLE001
                    self.last_error = repr(exc)
                    self._abort_quietly()
            else:
                self._abort_quietly()
        self.tracker.aborted()
        self.tracker.committed.clear()
        for ctx in self._contexts.values():
            if ctx.state is not None:
                ctx.state.rollback()
        self._contexts.clear()
        for client in (self.consumer, self.producer, self._restore_rc, self._restore_ru):
            if client is None:
                continue
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001
                log.info("closing %r failed: %r", client, exc)
        self.consumer = self.producer = self._restore_rc = self._restore_ru = None

    def _teardown(self, graceful: bool) -> None:
        self._close_clients(graceful)
        if self.cluster is not None:
            try:
                self.cluster.shutdown()
            except Exception:  # noqa: BLE001
                pass
            self.cluster = None

    # ================================================================================ the loop
    def _step(self) -> bool:
        """One poll/process/maybe-commit round; True if a transaction committed."""
        if self.consumer is None or self.producer is None:
            self._recreate()                     # an earlier recreation failed half-way
        timeout = self.policy.poll_timeout(self.tracker, time.monotonic())
        records = self.consumer.poll(timeout=timeout)
        if self._callback_error is not None:
            # a rebalance callback failed (its transaction was aborted): read what this poll
            # returned again after the main loop dealt with the error
            for tp, b in records.items():
                if b.num_rows:
                    self.consumer.seek(tp, b.column(b.schema.get_field_index("offset"))[0].as_py())
            self._raise_callback_error()
        if records:
            self._process(records)
        now = time.monotonic()
        if self.policy.commit_due(self.tracker, now):
            self._commit()
            return True
        if not records and not self.tracker.open:
            return self._maybe_idle_commit(now)
        return False

    def _raise_callback_error(self) -> None:
        err, self._callback_error = self._callback_error, None
        if err is not None:
            raise err

    def _begin(self) -> None:
        if not self.tracker.open:
            self.producer.begin_transaction()
            self.tracker.begin()
            self._txn_records_out = 0

    def _process(self, records: dict) -> None:
        items = [(tp, b) for tp, b in sorted(records.items()) if b.num_rows]
        if not items:
            return
        firsts, nexts = {}, {}
        for tp, b in items:
            offsets = b.column(b.schema.get_field_index("offset"))
            firsts[tp] = offsets[0].as_py()
            # where the consumer continues: past these records and anything skipped after them
            nexts[tp] = max(offsets[len(offsets) - 1].as_py() + 1, self.consumer.position(tp))
        try:
            for tp, _ in items:
                self._context(tp)            # restore state before the transaction starts
            self._begin()
            for tp, b in items:
                self.tracker.consumed(tp, firsts[tp], nexts[tp], b.num_rows)
        except BaseException:
            # these records are in no transaction: read them again
            for tp, first in firsts.items():
                if tp not in self.tracker.start:
                    self.consumer.seek(tp, first)
            raise
        fn = self.fn
        for tp, batch in items:
            out = fn(batch, self._contexts[tp]) if self._with_ctx else fn(batch)
            for o in normalize_outputs(out, self.spec.output_topic):
                self.producer.send_batch(o.topic, o.batch, partition=o.partition, key_column=o.key_column)
                self.counters["records_out"] += o.batch.num_rows
                self._txn_records_out += o.batch.num_rows
            self.counters["records_in"] += batch.num_rows

    def _commit(self) -> None:
        """Write the state changes, commit the input offsets and the transaction (atomically)."""
        t = self.tracker
        if not t.open:
            return
        self._write_state_changes()
        offsets = t.offsets()
        if offsets:
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
        # tests freeze or fail a worker here, with output written (or only offsets, when idle); a
        # test stopping it wants the output in the log first, as a worker paused mid-commit has
        point = "worker.before_commit" if self._txn_records_out else "worker.before_offsets_only_commit"
        if failpoints.armed(point):
            self.producer.flush()
        failpoints.hit(point)
        deadline = time.monotonic() + 60.0
        while True:
            try:
                self.producer.commit_transaction()
                break
            except BrokerTimeoutError:
                # the outcome is not known yet: only commit_transaction() may be called again
                if time.monotonic() > deadline:
                    raise
        t.committed_ok()
        for ctx in self._contexts.values():
            if ctx.state is not None:
                ctx.state.commit()
        self.counters["commits"] += 1

    def _write_state_changes(self) -> None:
        if self.spec.state_topic is None:
            return
        dumps = self.spec.state_serde.dumps
        for tp, ctx in sorted(self._contexts.items()):
            st = ctx.state
            if st is None or not st.dirty:
                continue
            items = st.dirty_items()
            if not items:
                continue
            batch = pa.RecordBatch.from_arrays(
                [pa.array([k for k, _ in items], pa.binary()),
                 pa.array([None if v is None else dumps(v) for _, v in items], pa.binary())], ["key", "value"])
            self.producer.send_batch(self.spec.state_topic, batch, partition=tp.partition)
            self.counters["state_records"] += len(items)

    def _abort(self, skip=()) -> None:
        """Abort the open transaction, roll back state, rewind the consumer to the committed offsets
        (not for partitions in `skip`, which are being given up)."""
        points = self.tracker.aborted()
        for ctx in self._contexts.values():
            if ctx.state is not None:
                ctx.state.rollback()
        p = self.producer
        if p is not None and p.transaction_state is not None and p.transaction_state.value in OPEN_TXN_STATES:
            p.abort_transaction()
            self.counters["aborts"] += 1
        if self.consumer is not None:
            owned = self.consumer.assignment()
            for tp, off in points.items():
                if tp in owned and tp not in skip:
                    self.consumer.seek(tp, off)

    def _abort_quietly(self, skip=()) -> None:
        try:
            self._abort(skip)
        except BaseException as exc:  # noqa: BLE001 - the producer is closed / recreated next
            log.info("worker %s: abort failed: %r", self.transactional_id, exc)
            self.tracker.aborted()

    def _maybe_idle_commit(self, now: float) -> bool:
        """Nothing to read: commit positions that moved past records never returned (transaction
        markers, aborted data), so the group's committed offsets reach the log end. At most once
        per commit interval; only when a position differs from what is committed."""
        if (now - self._last_idle_check) * 1000.0 < max(self.policy.commit_interval_ms, 50):
            return False
        self._last_idle_check = now
        c = self.consumer
        awaiting = c.pending_positions()     # positions still coming from the committed offsets
        owned = sorted(tp for tp in c.assignment() if tp not in awaiting)
        unknown = [tp for tp in owned if tp not in self.tracker.committed]
        if unknown:
            try:
                got = c.committed(unknown, timeout=5.0)
            except BrokerError as exc:
                log.debug("committed() for %s: %r", unknown, exc)
                return False
            for tp in unknown:
                self.tracker.committed[tp] = got.get(tp) or 0
        moved = {}
        for tp in owned:
            pos = c.position(tp)
            if pos > self.tracker.committed.get(tp, 0):
                moved[tp] = pos
        if not moved:
            return False
        self._begin()
        for tp, pos in moved.items():
            self.tracker.advance(tp, pos)
        self._commit()
        self.counters["idle_commits"] += 1
        return True

    # ================================================================================ rebalances
    def _on_revoke(self, tps) -> None:
        """Partitions are about to move: finish the open transaction first (it holds their offsets)."""
        self.counters["rebalances"] += 1
        if not self._closing and self.tracker.open:
            try:
                self._commit()
            except BaseException as exc:  # noqa: BLE001 - abort; the main loop decides what else
                log.info("worker %s: commit on revoke failed: %r", self.transactional_id, exc)
                self._abort_quietly(skip=set(tps))
                self._callback_error = self._callback_error or exc
        self._drop(tps)

    def _on_lost(self, tps) -> None:
        """The member was removed (session expired): the transaction cannot commit any more."""
        self.counters["rebalances"] += 1
        if self.tracker.open:
            self._abort_quietly(skip=set(tps))
        self._drop(tps)

    def _on_assign(self, tps) -> None:
        if self._closing:
            return
        for tp in tps:
            try:
                self._context(tp)
            except BaseException as exc:  # noqa: BLE001 - retried before its first batch
                log.info("worker %s: restoring %s failed (retried later): %r", self.transactional_id, tp, exc)

    def _drop(self, tps) -> None:
        for tp in tps:
            ctx = self._contexts.pop(tp, None)
            if ctx is not None and ctx.state is not None:
                ctx.state.rollback()
        self.tracker.forget(tps)

    # ================================================================================ state
    def _context(self, tp: TopicPartition) -> ProcessContext:
        ctx = self._contexts.get(tp)
        if ctx is None:
            state = self._restore(tp) if self.spec.state_topic is not None else None
            ctx = ProcessContext(tp, self.index, self.transactional_id, state)
            self._contexts[tp] = ctx
        return ctx

    def _restore(self, tp: TopicPartition) -> KeyValueState:
        """Rebuild the state of input partition `tp` from state-topic partition `tp.partition`:
        wait until no transaction is open on it (the previous owner's last transaction is
        committed or aborted, its markers written), then read it (read_committed) to the end."""
        s = self.spec
        stp = TopicPartition(s.state_topic, tp.partition)
        if self._restore_rc is None:
            self._restore_rc = self.cluster.consumer(isolation_level="read_committed", auto_offset_reset="earliest")
            self._restore_ru = self.cluster.consumer(isolation_level="read_uncommitted")
        rc, ru = self._restore_rc, self._restore_ru
        deadline = time.monotonic() + s.restore_timeout_s
        while True:
            hw = ru.end_offsets([stp])[stp]
            lso = rc.end_offsets([stp])[stp]
            if lso >= hw:
                break
            if time.monotonic() > deadline:
                raise BrokerTimeoutError(f"state partition {stp} still has an open transaction after "
                                         f"{s.restore_timeout_s} s (LSO {lso} < HW {hw})")
            time.sleep(0.02)
        state = KeyValueState()
        loads = s.state_serde.loads
        rc.assign([stp])
        rc.seek_to_beginning([stp])
        while rc.position(stp) < lso:
            if time.monotonic() > deadline:
                raise BrokerTimeoutError(f"restoring {stp} did not finish in {s.restore_timeout_s} s")
            for batch in rc.poll(timeout=0.5).values():
                keys = batch.column(batch.schema.get_field_index("key")).to_pylist()
                values = batch.column(batch.schema.get_field_index("value")).to_pylist()
                for k, v in zip(keys, values):
                    if k is not None:
                        state.restore(k, None if v is None else loads(v))
        rc.assign([])
        self.counters["restores"] += 1
        return state


class PipelineWorkerActor:
    """Ray actor wrapping `WorkerLoop` (threaded: `stop`/`stats` are served while `run` loops)."""

    def __init__(self, spec: WorkerSpec, index: int, incarnation: int = 0):
        logging.basicConfig(level=logging.WARNING)
        self.loop = WorkerLoop(spec, index, incarnation)

    def run(self) -> dict:
        return self.loop.run()

    def stop(self) -> None:
        self.loop.request_stop()

    def stats(self) -> dict:
        return self.loop.stats()

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        """This worker's process id (operators and fault tests pause or inspect it)."""
        import os

        return os.getpid()

    def arm_failpoint(self, name: str, action: str, arg=None, count: int = 1, skip: int = 0) -> None:
        failpoints.arm(name, action, arg, count, skip)


def _remote_class():
    import ray

    return ray.remote(PipelineWorkerActor)


_PipelineWorker = None


def PipelineWorker():  # noqa: N802 - a lazily built ray.remote class
    global _PipelineWorker
    if _PipelineWorker is None:
        _PipelineWorker = _remote_class()
    return _PipelineWorker


def _check_spec(spec: WorkerSpec) -> None:
    if not spec.input_topics:
        raise InvalidRequestError("a pipeline needs at least one input topic")

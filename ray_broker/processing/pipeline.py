"""`ExactlyOncePipeline`: N worker actors running a function over input topics, exactly once.

The driver-side object is the supervisor: it starts the workers (named Ray actors
``processing/<group_id>/worker-<i>``), watches them, and replaces a worker whose actor died
(``ray.kill``, OOM, node lost) by a new actor with the same index, hence the same
transactional.id: its ``init_transactions()`` fences the dead instance and aborts its open
transaction, and it takes the dead member's place in the group at once.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..errors import BrokerError, BrokerTimeoutError, InvalidRequestError
from ..records import TopicPartition
from .core import (CommitPolicy, IdentitySerde, RestartAction, consumed_up_to, lagging, restart_decision,
                   transactional_id_for, worker_actor_name)
from .worker import PipelineWorker, WorkerSpec

log = logging.getLogger(__name__)

QUICK_DEATH_S = 10.0    # a worker dying this soon after its start counts towards max_restarts

__all__ = ["ExactlyOncePipeline", "PipelineError", "run_pipeline", "copy_records"]


class PipelineError(BrokerError):
    """A worker gave up (its last error is in the message), or the pipeline could not start."""


def copy_records(batch):
    """The identity function: a pipeline with it copies its input (Kafka's transactional copier)."""
    return batch


def _pickle_fn(fn: Callable) -> bytes:
    """cloudpickle `fn`; functions of modules the workers may not import (tests, scripts,
    notebooks: anything outside installed packages and ray_broker) travel by value."""
    import cloudpickle

    mod = sys.modules.get(getattr(fn, "__module__", None) or "")
    by_value = False
    if mod is not None and mod.__name__ not in ("__main__",) and not mod.__name__.startswith("ray_broker"):
        f = getattr(mod, "__file__", None) or ""
        by_value = bool(f) and not any(part in f for part in ("site-packages", "dist-packages")) \
            and not f.startswith(os.path.dirname(os.__file__))
    if by_value:
        cloudpickle.register_pickle_by_value(mod)
        try:
            return cloudpickle.dumps(fn)
        finally:
            cloudpickle.unregister_pickle_by_value(mod)
    return cloudpickle.dumps(fn)


@dataclass
class _Slot:
    index: int
    handle: Any
    ref: Any
    incarnation: int
    restarts: int = 0
    started_at: float = 0.0


class ExactlyOncePipeline:
    """Run ``fn`` over `input_topics` as read-process-write transactions with `workers` Ray actors.

    ::

        def enrich(batch: pa.RecordBatch) -> pa.RecordBatch: ...        # vectorised: batch in, batch out
        with ExactlyOncePipeline(cluster, ["payments"], "enriched", enrich, group_id="enricher",
                                 workers=2) as p:
            p.wait_until_consumed()                                     # input end offsets as of now
        # or: run_pipeline(cluster, ["payments"], "enriched", enrich, "enricher", workers=2)

    Each worker is a member of consumer group `group_id` (read_committed) with a transactional
    producer (transactional.id ``<group_id>-worker-<i>``, or ``<transactional_id_prefix>-worker-<i>``).
    ``fn(batch)`` or ``fn(batch, ctx)`` gets one `pyarrow.RecordBatch` per input partition per poll
    (columns ``offset, timestamp, key, value, headers``, or the topic's schema) and returns records:
    a RecordBatch / Table / dict of columns / list of row dicts for `output_topic`,
    ``{topic: batch}`` or `Output`s for several topics, or None. ``ctx`` (`ProcessContext`) has the
    input `partition`, the worker index and, with `state_topic`, ``ctx.state``: this input
    partition's key-value state (`KeyValueState`), whose changes are written to `state_topic`
    (partition = input partition; values through `state_serde`) in the same transaction as the
    outputs and the input offsets, and restored from it when the partition moves to another worker.
    The state topic needs at least as many partitions as the input topic, and the input must be
    keyed by the state key (one input topic).

    Every `commit_interval_ms` a worker commits: state changes, ``send_offsets_to_transaction``
    with the consumer's group metadata (KIP-447 fencing), ``commit_transaction``. Read_committed
    consumers of the outputs see every input record's results exactly once.

    A worker actor that dies is replaced (same index); `max_restarts` bounds consecutive
    replacements of workers that die within 10 s of starting (None: no bound), then the pipeline
    fails. A worker that gives up (`max_failures` consecutive errors) fails the pipeline:
    `wait_until_consumed` raises `PipelineError`.

    `consumer_config` / `producer_config`: extra client configs (e.g. ``max_poll_records``,
    ``session_timeout_ms``; ``transaction_timeout_ms``). Defaults here: session 10 s, heartbeat
    1 s, transaction timeout 30 s, ``auto_offset_reset`` earliest.
    """

    def __init__(self, cluster, input_topics: str | Iterable[str], output_topic: str | None, fn: Callable,
                 group_id: str, *, workers: int = 2, commit_interval_ms: int = 100,
                 max_records_per_txn: int | None = None, state_topic: str | None = None, state_serde=None,
                 consumer_config: Mapping[str, Any] | None = None,
                 producer_config: Mapping[str, Any] | None = None, assignor: str = "range",
                 transactional_id_prefix: str | None = None, max_failures: int = 5,
                 max_restarts: int | None = 10, restore_timeout_s: float = 60.0,
                 actor_options: Mapping[str, Any] | None = None):
        import ray_broker as rb

        if isinstance(cluster, str):
            cluster = rb.connect(namespace=cluster)
        self.cluster = cluster
        self.namespace = cluster.namespace
        topics = (input_topics,) if isinstance(input_topics, str) else tuple(input_topics)
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise InvalidRequestError(f"input_topics must name at least one topic, got {input_topics!r}")
        if not isinstance(group_id, str) or not group_id:
            raise InvalidRequestError("group_id must be a non-empty string")
        if not callable(fn):
            raise InvalidRequestError(f"fn must be callable, got {fn!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InvalidRequestError(f"workers must be an int >= 1, got {workers!r}")
        if state_topic is not None and len(topics) != 1:
            raise InvalidRequestError("a state_topic needs exactly one input topic (state partition = input partition)")
        if output_topic is not None and output_topic in topics:
            raise InvalidRequestError(f"output topic {output_topic!r} is also an input topic")
        self.input_topics = topics
        self.output_topic = output_topic
        self.group_id = group_id
        self.state_topic = state_topic
        self.initial_workers = workers
        self.max_restarts = max_restarts
        consumer_defaults = {"session_timeout_ms": 10_000, "heartbeat_interval_ms": 1_000,
                             "max_poll_interval_ms": 60_000}
        producer_defaults = {"transaction_timeout_ms": 30_000}
        self.spec = WorkerSpec(
            namespace=self.namespace, group_id=group_id, input_topics=topics, output_topic=output_topic,
            fn_bytes=_pickle_fn(fn), state_topic=state_topic,
            state_serde=state_serde if state_serde is not None else IdentitySerde,
            commit_policy=CommitPolicy(commit_interval_ms, max_records_per_txn),
            consumer_config={**consumer_defaults, **dict(consumer_config or {})},
            producer_config={**producer_defaults, **dict(producer_config or {})},
            transactional_id_prefix=transactional_id_prefix, assignor=assignor, max_failures=max_failures,
            restore_timeout_s=restore_timeout_s)
        self.actor_options = {"num_cpus": 0, "max_concurrency": 4, "max_restarts": 0, **dict(actor_options or {})}
        self._slots: dict[int, _Slot] = {}
        self._finished: dict[int, dict] = {}      # index -> last stats of a worker that ended
        self._lock = threading.RLock()
        self._stopping = False
        self._started = False
        self._error: PipelineError | None = None
        self._thread: threading.Thread | None = None
        self._incarnations = 0
        self.restarts = 0

    # ================================================================================ lifecycle
    def start(self) -> "ExactlyOncePipeline":
        with self._lock:
            if self._started:
                raise InvalidRequestError("pipeline already started")
            self._validate_topics()
            self._started = True
            try:
                for i in range(self.initial_workers):
                    self._spawn(i, restarts=0)
            except BaseException:
                for slot in self._slots.values():
                    try:
                        ray.kill(slot.handle, no_restart=True)
                    except Exception:  # noqa: BLE001
                        pass
                self._slots.clear()
                self._stopping = True
                raise
        self._thread = threading.Thread(target=self._supervise, name=f"pipeline-{self.group_id}", daemon=True)
        self._thread.start()
        return self

    def _validate_topics(self) -> None:
        admin = self.cluster.admin()
        counts = {t: len(admin.describe_topic(t).partitions) for t in self.input_topics}
        if self.output_topic is not None:
            admin.describe_topic(self.output_topic)
        if self.state_topic is not None:
            n_state = len(admin.describe_topic(self.state_topic).partitions)
            n_in = counts[self.input_topics[0]]
            if n_state < n_in:
                raise InvalidRequestError(f"state topic {self.state_topic!r} has {n_state} partitions; it needs at "
                                          f"least as many as input topic {self.input_topics[0]!r} ({n_in})")
        self.input_partitions = [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]

    def add_worker(self) -> int:
        """Start one more worker (a new group member: the partitions are rebalanced); its index."""
        with self._lock:
            self._check_running()
            index = next(i for i in range(len(self._slots) + 1) if i not in self._slots)   # lowest free
            self._finished.pop(index, None)
            self._spawn(index, restarts=0)
            return index

    def scale(self, workers: int, timeout: float = 60.0) -> None:
        """Run `workers` workers: add new ones, or stop (gracefully) the highest indexes."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InvalidRequestError(f"workers must be an int >= 1, got {workers!r}")
        while len(self._slots) < workers:
            self.add_worker()
        with self._lock:
            extra = sorted(self._slots)[workers:]
            slots = [self._slots.pop(i) for i in extra]
        for s in slots:
            self._stop_slot(s, timeout)

    def stop(self, timeout: float = 60.0) -> list[dict]:
        """Stop every worker gracefully (each commits its open transaction and leaves the group);
        returns their final stats. Workers that do not stop within `timeout` are killed."""
        with self._lock:
            if not self._started:
                return []
            self._stopping = True
            slots = list(self._slots.values())
            self._slots.clear()
        for s in slots:
            try:
                s.handle.stop.remote()
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + timeout
        for s in slots:
            self._stop_slot(s, max(0.1, deadline - time.monotonic()), already_asked=True)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._wait_outputs_stable(min(10.0, max(1.0, deadline - time.monotonic())))
        return [self._finished[i] for i in sorted(self._finished)]

    def _wait_outputs_stable(self, timeout: float) -> None:
        """After the last commits: until their markers landed on the output and state topics (no
        open transaction: LSO = HW), so read_committed readers see everything once stop() returns.
        Best effort: other transactional writers to these topics may keep one open."""
        admin = self.cluster.admin()
        deadline = time.monotonic() + timeout
        for topic in [t for t in (self.output_topic, self.state_topic) if t is not None]:
            while True:
                try:
                    if all(p.last_stable_offset == p.high_watermark >= 0
                           for p in admin.describe_topic(topic).partitions):
                        break
                except BrokerError as exc:
                    log.info("describe %s: %r", topic, exc)
                    break
                if time.monotonic() > deadline:
                    log.info("pipeline %s: %s still has an open transaction", self.group_id, topic)
                    return
                time.sleep(0.05)

    def _stop_slot(self, s: _Slot, timeout: float, already_asked: bool = False) -> None:
        if not already_asked:
            try:
                s.handle.stop.remote()
            except Exception:  # noqa: BLE001
                pass
        try:
            self._finished[s.index] = ray.get(s.ref, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - dead or stuck: kill it
            self._finished[s.index] = {"index": s.index, "status": "killed", "last_error": repr(exc)}
        finally:
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> "ExactlyOncePipeline":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ================================================================================ workers
    def _spawn(self, index: int, restarts: int, replace_live: bool = False) -> None:
        """(lock held) A worker actor for `index`. The name of a dead predecessor may take a moment
        to be freed; a live actor with the name is killed only when replacing (`replace_live`):
        otherwise another pipeline with this group id is running."""
        self._incarnations += 1
        incarnation = self._incarnations
        name = worker_actor_name(self.group_id, index)
        deadline = time.monotonic() + 30.0
        while True:
            try:
                handle = PipelineWorker().options(name=name, namespace=self.namespace, **self.actor_options).remote(
                    self.spec, index, incarnation)
                break
            except ValueError as exc:   # name still taken
                if time.monotonic() > deadline:
                    raise PipelineError(f"cannot start worker {index}: {exc}") from None
                try:
                    old = ray.get_actor(name, namespace=self.namespace)
                except ValueError:
                    continue            # freed meanwhile
                if not replace_live:
                    try:
                        ray.get(old.ping.remote(), timeout=2.0)
                        raise PipelineError(f"worker actor {name!r} is alive: a pipeline with group id "
                                            f"{self.group_id!r} is already running in namespace {self.namespace!r}")
                    except (RayActorError, ray.exceptions.GetTimeoutError):
                        pass            # dead (or hung): replace it
                try:
                    ray.kill(old, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(0.1)
        self._slots[index] = _Slot(index, handle, handle.run.remote(), incarnation, restarts, time.monotonic())

    def _supervise(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                by_ref = {s.ref: s for s in self._slots.values()}
            if not by_ref:
                time.sleep(0.1)
                continue
            ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=0.1)
            for ref in ready:
                self._on_worker_end(by_ref[ref])

    def _on_worker_end(self, slot: _Slot) -> None:
        stats, err = None, None
        try:
            stats = ray.get(slot.ref, timeout=10)
            outcome = stats.get("status", "failed")
        except RayActorError as exc:
            outcome, err = "died", exc
        except RayTaskError as exc:
            outcome, err = "crashed", exc
        except Exception as exc:  # noqa: BLE001
            outcome, err = "crashed", exc
        with self._lock:
            current = self._slots.get(slot.index) is slot
            action = restart_decision(stopping=self._stopping, current=current, outcome=outcome,
                                      restarts=slot.restarts, max_restarts=self.max_restarts)
            if action is RestartAction.IGNORE:
                return
            log.info("pipeline %s: worker %d %s -> %s", self.group_id, slot.index, outcome, action.value)
            if action is RestartAction.RESTART:
                try:
                    ray.kill(slot.handle, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
                self.restarts += 1
                # count only deaths soon after a start: a worker that ran a while starts afresh
                quick = time.monotonic() - slot.started_at < QUICK_DEATH_S
                try:
                    self._spawn(slot.index, restarts=slot.restarts + 1 if quick else 0, replace_live=True)
                except Exception as exc:  # noqa: BLE001
                    self._slots.pop(slot.index, None)
                    self._error = PipelineError(f"worker {slot.index} could not be restarted: {exc!r}")
                return
            self._slots.pop(slot.index, None)
            self._finished[slot.index] = stats or {"index": slot.index, "status": outcome}
            if action is RestartAction.FAILED:
                last = stats.get("last_error") if stats else repr(err)
                self._error = PipelineError(
                    f"worker {slot.index} ({transactional_id_for(self.group_id, slot.index, self.spec.transactional_id_prefix)}) "
                    f"failed: {last}")

    def _check_running(self) -> None:
        if not self._started or self._stopping:
            raise InvalidRequestError("pipeline is not running")

    # ================================================================================ observing
    def worker_handle(self, index: int):
        """The actor handle of worker `index` (changes when the worker is restarted)."""
        with self._lock:
            return self._slots[index].handle

    @property
    def worker_indexes(self) -> list[int]:
        with self._lock:
            return sorted(self._slots)

    @property
    def error(self) -> PipelineError | None:
        return self._error

    def stats(self, timeout: float = 10.0) -> list[dict]:
        """Per worker: status, assignment, records in/out, commits, aborts, restores, ..."""
        with self._lock:
            slots = list(self._slots.values())
        out = []
        for s in slots:
            try:
                st = ray.get(s.handle.stats.remote(), timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - dead / restarting
                st = {"index": s.index, "status": "unreachable", "last_error": repr(exc)}
            st["restarts"] = s.restarts
            out.append(st)
        return out

    def committed(self) -> dict[TopicPartition, int | None]:
        """The group's committed offsets of every input partition (None: nothing committed)."""
        from ..client.membership import CoordinatorClient

        desc = CoordinatorClient(self.group_id, self.namespace, 10_000).call("describe_group", self.group_id)
        offs = {tp: om.offset for tp, om in desc.offsets.items()}
        return {tp: offs.get(tp) for tp in self.input_partitions}

    def end_offsets(self) -> dict[TopicPartition, int]:
        """Last stable offset of every input partition now (what a read_committed reader can reach)."""
        c = self.cluster.consumer(isolation_level="read_committed")
        try:
            return c.end_offsets(self.input_partitions)
        finally:
            c.close()

    def wait_until_consumed(self, end_offsets: Mapping[TopicPartition, int] | None = None,
                            timeout: float = 120.0, poll_interval: float = 0.05) -> dict[TopicPartition, int]:
        """Block until the group committed every input partition up to `end_offsets` (default:
        `end_offsets()` as of this call): every input record before them has been processed and
        its outputs committed. Raises `PipelineError` if a worker failed, `BrokerTimeoutError`
        after `timeout` seconds."""
        targets = dict(end_offsets) if end_offsets is not None else self.end_offsets()
        deadline = time.monotonic() + timeout
        committed: dict = {}
        while True:
            if self._error is not None:
                raise self._error
            try:
                committed = self.committed()
            except BrokerError as exc:
                log.info("committed offsets not available: %r", exc)
            if consumed_up_to(committed, targets):
                return {tp: committed[tp] for tp in targets}
            if time.monotonic() > deadline:
                raise BrokerTimeoutError(f"pipeline {self.group_id!r} did not consume its input within {timeout} s; "
                                         f"records left per partition: {lagging(committed, targets)}")
            time.sleep(poll_interval)


def run_pipeline(cluster, input_topics, output_topic, fn, group_id, *, workers: int = 2,
                 end_offsets: Mapping[TopicPartition, int] | None = None, timeout: float = 300.0,
                 **kwargs) -> list[dict]:
    """Process the input up to `end_offsets` (default: its end when called) and stop; returns the
    workers' final stats. Keyword arguments as for `ExactlyOncePipeline`."""
    p = ExactlyOncePipeline(cluster, input_topics, output_topic, fn, group_id, workers=workers, **kwargs)
    p.start()
    try:
        p.wait_until_consumed(end_offsets, timeout=timeout)
    except BaseException:
        p.stop(timeout=30)
        raise
    return p.stop()

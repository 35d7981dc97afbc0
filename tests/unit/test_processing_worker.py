"""`WorkerLoop` against in-memory fakes of the consumer and the transactional producer (no Ray):
commits carry outputs + offsets + state atomically; failures abort, roll state back and rewind;
revocation commits first, loss aborts; fencing recreates the clients; stop commits."""
from __future__ import annotations

import cloudpickle
import pyarrow as pa
import pytest

from ray_broker.client.txn_manager import ClientTxnState
from ray_broker.errors import IllegalGenerationError, ProducerFencedError, TransactionAbortableError
from ray_broker.processing.core import CommitPolicy, IntSerde, KeyValueState, wants_context
from ray_broker.processing.worker import WorkerLoop, WorkerSpec
from ray_broker.records import TopicPartition

IN = "in"
TPS = [TopicPartition(IN, 0), TopicPartition(IN, 1)]


class Broker:
    """Committed outputs, state records and group offsets; what a read_committed reader would see."""

    def __init__(self, records_per_partition=10):
        self.log = {tp: [(o, b"k%d-%d" % (tp.partition, o % 3), b"v%d-%d" % (tp.partition, o))
                         for o in range(records_per_partition)] for tp in TPS}
        self.outputs: list[tuple[str, bytes, bytes]] = []
        self.state: dict[int, list[tuple[bytes, bytes]]] = {}
        self.offsets: dict[TopicPartition, int] = {}
        self.events: list[str] = []


class FakeProducer:
    def __init__(self, broker: Broker):
        self.b = broker
        self.state = ClientTxnState.READY
        self.pending: list = []
        self.pending_offsets: dict = {}
        self.fail_commit: list[BaseException] = []
        self.fenced = False

    @property
    def transaction_state(self):
        return self.state

    def init_transactions(self):
        pass

    def begin_transaction(self):
        assert self.state is ClientTxnState.READY, self.state
        self.state = ClientTxnState.IN_TRANSACTION

    def _check(self):
        if self.fenced:
            self.state = ClientTxnState.FATAL_ERROR
            raise ProducerFencedError("fenced")
        assert self.state is ClientTxnState.IN_TRANSACTION, self.state

    def send_batch(self, topic, batch, partition=None, key_column=None):
        self._check()
        self.pending.append((topic, partition, batch))

    def send_offsets_to_transaction(self, offsets, group_metadata):
        self._check()
        self.pending_offsets.update(offsets)

    def commit_transaction(self):
        self._check()
        if self.fail_commit:
            self.state = ClientTxnState.ABORTABLE_ERROR
            raise self.fail_commit.pop(0)
        for topic, partition, batch in self.pending:
            rows = list(zip(batch.column("key").to_pylist(), batch.column("value").to_pylist()))
            if topic == "state":
                self.b.state.setdefault(partition, []).extend(rows)
            else:
                self.b.outputs.extend((topic, k, v) for k, v in rows)
        self.b.offsets.update(self.pending_offsets)
        self.b.events.append("commit")
        self._reset()

    def abort_transaction(self):
        if self.fenced:
            raise ProducerFencedError("fenced")
        self.b.events.append("abort")
        self._reset()

    def _reset(self):
        self.pending, self.pending_offsets = [], {}
        self.state = ClientTxnState.READY

    def close(self):
        pass


class FakeConsumer:
    """Group member over `Broker.log`; `rebalance(...)` queues callbacks that the next poll runs."""

    def __init__(self, broker: Broker, max_records=4):
        self.b = broker
        self.max_records = max_records
        self.pos: dict[TopicPartition, int] = {}
        self.callbacks = None
        self.queued: list[tuple[str, list]] = [("assign", list(TPS))]
        self.generation = 1
        self.closed = False

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None, assignor=None):
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def poll(self, timeout=None):
        while self.queued:
            kind, tps = self.queued.pop(0)
            if kind == "assign":
                for tp in tps:
                    self.pos[tp] = self.b.offsets.get(tp, 0)
            self.callbacks[kind](tps)
            if kind in ("revoke", "lost"):
                for tp in tps:
                    self.pos.pop(tp, None)
                self.generation += 1
        out = {}
        for tp in sorted(self.pos):
            rows = [r for r in self.b.log[tp] if r[0] >= self.pos[tp]][: self.max_records]
            if rows:
                out[tp] = pa.RecordBatch.from_pydict({"offset": [r[0] for r in rows], "key": [r[1] for r in rows],
                                                      "value": [r[2] for r in rows]})
                self.pos[tp] = rows[-1][0] + 1
        return out

    def pending_positions(self):
        return set()        # every position is known at once here

    def position(self, tp):
        return self.pos[tp]

    def seek(self, tp, offset):
        self.b.events.append(f"seek {tp.partition} {offset}")
        self.pos[tp] = offset

    def assignment(self):
        return set(self.pos)

    def committed(self, tps, timeout=None):
        return {tp: self.b.offsets.get(tp) for tp in tps}

    def group_metadata(self):
        return ("g", self.generation, "member-1")

    def close(self):
        if self.pos and not self.closed:
            self.callbacks["revoke"](sorted(self.pos))
        self.closed = True


class Loop(WorkerLoop):
    """WorkerLoop with fake clients; state restored from the fake broker's state records."""

    def __init__(self, broker, fn, state=False, **kw):
        spec = WorkerSpec(namespace="ns", group_id="g", input_topics=(IN,), output_topic="out",
                          fn_bytes=cloudpickle.dumps(fn), state_topic="state" if state else None,
                          state_serde=IntSerde, commit_policy=CommitPolicy(commit_interval_ms=0), max_failures=3, **kw)
        super().__init__(spec, index=0)
        self.fn, self._with_ctx = fn, wants_context(fn)      # run() loads it from fn_bytes
        self.b = broker
        self.setups = 0

    def _setup(self):
        self.setups += 1
        self.producer = FakeProducer(self.b)
        self.consumer = FakeConsumer(self.b)
        self._closing = False
        self.consumer.subscribe([IN], self._on_assign, self._on_revoke, self._on_lost)

    def _restore(self, tp):
        st = KeyValueState()
        for k, v in self.b.state.get(tp.partition, []):
            st.restore(k, IntSerde.loads(v))
        self.counters["restores"] += 1
        return st

    def _teardown(self, graceful):
        self._close_clients(graceful)

    def steps(self, n):
        for _ in range(n):
            self._step()


def copier(batch):
    return batch


def all_input(b):
    return sorted((k, v) for tp in TPS for _, k, v in b.log[tp])


def test_copies_every_record_once_with_offsets_committed_in_the_same_transaction():
    b = Broker()
    loop = Loop(b, copier)
    loop._setup()
    loop.steps(5)
    assert sorted((k, v) for _, k, v in b.outputs) == all_input(b)
    assert b.offsets == {TPS[0]: 10, TPS[1]: 10}
    assert "abort" not in b.events and loop.counters["commits"] >= 3


def test_function_error_aborts_rolls_state_back_and_rewinds():
    b = Broker()
    calls = {"n": 0}

    def counting(batch, ctx):
        keys = batch.column("key").to_pylist()
        for k in set(keys):
            ctx.state.put(k, ctx.state.get(k, 0) + keys.count(k))
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return batch

    loop = Loop(b, counting, state=True)
    loop._setup()
    with pytest.raises(RuntimeError):
        loop.steps(5)
    loop._abort()                                         # what run() does for ABORT_AND_RETRY
    assert b.events[-1].startswith("seek") and "abort" in b.events
    loop.steps(5)
    assert sorted((k, v) for _, k, v in b.outputs) == all_input(b)
    expected = {}
    for tp in TPS:
        for _, k, _ in b.log[tp]:
            expected[k] = expected.get(k, 0) + 1
    latest = {}
    for p in b.state:
        for k, v in b.state[p]:
            latest[k] = int(v)
    assert latest == expected                             # no double counting from the aborted attempt


def test_abortable_commit_failure_is_retried_without_duplicates():
    b = Broker()
    loop = Loop(b, copier)
    loop._setup()
    loop.steps(1)
    loop.producer.fail_commit.append(TransactionAbortableError("a record failed"))
    with pytest.raises(TransactionAbortableError):
        loop.steps(1)
    loop._abort()
    loop.steps(6)
    assert sorted((k, v) for _, k, v in b.outputs) == all_input(b)


def test_revocation_commits_the_open_transaction_first_and_loss_aborts_it():
    b = Broker()
    loop = Loop(b, copier)
    loop.spec.commit_policy = loop.policy = CommitPolicy(commit_interval_ms=60_000)   # never due by time
    loop._setup()
    loop.steps(1)                                         # a transaction is open with records of both
    assert loop.tracker.open and not b.outputs
    loop.consumer.queued.append(("revoke", [TPS[1]]))
    loop.steps(1)
    assert b.events[0] == "commit" and b.offsets[TPS[1]] == 4 and len(b.outputs) == 8
    assert loop.consumer.assignment() == {TPS[0]}
    n_out = len(b.outputs)
    loop.steps(1)                                         # more of partition 0 in a new open transaction
    assert loop.tracker.open
    loop.consumer.queued.append(("lost", [TPS[0]]))
    loop.steps(1)
    assert b.events[-1] == "abort" and len(b.outputs) == n_out and not loop.tracker.open


def test_fenced_producer_makes_the_worker_recreate_its_clients_and_carry_on():
    b = Broker()
    loop = Loop(b, copier)
    loop._setup()
    loop.steps(1)
    loop.producer.fenced = True
    with pytest.raises(ProducerFencedError):
        loop.steps(1)
    loop._recreate()                                      # what run() does for RECREATE
    assert loop.setups == 2 and loop.counters["recreations"] == 1
    loop.steps(6)
    assert sorted((k, v) for _, k, v in b.outputs) == all_input(b)


def test_generation_fencing_on_commit_aborts_and_rewinds():
    b = Broker()
    loop = Loop(b, copier)
    loop._setup()
    loop.steps(1)
    loop.producer.fail_commit.append(IllegalGenerationError("stale generation"))
    with pytest.raises(IllegalGenerationError):
        loop.steps(1)
    loop._abort()
    loop.steps(6)
    assert sorted((k, v) for _, k, v in b.outputs) == all_input(b)


def test_run_stops_gracefully_committing_the_open_transaction():
    b = Broker()
    loop = Loop(b, copier)
    loop.spec.commit_policy = loop.policy = CommitPolicy(commit_interval_ms=60_000)
    orig_step = loop._step
    n = {"steps": 0}

    def step():
        n["steps"] += 1
        if n["steps"] == 2:
            loop.request_stop()
        return orig_step()
    loop._step = step
    stats = loop.run()
    assert stats["status"] == "stopped" and b.events == ["commit"]
    assert len(b.outputs) == 16 and b.offsets == {TPS[0]: 8, TPS[1]: 8}


def test_run_gives_up_after_max_failures():
    b = Broker()

    def poison(batch):
        raise ValueError("poison record")
    loop = Loop(b, poison)
    stats = loop.run()
    assert stats["status"] == "failed" and "poison record" in stats["last_error"]
    assert b.outputs == [] and b.offsets == {}


def test_failed_commit_on_revocation_aborts_and_rereads_what_that_poll_returned():
    b = Broker()
    loop = Loop(b, copier)
    loop.spec.commit_policy = loop.policy = CommitPolicy(commit_interval_ms=60_000)
    loop._setup()
    loop.steps(1)                                         # open transaction: 0..3 of both partitions
    loop.producer.fail_commit.append(IllegalGenerationError("generation moved on"))
    loop.consumer.queued.append(("revoke", [TPS[1]]))     # the commit on revocation fails
    with pytest.raises(IllegalGenerationError):
        loop.steps(1)                                     # that poll also returned 4..7 of partition 0
    loop._abort()
    assert "abort" in b.events and not b.outputs
    loop.consumer.queued.append(("assign", [TPS[1]]))
    loop.policy = CommitPolicy(commit_interval_ms=0)
    loop.steps(6)
    assert sorted((k, v) for _, k, v in b.outputs) == all_input(b)

"""Client transaction state machine (pure) and the transactional Producer API without a broker."""
from __future__ import annotations

import random
import threading
import time

import pytest

from ray_broker.client.txn_manager import (FINISH, OPERATIONS, TRANSITIONS, ClientTxnState, TransactionManager,
                                           TxnOperation, is_fatal_error)
from ray_broker.errors import (BrokerTimeoutError, ConcurrentTransactionsError, InvalidProducerEpochError,
                               InvalidRequestError, InvalidTransactionTimeoutError, InvalidTxnStateError,
                               OutOfOrderSequenceError, ProducerFencedError, TransactionAbortableError)

S = ClientTxnState
Op = TxnOperation
ALL_STATES = list(S)
ALL_OPS = list(Op)


# ----------------------------------------------------------------------------------------- helpers
def manager_in(state: ClientTxnState) -> TransactionManager:
    """A manager driven (through its public API only) into `state`."""
    m = TransactionManager("tid")
    if state is S.UNINITIALIZED:
        return m
    if state is S.FATAL_ERROR:
        m.fatal(ProducerFencedError("newer instance"))
        return m
    m.start(Op.INIT)
    if state is S.INITIALIZING:
        return m
    m.finish(Op.INIT)
    if state is S.READY:
        return m
    m.start(Op.BEGIN)
    if state is S.IN_TRANSACTION:
        return m
    if state is S.COMMITTING:
        m.start(Op.COMMIT)
    elif state is S.ABORTING:
        m.start(Op.ABORT)
    elif state is S.ABORTABLE_ERROR:
        assert m.abortable(OutOfOrderSequenceError("gap in t-0"))
    assert m.state is state
    return m


# Written out by hand (not derived from OPERATIONS): state -> {op: state while the op runs}.
EXPECTED_START = {
    S.UNINITIALIZED: {Op.INIT: S.INITIALIZING},
    S.INITIALIZING: {Op.INIT: S.INITIALIZING},
    S.READY: {Op.BEGIN: S.IN_TRANSACTION},
    S.IN_TRANSACTION: {Op.SEND: S.IN_TRANSACTION, Op.SEND_OFFSETS: S.IN_TRANSACTION, Op.COMMIT: S.COMMITTING,
                       Op.ABORT: S.ABORTING},
    S.COMMITTING: {Op.COMMIT: S.COMMITTING},
    S.ABORTING: {Op.ABORT: S.ABORTING},
    S.ABORTABLE_ERROR: {Op.ABORT: S.ABORTING},
    S.FATAL_ERROR: {},
}


def expected_error(state: ClientTxnState) -> type:
    if state is S.FATAL_ERROR:
        return ProducerFencedError
    if state is S.ABORTABLE_ERROR:
        return TransactionAbortableError
    return InvalidTxnStateError


# ----------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("state", ALL_STATES, ids=lambda s: s.value)
def test_manager_in_reaches_state(state):
    assert manager_in(state).state is state


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: o.value)
@pytest.mark.parametrize("state", ALL_STATES, ids=lambda s: s.value)
def test_full_operation_grid(state, op):
    m = manager_in(state)
    history = list(m.history)
    fatal, abortable = m.fatal_error, m.abortable_error
    allowed = EXPECTED_START[state]
    if op in allowed:
        assert m.start(op) is allowed[op]
        assert m.state is allowed[op]
    else:
        with pytest.raises(expected_error(state)) as info:
            m.start(op)
        # an illegal call changes nothing
        assert m.state is state
        assert m.history == history
        assert m.fatal_error is fatal and m.abortable_error is abortable
        assert op.value in str(info.value) or state in (S.FATAL_ERROR,)
        # check() agrees with start() and also changes nothing
        with pytest.raises(expected_error(state)):
            m.check(op)
        assert m.state is state


def test_operation_table_matches_hand_written_expectation():
    for state in ALL_STATES:
        got = {op: OPERATIONS[op][state] for op in ALL_OPS if state in OPERATIONS[op]}
        assert got == EXPECTED_START[state], state


def test_every_table_move_is_a_legal_transition():
    for op, by_state in OPERATIONS.items():
        for src, running in by_state.items():
            assert running in TRANSITIONS[src], (op, src, running)
            final = FINISH[op]
            if final is not None:
                assert final in TRANSITIONS[running], (op, running, final)
    for src, targets in TRANSITIONS.items():
        assert S.FATAL_ERROR in targets, src          # fencing can happen at any time
    assert TRANSITIONS[S.FATAL_ERROR] == frozenset({S.FATAL_ERROR})   # terminal


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: o.value)
@pytest.mark.parametrize("state", ALL_STATES, ids=lambda s: s.value)
def test_finish_grid(state, op):
    """finish(op) only moves out of a state `op` runs in; elsewhere it is a no-op."""
    m = manager_in(state)
    m.finish(op)
    running = set(OPERATIONS[op].values())
    if FINISH[op] is not None and state in running:
        assert m.state is FINISH[op]
    else:
        assert m.state is state


@pytest.mark.parametrize("target", ALL_STATES, ids=lambda s: s.value)
@pytest.mark.parametrize("state", ALL_STATES, ids=lambda s: s.value)
def test_internal_transition_grid(state, target):
    m = manager_in(state)
    if target in TRANSITIONS[state]:
        m._transition(target)
        assert m.state is target
    else:
        with pytest.raises(InvalidTxnStateError):
            m._transition(target)
        assert m.state is state


# ----------------------------------------------------------------------------------------- named cases
def test_normal_lifecycle_many_transactions():
    m = TransactionManager("tid")
    m.start(Op.INIT)
    m.start(Op.INIT)      # a retry after a timed-out init resumes
    assert m.finish(Op.INIT) is S.READY
    for i in range(5):
        m.start(Op.BEGIN)
        m.check(Op.SEND)
        m.start(Op.SEND_OFFSETS)
        assert m.state is S.IN_TRANSACTION
        op = Op.COMMIT if i % 2 == 0 else Op.ABORT
        m.start(op)
        m.start(op)       # a retry after a timeout resumes the same call
        assert m.finish(op) is S.READY
    assert m.history[:3] == [S.UNINITIALIZED, S.INITIALIZING, S.READY]


@pytest.mark.parametrize("case,state,op", [
    ("commit without begin", S.READY, Op.COMMIT),
    ("abort without begin", S.READY, Op.ABORT),
    ("begin twice", S.IN_TRANSACTION, Op.BEGIN),
    ("send outside a transaction", S.READY, Op.SEND),
    ("send before init", S.UNINITIALIZED, Op.SEND),
    ("send while committing", S.COMMITTING, Op.SEND),
    ("send while aborting", S.ABORTING, Op.SEND),
    ("init while in a transaction", S.IN_TRANSACTION, Op.INIT),
    ("init twice", S.READY, Op.INIT),
    ("begin before init", S.UNINITIALIZED, Op.BEGIN),
    ("abort while a commit is pending", S.COMMITTING, Op.ABORT),
    ("commit while an abort is pending", S.ABORTING, Op.COMMIT),
    ("offsets outside a transaction", S.READY, Op.SEND_OFFSETS),
])
def test_illegal_calls_raise_invalid_txn_state(case, state, op):
    m = manager_in(state)
    with pytest.raises(InvalidTxnStateError):
        m.start(op)
    assert m.state is state


def test_abortable_error_names_cause_and_only_abort_leaves_it():
    m = manager_in(S.IN_TRANSACTION)
    cause = OutOfOrderSequenceError("gap on t-3")
    assert m.abortable(cause)
    assert m.state is S.ABORTABLE_ERROR and m.abortable_error is cause
    # a second failure keeps the first cause
    assert not m.abortable(BrokerTimeoutError("later"))
    assert m.abortable_error is cause
    for op in (Op.SEND, Op.COMMIT, Op.BEGIN, Op.INIT, Op.SEND_OFFSETS):
        with pytest.raises(TransactionAbortableError, match="gap on t-3"):
            m.start(op)
    m.start(Op.ABORT)
    assert m.finish(Op.ABORT) is S.READY
    assert m.abortable_error is None
    m.start(Op.BEGIN)


def test_abortable_from_committing_and_ignored_elsewhere():
    m = manager_in(S.COMMITTING)
    assert m.abortable(BrokerTimeoutError("x"))
    assert m.state is S.ABORTABLE_ERROR
    for state in (S.UNINITIALIZED, S.INITIALIZING, S.READY, S.ABORTING, S.FATAL_ERROR):
        m = manager_in(state)
        assert not m.abortable(BrokerTimeoutError("x"))
        assert m.state is state


@pytest.mark.parametrize("state", ALL_STATES, ids=lambda s: s.value)
@pytest.mark.parametrize("err", [ProducerFencedError("p"), InvalidProducerEpochError("e")], ids=["fenced", "epoch"])
def test_fatal_from_every_state_then_every_call_raises_fenced(state, err):
    m = manager_in(state)
    out = m.fatal(err)
    assert isinstance(out, ProducerFencedError)
    assert m.state is S.FATAL_ERROR
    seen = []
    for op in ALL_OPS:
        with pytest.raises(ProducerFencedError) as info:
            m.start(op)
        assert "tid" in str(info.value)
        seen.append(info.value)
        assert m.state is S.FATAL_ERROR
    assert len({id(e) for e in seen}) == len(ALL_OPS)   # a fresh exception each time (no growing traceback)
    # a second fatal error keeps the first one
    assert m.fatal(InvalidTransactionTimeoutError("later")) is out
    assert not m.abortable(BrokerTimeoutError("x"))


def test_fatal_other_error_is_raised_again_with_its_type():
    m = manager_in(S.INITIALIZING)
    m.fatal(InvalidTransactionTimeoutError("timeout 1000000 above 900000"))
    with pytest.raises(InvalidTransactionTimeoutError, match="900000"):
        m.start(Op.INIT)
    with pytest.raises(InvalidTransactionTimeoutError):
        m.check(Op.SEND)


def test_is_fatal_error():
    assert is_fatal_error(ProducerFencedError())
    assert is_fatal_error(InvalidProducerEpochError())
    assert not is_fatal_error(ConcurrentTransactionsError())
    assert not is_fatal_error(OutOfOrderSequenceError())
    assert not is_fatal_error(ValueError())


def test_random_walk_against_model():
    """Random calls and error reports; the manager follows the hand-written model exactly."""
    rng = random.Random(1234)
    for _ in range(200):
        m = TransactionManager("tid")
        model = S.UNINITIALIZED
        for _ in range(60):
            r = rng.random()
            if r < 0.05:
                m.fatal(ProducerFencedError())
                model = S.FATAL_ERROR
            elif r < 0.15:
                changed = m.abortable(BrokerTimeoutError())
                if model in (S.IN_TRANSACTION, S.COMMITTING):
                    assert changed
                    model = S.ABORTABLE_ERROR
                else:
                    assert not changed
            elif r < 0.45:
                op = rng.choice(ALL_OPS)
                m.finish(op)
                if FINISH[op] is not None and model in set(OPERATIONS[op].values()):
                    model = FINISH[op]
            else:
                op = rng.choice(ALL_OPS)
                if op in EXPECTED_START[model]:
                    m.start(op)
                    model = EXPECTED_START[model][op]
                else:
                    with pytest.raises(expected_error(model)):
                        m.start(op)
            assert m.state is model


def test_thread_safety_one_begin_wins():
    m = manager_in(S.READY)
    wins, errors = [], []
    barrier = threading.Barrier(8)

    def go():
        barrier.wait()
        try:
            m.start(Op.BEGIN)
            wins.append(1)
        except InvalidTxnStateError:
            errors.append(1)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(errors) == 7


# ======================================================================================= Producer API
# A transactional Producer against fakes: no Ray. Coordinator calls are replaced by a scripted fake;
# the partition leader's `produce.remote` raises synchronously (the sender treats that like an answer).
from ray_broker.client.producer import Producer  # noqa: E402
from ray_broker.config import ProducerConfig  # noqa: E402
from ray_broker.protocol import PartitionState, TopicMetadata  # noqa: E402
from ray_broker.records import TopicPartition  # noqa: E402


class _FakeRemote:
    def __init__(self, leader):
        self.leader = leader

    def remote(self, *args):
        self.leader.calls.append(args)
        raise self.leader.error


class _FakeLeader:
    def __init__(self, error):
        self.error = error
        self.calls: list[tuple] = []
        self.produce = _FakeRemote(self)


class _FakeContext:
    namespace = "ray_broker"

    def __init__(self, leader):
        self.leader = leader
        self.md = TopicMetadata("t", "id-1", (PartitionState(0, (0,), 0, 0, (0,)),), {}, None)

    def topic_metadata(self, topic, refresh=False):
        from ray_broker.errors import UnknownTopicOrPartitionError
        if topic != "t":
            raise UnknownTopicOrPartitionError(topic)
        return self.md

    def leader_handle(self, topic, partition, refresh=False):
        return 0, self.leader

    def on_error(self, *a):
        pass


class _FakeCoordinator:
    """Scripted replies per method: a list of results / exceptions, consumed in order."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.script: dict[str, list] = {}
        self.pid, self.epoch = 1000, 0

    def __call__(self, method, args, deadline, what, retry_also=()):
        self.calls.append((method, args))
        queue = self.script.get(method)
        if queue:
            item = queue.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item
        if method == "init_producer_id":
            return self.pid, self.epoch
        if method == "end_txn":
            self.epoch += 1
            return self.pid, self.epoch
        return None


@pytest.fixture
def make_producer():
    made = []

    def make(error=None, **cfg):
        leader = _FakeLeader(error or OutOfOrderSequenceError("refused"))
        cfg.setdefault("transactional_id", "tx-1")
        cfg.setdefault("linger_ms", 0)
        cfg.setdefault("retry_backoff_ms", 1)
        p = Producer(_FakeContext(leader), ProducerConfig.from_dict(cfg))
        coord = _FakeCoordinator()
        p._coordinator_call = coord
        made.append(p)
        return p, coord, leader

    yield make
    for p in made:
        p.close(timeout=2)


def _ready(make_producer, **kw):
    p, coord, leader = make_producer(**kw)
    p.init_transactions()
    return p, coord, leader


def test_producer_transactional_has_no_pid_until_init(make_producer):
    p, coord, _ = make_producer()
    assert p.transaction_state is S.UNINITIALIZED
    assert p.idempotence.producer_id == -1 and not p.idempotence.enabled
    with pytest.raises(InvalidTxnStateError):
        p.send("t", b"v")
    with pytest.raises(InvalidTxnStateError):
        p.begin_transaction()
    with pytest.raises(InvalidTxnStateError):
        p.commit_transaction()
    assert coord.calls == []
    p.init_transactions()
    assert coord.calls == [("init_producer_id", ("tx-1", 60_000))]
    assert p.transaction_state is S.READY
    assert (p.idempotence.producer_id, p.idempotence.producer_epoch, p.idempotence.enabled) == (1000, 0, True)
    with pytest.raises(InvalidTxnStateError):
        p.init_transactions()


def test_producer_send_outside_transaction_raises_immediately(make_producer):
    p, coord, _ = _ready(make_producer)
    import pyarrow as pa
    with pytest.raises(InvalidTxnStateError):
        p.send("t", b"v")
    with pytest.raises(InvalidTxnStateError):
        p.send_batch("t", pa.record_batch({"value": pa.array([b"a"], pa.binary())}))
    with pytest.raises(InvalidTxnStateError):
        p.send("no-such-topic", b"v")     # the state is checked before anything else
    assert p._used_bytes == 0


def test_producer_empty_transaction_does_not_call_end_txn(make_producer):
    p, coord, _ = _ready(make_producer)
    p.begin_transaction()
    p.commit_transaction()
    p.begin_transaction()
    p.abort_transaction()
    assert [c[0] for c in coord.calls] == ["init_producer_id"]
    assert p.transaction_state is S.READY


def test_producer_record_failure_makes_commit_abortable_then_abort_bumps_epoch(make_producer):
    p, coord, leader = _ready(make_producer, error=OutOfOrderSequenceError("gap"))
    p.begin_transaction()
    fut = p.send("t", b"v", partition=0)
    with pytest.raises(OutOfOrderSequenceError):
        fut.result(timeout=5)
    # the produce carried the transactional flag and id (8 arguments)
    args = leader.calls[0]
    assert len(args) == 8
    assert args[3:] == (1000, 0, 0, True, "tx-1")
    with pytest.raises(TransactionAbortableError, match="gap"):
        p.commit_transaction()
    assert p.transaction_state is S.ABORTABLE_ERROR
    with pytest.raises(TransactionAbortableError):
        p.send("t", b"v")
    assert not any(c[0] == "end_txn" for c in coord.calls)
    p.idempotence.next_sequence[("t", 0)] = 5
    p.abort_transaction()
    assert coord.calls[-1] == ("end_txn", ("tx-1", 1000, 0, False))
    assert p.transaction_state is S.READY
    assert (p.idempotence.producer_id, p.idempotence.producer_epoch) == (1000, 1)
    assert p.idempotence.next_sequence == {}       # sequences restart at 0 under the new epoch


def test_producer_commit_adopts_new_identity_and_resets_sequences(make_producer):
    p, coord, _ = _ready(make_producer)
    p.begin_transaction()
    p._txn_started = True                          # as if records had been written
    p.idempotence.next_sequence[("t", 0)] = 42
    coord.script["end_txn"] = [(2000, 0)]          # epoch exhausted: a new producer id
    p.commit_transaction()
    assert coord.calls[-1] == ("end_txn", ("tx-1", 1000, 0, True))
    assert (p.idempotence.producer_id, p.idempotence.producer_epoch) == (2000, 0)
    assert p.idempotence.next_sequence == {}
    assert p.transaction_state is S.READY


def test_producer_fenced_on_produce_is_fatal(make_producer):
    p, coord, _ = _ready(make_producer, error=ProducerFencedError("newer instance"))
    p.begin_transaction()
    fut = p.send("t", b"v", partition=0)
    with pytest.raises(ProducerFencedError):
        fut.result(timeout=5)
    deadline = time.monotonic() + 5
    while p.transaction_state is not S.FATAL_ERROR and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.transaction_state is S.FATAL_ERROR
    for call in (lambda: p.send("t", b"v"), p.begin_transaction, p.commit_transaction, p.abort_transaction,
                 p.init_transactions, lambda: p.send_offsets_to_transaction({TopicPartition("t", 0): 1}, "g")):
        with pytest.raises(ProducerFencedError):
            call()


def test_producer_fenced_on_end_txn_is_fatal(make_producer):
    p, coord, _ = _ready(make_producer)
    p.begin_transaction()
    p._txn_started = True
    coord.script["end_txn"] = [InvalidProducerEpochError("old epoch")]
    with pytest.raises(ProducerFencedError, match="old epoch"):
        p.commit_transaction()
    assert p.transaction_state is S.FATAL_ERROR
    with pytest.raises(ProducerFencedError):
        p.send("t", b"v")


def test_producer_commit_timeout_can_be_resumed(make_producer):
    p, coord, _ = _ready(make_producer)
    p.begin_transaction()
    p._txn_started = True
    coord.script["end_txn"] = [BrokerTimeoutError("coordinator unavailable")]
    with pytest.raises(BrokerTimeoutError):
        p.commit_transaction()
    assert p.transaction_state is S.COMMITTING
    with pytest.raises(InvalidTxnStateError):
        p.abort_transaction()
    with pytest.raises(InvalidTxnStateError):
        p.send("t", b"v")
    p.commit_transaction()
    assert p.transaction_state is S.READY
    assert [c[0] for c in coord.calls].count("end_txn") == 2


def test_producer_invalid_transaction_timeout_is_fatal(make_producer):
    p, coord, _ = make_producer()
    coord.script["init_producer_id"] = [InvalidTransactionTimeoutError("too long")]
    with pytest.raises(InvalidTransactionTimeoutError):
        p.init_transactions()
    assert p.transaction_state is S.FATAL_ERROR
    with pytest.raises(InvalidTransactionTimeoutError):
        p.init_transactions()


def test_producer_send_offsets(make_producer):
    p, coord, _ = _ready(make_producer)
    p._group_coordinator_index = lambda group_id: 0        # no controller in this test
    with pytest.raises(InvalidTxnStateError):
        p.send_offsets_to_transaction({TopicPartition("in", 0): 5}, "grp")
    p.begin_transaction()
    with pytest.raises(InvalidRequestError):
        p.send_offsets_to_transaction({TopicPartition("in", 0): -1}, "grp")
    with pytest.raises(InvalidRequestError):
        p.send_offsets_to_transaction({TopicPartition("in", 0): 1}, {"nope": 1})
    hooked = []
    p._commit_txn_offsets = lambda offsets, gm, **kw: hooked.append((offsets, gm, kw["group_id"]))
    p.send_offsets_to_transaction({TopicPartition("in", 0): 5}, {"group_id": "grp", "generation_id": 3,
                                                                  "member_id": "m-1"})
    assert coord.calls[-1] == ("add_offsets", ("tx-1", 1000, 0, "grp", ("__consumer_offsets", 0)))
    assert hooked[0][0] == {TopicPartition("in", 0): 5} and hooked[0][2] == "grp"
    p.commit_transaction()                          # offsets make the transaction non-empty
    assert coord.calls[-1] == ("end_txn", ("tx-1", 1000, 0, True))


def test_producer_send_offsets_error_is_abortable(make_producer):
    p, coord, _ = _ready(make_producer)
    p._group_coordinator_index = lambda group_id: 0
    p.begin_transaction()
    coord.script["add_offsets"] = [InvalidRequestError("bad group")]
    with pytest.raises(InvalidRequestError):
        p.send_offsets_to_transaction({TopicPartition("in", 0): 5}, "grp")
    assert p.transaction_state is S.ABORTABLE_ERROR
    p.abort_transaction()
    assert p.transaction_state is S.READY


def test_producer_transaction_context_manager(make_producer):
    p, coord, _ = _ready(make_producer)
    with p.transaction():
        assert p.transaction_state is S.IN_TRANSACTION
        p._txn_started = True
    assert coord.calls[-1][0] == "end_txn" and coord.calls[-1][1][3] is True
    with pytest.raises(RuntimeError):
        with p.transaction():
            p._txn_started = True
            raise RuntimeError("boom")
    assert coord.calls[-1][0] == "end_txn" and coord.calls[-1][1][3] is False
    assert p.transaction_state is S.READY


def test_non_transactional_producer_rejects_txn_calls():
    class Ctx(_FakeContext):
        pass
    p = Producer(Ctx(_FakeLeader(OutOfOrderSequenceError())), ProducerConfig.from_dict({"enable_idempotence": False}))
    try:
        assert p.transaction_state is None
        with pytest.raises(InvalidTxnStateError):
            p.begin_transaction()
        with pytest.raises(InvalidTxnStateError):
            p.init_transactions()
    finally:
        p.close(timeout=2)


def test_coordinator_call_retries_and_re_resolves(make_producer, monkeypatch):
    """Retriable errors retry the SAME call; actor errors re-resolve the handle; fatal errors raise."""
    import ray
    from ray.exceptions import RayActorError

    p, _, _ = make_producer(retry_backoff_ms=1)
    del p._coordinator_call                           # back to the real method
    handles = []

    class Handle:
        def __init__(self):
            self.end_txn = self

        def remote(self, *args):
            return args

    def coordinator(refresh=False):
        if refresh or not handles:
            handles.append(Handle())
        return handles[-1]

    replies = [ConcurrentTransactionsError("markers pending"), RayActorError(), (7, 3)]

    def fake_get(ref, timeout=None):
        item = replies.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(p, "_coordinator", coordinator)
    monkeypatch.setattr(ray, "get", fake_get)
    assert p._coordinator_call("end_txn", ("tx-1", 1, 2, True), time.monotonic() + 5, "x") == (7, 3)
    assert len(handles) == 2                          # re-resolved after the actor error

    replies[:] = [InvalidTxnStateError("not yet"), (8, 0)]
    assert p._coordinator_call("end_txn", (), time.monotonic() + 5, "x",
                               retry_also=(InvalidTxnStateError,)) == (8, 0)
    replies[:] = [ProducerFencedError("fenced"), (9, 0)]
    with pytest.raises(ProducerFencedError):
        p._coordinator_call("end_txn", (), time.monotonic() + 5, "x")
    replies[:] = [ConcurrentTransactionsError("still")] * 1000
    t0 = time.monotonic()
    with pytest.raises(BrokerTimeoutError, match="still"):
        p._coordinator_call("end_txn", (), time.monotonic() + 0.3, "x")
    assert time.monotonic() - t0 < 2

"""Random operation sequences against TxnCoordinatorShard (Hypothesis state machine).

Invariants after every step: replaying the log gives the live state; a snapshot rebuilds it;
every applied transition is in the table; a producer id belongs to one transactional id forever
and never comes back once rotated away; epochs stay in range.
"""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ray_broker.errors import BrokerError, UnknownServerError
from ray_broker.txn import IllegalStateTransition, TxnCoordinatorShard, TxnState
from ray_broker.txn.metadata import MAX_PRODUCER_EPOCH
from ray_broker.txn.records import TxnLogValue, txn_record
from ray_broker.txn.state import is_allowed

EPOCH = 3
MAX_TIMEOUT = 10_000
TIDS = st.sampled_from(["a", "b", "hot"])
PARTS = st.frozensets(st.sampled_from([("x", 0), ("x", 1), ("y", 0)]), min_size=1, max_size=3)
DEFER = st.booleans()


class TxnShardMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = 0
        self.next_id = 20_000
        # "hot" starts with an ongoing transaction at the exhausted epoch: its EndTxn must rotate the pid
        self.log = [txn_record("hot", TxnLogValue(10_000, 32766, -1, -1, -1, 5000, TxnState.ONGOING,
                                                  frozenset({("x", 0)}), 0, 0)),
                    # "b" is idle one bump away from exhaustion: InitProducerId / empty aborts rotate it
                    txn_record("b", TxnLogValue(10_001, 32765, -1, -1, -1, 5000, TxnState.EMPTY,
                                                frozenset(), -1, 0))]
        self.shard = TxnCoordinatorShard.load(self.log, EPOCH, MAX_TIMEOUT, self.allocate, producer_id_block_size=3)
        self.inflight = []
        self.owner: dict[int, str] = {10_000: "hot", 10_001: "b"}
        self.history: dict[str, list[int]] = {"hot": [10_000], "b": [10_001]}
        self.blocks: list[tuple[int, int]] = []

    def allocate(self, count):
        first = self.next_id
        self.next_id += count
        self.blocks.append((first, first + count))
        return first

    # ---- plumbing -----------------------------------------------------------------------------
    def submit(self, make, defer):
        try:
            out = make()
        except (IllegalStateTransition, UnknownServerError):
            raise
        except BrokerError:
            return
        for r in (out if isinstance(out, list) else [out]):
            if defer:
                self.inflight.append(r)
            else:
                self.apply(r)

    def apply(self, r):
        for t in r.transitions:
            before = self.shard.describe_transaction(t.transactional_id)
            assert (before is None) == (t.source_state is None)
            if before is not None:
                assert before.state == t.source_state.name
                if t.via_state is None:
                    assert is_allowed(t.source_state, t.state)
                else:
                    assert is_allowed(t.source_state, t.via_state) and is_allowed(t.via_state, t.state)
        self.log.extend(r.records)
        self.shard.apply(r, EPOCH)
        try:
            r.reply()
        except BrokerError:
            pass

    def ident(self, tid):
        d = self.shard.describe_transaction(tid)
        return (0, 0) if d is None else (d.producer_id, d.producer_epoch)

    # ---- rules --------------------------------------------------------------------------------
    @rule(ms=st.integers(1, 4000))
    def advance(self, ms):
        self.now += ms

    @rule(tid=TIDS, timeout=st.sampled_from([100, 5000, MAX_TIMEOUT + 1]), expected=st.booleans(), defer=DEFER)
    def init(self, tid, timeout, expected, defer):
        pid, epoch = self.ident(tid)
        kw = dict(expected_producer_id=pid, expected_epoch=epoch) if expected else {}
        self.submit(lambda: self.shard.handle_init_producer_id(tid, timeout, self.now, **kw), defer)

    @rule(tid=TIDS, parts=PARTS, delta=st.sampled_from([0, 0, 0, -1, 1]), defer=DEFER)
    def add_partitions(self, tid, parts, delta, defer):
        pid, epoch = self.ident(tid)
        self.submit(lambda: self.shard.handle_add_partitions(tid, pid, max(0, epoch + delta), parts, self.now), defer)

    @rule(tid=TIDS, defer=DEFER)
    def add_offsets(self, tid, defer):
        pid, epoch = self.ident(tid)
        self.submit(lambda: self.shard.handle_add_offsets(tid, pid, epoch, "g", ("__consumer_offsets", 1),
                                                          self.now), defer)

    @rule(tid=TIDS, commit=st.booleans(), previous=st.booleans(), defer=DEFER)
    def end_txn(self, tid, commit, previous, defer):
        pid, epoch = self.ident(tid)
        if previous:      # a retry of the decision that produced the current epoch
            epoch = max(0, epoch - 1)
        self.submit(lambda: self.shard.handle_end_txn(tid, pid, epoch, commit, self.now), defer)

    @rule(tid=TIDS, defer=DEFER)
    def complete_markers(self, tid, defer):
        plans = [p for p in self.shard.pending_markers() if p.transactional_id == tid]
        plan = plans[0] if plans else None
        self.submit(lambda: self.shard.complete_markers(tid, self.now, plan=plan), defer)

    @rule(defer=DEFER)
    def expire_timeouts(self, defer):
        self.submit(lambda: self.shard.expire_timed_out_transactions(self.now), defer)

    @rule(expiration=st.sampled_from([1000, 8000]), defer=DEFER)
    def expire_ids(self, expiration, defer):
        self.submit(lambda: self.shard.expire_transactional_ids(self.now, expiration), defer)

    @rule(tid=TIDS, defer=DEFER)
    def operator_abort(self, tid, defer):
        self.submit(lambda: self.shard.abort_transaction(tid, self.now), defer)

    @precondition(lambda self: self.inflight)
    @rule(i=st.integers(0, 10), ok=st.booleans())
    def finish_append(self, i, ok):
        r = self.inflight.pop(i % len(self.inflight))
        if ok:
            self.apply(r)
        else:
            self.shard.discard(r)

    # ---- invariants ---------------------------------------------------------------------------
    @invariant()
    def replay_reproduces_live_state(self):
        live = self.shard.committed_state()
        replayed = TxnCoordinatorShard.load(self.log, EPOCH + 1, MAX_TIMEOUT, self.allocate)
        assert replayed.committed_state() == live
        snap = TxnCoordinatorShard.load(self.shard.snapshot_records(), EPOCH + 1, MAX_TIMEOUT, self.allocate)
        assert snap.committed_state() == live
        assert {(p.transactional_id, p.producer_id, p.producer_epoch) for p in replayed.pending_markers()} == {
            (p.transactional_id, p.producer_id, p.producer_epoch) for p in self.shard.pending_markers()}

    @invariant()
    def producer_ids_are_never_reused(self):
        for tid, v in self.shard.committed_state()["txns"].items():
            assert 0 <= v.producer_epoch <= MAX_PRODUCER_EPOCH
            for pid in (v.producer_id, v.next_producer_id):
                if pid == -1:
                    continue
                assert self.owner.setdefault(pid, tid) == tid, f"pid {pid} reused by {tid}"
            hist = self.history.setdefault(tid, [])
            if not hist or hist[-1] != v.producer_id:
                assert v.producer_id not in hist, f"{tid} went back to retired pid {v.producer_id}"
                hist.append(v.producer_id)
        ranges = sorted(self.blocks)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))

    @invariant()
    def states_are_logged_states(self):
        for d in self.shard.list_transactions():
            assert d.state not in ("DEAD", "PREPARE_EPOCH_FENCE")
            assert (d.state == "ONGOING") == bool(d.partitions) or d.state.startswith("PREPARE")


TxnShardMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])
test_txn_shard_state_machine = TxnShardMachine.TestCase

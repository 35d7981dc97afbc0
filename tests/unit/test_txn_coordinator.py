"""TxnCoordinatorShard: handlers, two-phase apply, TV2 epoch bumps, recovery and compaction."""
from __future__ import annotations

import pytest

from ray_broker.errors import (BrokerError, ErrorCode, InvalidProducerEpochError, InvalidRequestError,
                               InvalidTxnStateError, ProducerFencedError, UnknownProducerIdError, UnknownServerError)
from ray_broker.txn import (EndTxnResponse, IllegalStateTransition, InitProducerIdResponse, MarkerPlan,
                            TxnCoordinatorShard, TxnState)
from ray_broker.txn.records import TxnLogValue, decode_record, txn_record

MAX_TIMEOUT = 900_000
T1 = ("orders", 0)
T2 = ("orders", 1)
OFFSETS = ("__consumer_offsets", 7)


class Harness:
    """The actor's part of the contract: append records, then apply (or discard)."""

    def __init__(self, coordinator_epoch=5, block_size=1000, first_id=0, log=None):
        self.log: list = list(log or [])
        self.next_id = first_id
        self.allocations = 0
        self.shard = TxnCoordinatorShard.load(self.log, coordinator_epoch, MAX_TIMEOUT, self.allocate,
                                              producer_id_block_size=block_size)

    def allocate(self, count):
        self.allocations += 1
        first = self.next_id
        self.next_id += count
        return first

    def run(self, result):
        self.log.extend(result.records)
        self.shard.apply(result, self.shard.coordinator_epoch)
        return result

    def __getattr__(self, name):        # h.handle_x(...) -> prepare, append, apply; returns the result
        method = getattr(self.shard, name)
        return lambda *a, **kw: self.run(method(*a, **kw))

    def state(self, tid):
        return self.shard.describe_transaction(tid)

    def reload(self, coordinator_epoch=None):
        epoch = self.shard.coordinator_epoch + 1 if coordinator_epoch is None else coordinator_epoch
        return TxnCoordinatorShard.load(self.log, epoch, MAX_TIMEOUT, self.allocate,
                                        producer_id_block_size=self.shard.producer_id_block_size)


def init(h, tid="t", now=0, **kw) -> InitProducerIdResponse:
    return h.handle_init_producer_id(tid, 60_000, now, **kw).reply()


def begin(h, tid="t", now=10, parts=(T1,)):
    d = h.state(tid)
    h.handle_add_partitions(tid, d.producer_id, d.producer_epoch, list(parts), now)
    return d.producer_id, d.producer_epoch


def end(h, tid, pid, epoch, commit, now=20):
    r = h.handle_end_txn(tid, pid, epoch, commit, now)
    return r, r.reply()


def decided(commit=True, parts=(T1,)):
    """A fresh harness whose producer's first transaction is decided (PREPARE_*): (harness, its
    marker plan, the end_txn response)."""
    h = Harness()
    init(h)
    begin(h, parts=parts)
    r, resp = end(h, "t", 0, 0, commit)
    return h, r.markers[0], resp


def code(exc_info):
    return exc_info.value.code


# ---- InitProducerId -------------------------------------------------------------------------
def test_init_new_id_allocates_a_pid_at_epoch_0_and_logs_the_block_first():
    h = Harness()
    r = h.handle_init_producer_id("t", 60_000, 7)
    assert r.reply() == InitProducerIdResponse(0, 0)
    kinds = [type(decode_record(k, v)[0]).__name__ for k, v in r.records]
    assert kinds == ["ProducerIdBlockKey", "TxnRecordKey"]
    d = h.state("t")
    assert (d.state, d.producer_id, d.producer_epoch, d.txn_timeout_ms, d.last_update_ms) == ("EMPTY", 0, 0, 60_000, 7)
    # a second id from the same (now logged) block: no block record
    r2 = h.handle_init_producer_id("u", 60_000, 8)
    assert r2.reply() == InitProducerIdResponse(1, 0) and len(r2.records) == 1


def test_init_existing_bumps_epoch_and_fences_the_old_instance():
    h = Harness()
    init(h)
    assert init(h, now=1) == InitProducerIdResponse(0, 1)
    with pytest.raises(ProducerFencedError):
        h.handle_add_partitions("t", 0, 0, [T1], 2)


def test_init_argument_checks():
    h = Harness()
    with pytest.raises(BrokerError) as e:
        h.shard.handle_init_producer_id("t", MAX_TIMEOUT + 1, 0)
    assert code(e) == ErrorCode.INVALID_TRANSACTION_TIMEOUT
    with pytest.raises(BrokerError) as e:
        h.shard.handle_init_producer_id("t", 0, 0)
    assert code(e) == ErrorCode.INVALID_TRANSACTION_TIMEOUT
    with pytest.raises(InvalidRequestError):
        h.shard.handle_init_producer_id("", 1000, 0)
    with pytest.raises(InvalidRequestError):
        h.shard.handle_init_producer_id("t", 1000, 0, expected_producer_id=3)
    assert h.state("t") is None and not h.shard.has_pending()


def test_init_without_transactional_id_hands_out_a_bare_pid():
    h = Harness()
    r = h.handle_init_producer_id(None, 0, 0)
    assert r.reply() == InitProducerIdResponse(0, 0) and not r.transitions
    assert init(h) == InitProducerIdResponse(1, 0)
    assert h.shard.list_transactions()[0].transactional_id == "t"


def test_init_fences_an_ongoing_transaction_and_answers_concurrent_transactions():
    h = Harness()
    init(h)
    begin(h, parts=(T1, T2))
    r = h.handle_init_producer_id("t", 60_000, 30)
    with pytest.raises(BrokerError) as e:
        r.reply()
    assert code(e) == ErrorCode.CONCURRENT_TRANSACTIONS and e.value.retriable
    assert [t.via_state for t in r.transitions] == [TxnState.PREPARE_EPOCH_FENCE]
    assert r.markers == (MarkerPlan("t", 0, 1, 5, False, frozenset({T1, T2})),)
    d = h.state("t")
    assert (d.state, d.producer_epoch) == ("PREPARE_ABORT", 1)
    # the client retries while markers are in flight: still CONCURRENT_TRANSACTIONS, nothing logged
    with pytest.raises(BrokerError) as e:
        h.shard.handle_init_producer_id("t", 60_000, 31)
    assert code(e) == ErrorCode.CONCURRENT_TRANSACTIONS
    # the fenced producer can neither write nor end its transaction
    with pytest.raises(ProducerFencedError):
        h.shard.handle_add_partitions("t", 0, 0, [T1], 32)
    with pytest.raises(ProducerFencedError):
        h.shard.handle_end_txn("t", 0, 0, True, 32)
    h.complete_markers("t", 33, plan=r.markers[0])
    assert h.state("t").state == "COMPLETE_ABORT" and h.state("t").partitions == ()
    assert init(h, now=34) == InitProducerIdResponse(0, 2)     # old + 2, as in Kafka


def test_init_with_expected_epoch_kip360_bump_and_retry():
    h = Harness()
    init(h)
    assert init(h, now=1, expected_producer_id=0, expected_epoch=0) == InitProducerIdResponse(0, 1)
    r = h.handle_init_producer_id("t", 60_000, 2, expected_producer_id=0, expected_epoch=0)   # retry
    assert r.reply() == InitProducerIdResponse(0, 1) and r.records == ()
    with pytest.raises(ProducerFencedError):
        h.shard.handle_init_producer_id("t", 60_000, 3, expected_producer_id=0, expected_epoch=7)
    with pytest.raises(ProducerFencedError):
        h.shard.handle_init_producer_id("t", 60_000, 3, expected_producer_id=9, expected_epoch=1)


# ---- AddPartitions / AddOffsets ------------------------------------------------------------
def test_add_partitions_starts_grows_and_is_idempotent():
    h = Harness()
    init(h)
    r = h.handle_add_partitions("t", 0, 0, [T1], 100)
    d = h.state("t")
    assert (d.state, d.partitions, d.txn_start_ms) == ("ONGOING", (T1,), 100)
    assert len(r.records) == 1 and r.reply() is None
    again = h.handle_add_partitions("t", 0, 0, [T1], 150)
    assert again.records == () and again.transitions == ()
    h.handle_add_partitions("t", 0, 0, [T2, T1], 200)
    d = h.state("t")
    assert (d.partitions, d.txn_start_ms, d.last_update_ms) == ((T1, T2), 100, 200)


def test_add_partitions_epoch_and_identity_checks():
    h = Harness()
    init(h)
    init(h)                          # epoch 1
    with pytest.raises(ProducerFencedError):
        h.shard.handle_add_partitions("t", 0, 0, [T1], 1)
    with pytest.raises(InvalidProducerEpochError):
        h.shard.handle_add_partitions("t", 0, 2, [T1], 1)
    with pytest.raises(UnknownProducerIdError):
        h.shard.handle_add_partitions("t", 99, 1, [T1], 1)
    with pytest.raises(UnknownProducerIdError):
        h.shard.handle_add_partitions("nope", 0, 1, [T1], 1)
    with pytest.raises(InvalidRequestError):
        h.shard.handle_add_partitions("t", 0, 1, [], 1)
    with pytest.raises(InvalidRequestError):
        h.shard.handle_add_partitions("t", 0, 1, [("x", -1)], 1)
    assert h.state("t").state == "EMPTY"


def test_add_partitions_while_preparing_is_concurrent_transactions():
    h = Harness()
    init(h)
    begin(h)
    _, resp = end(h, "t", 0, 0, True)
    with pytest.raises(BrokerError) as e:           # next transaction, new epoch, markers in flight
        h.shard.handle_add_partitions("t", 0, resp.producer_epoch, [T2], 30)
    assert code(e) == ErrorCode.CONCURRENT_TRANSACTIONS
    with pytest.raises(ProducerFencedError):        # late write of the previous transaction
        h.shard.handle_add_partitions("t", 0, 0, [T2], 30)


@pytest.mark.parametrize("commit", [True, False])
def test_completion_with_the_next_transactions_add_is_one_record(commit):
    """Markers written and the producer's next transaction waiting to add partitions: completion
    and add are one transition (one record, the ONGOING snapshot) instead of COMPLETE_* then ONGOING."""
    h, plan, resp = decided(commit, parts=(T1, OFFSETS))
    added = h.complete_markers("t", 30, plan=plan, add=(0, resp.producer_epoch, [T2]))
    assert added.response is True and len(added.records) == 1 and added.markers == ()
    d = h.state("t")
    assert (d.state, d.producer_id, d.producer_epoch, d.partitions, d.txn_start_ms) == ("ONGOING", 0, 1, (T2,), 30)
    assert h.shard.pending_markers() == []
    # the marker writer's own completion finds nothing left to do
    assert h.complete_markers("t", 31, plan=plan).records == ()
    # the same state after a restart, from the log alone; the old epoch is fenced
    assert h.reload().committed_state() == h.shard.committed_state()
    with pytest.raises(ProducerFencedError):
        h.shard.handle_add_partitions("t", 0, 0, [T1], 32)
    assert end(h, "t", 0, 1, True, now=40)[1] == EndTxnResponse(0, 2)     # the new transaction commits


def test_completion_with_an_add_of_another_identity_only_completes():
    h, plan, resp = decided()
    # the epoch of the decided transaction (a late write of it): not the next transaction's
    done = h.complete_markers("t", 30, plan=plan, add=(0, 0, [T2]))
    assert done.response is None
    d = h.state("t")
    assert (d.state, d.partitions) == ("COMPLETE_COMMIT", ())
    for bad in ([], [("", 0)], [("x", -1)]):                      # a malformed add never blocks the completion
        h2, plan2, resp2 = decided()
        assert h2.complete_markers("t", 30, plan=plan2, add=(0, resp2.producer_epoch, bad)).response is None
        assert h2.state("t").state == "COMPLETE_COMMIT"


def test_a_discarded_complete_and_add_leaves_the_prepare_to_complete():
    h, plan, resp = decided()
    result = h.shard.complete_markers("t", 30, plan=plan, add=(0, resp.producer_epoch, [T2]))
    with pytest.raises(BrokerError) as e:                          # busy while its append is pending
        h.shard.complete_markers("t", 31, plan=plan)
    assert code(e) == ErrorCode.CONCURRENT_TRANSACTIONS
    h.shard.discard(result)                                        # the append failed
    assert h.state("t").state == "PREPARE_COMMIT"
    h.complete_markers("t", 32, plan=plan)
    assert h.state("t").state == "COMPLETE_COMMIT"


def test_complete_and_add_after_an_exhausted_epoch_continues_under_the_next_producer_id():
    h = near_max(TxnState.ONGOING, parts=frozenset({T1}))
    r, resp = end(h, "t", 500, 32766, True)
    assert resp == EndTxnResponse(1000, 0)
    assert h.complete_markers("t", 22, plan=r.markers[0], add=(1000, 0, [T2])).response is True
    d = h.state("t")
    assert (d.state, d.producer_id, d.producer_epoch, d.partitions) == ("ONGOING", 1000, 0, (T2,))
    assert h.reload().committed_state() == h.shard.committed_state()


def test_add_offsets_adds_the_group_offsets_partition():
    h = Harness()
    init(h)
    h.handle_add_offsets("t", 0, 0, "group-a", OFFSETS, 5)
    assert h.state("t").partitions == (OFFSETS,)
    with pytest.raises(InvalidRequestError):
        h.shard.handle_add_offsets("t", 0, 0, "", OFFSETS, 5)


# ---- EndTxn ---------------------------------------------------------------------------------
@pytest.mark.parametrize("commit", [True, False])
def test_end_txn_bumps_the_epoch_and_plans_markers(commit):
    h = Harness()
    init(h)
    begin(h, parts=(T1, OFFSETS))
    r, resp = end(h, "t", 0, 0, commit)
    assert resp == EndTxnResponse(0, 1)
    assert r.markers == (MarkerPlan("t", 0, 1, 5, commit, frozenset({T1, OFFSETS})),)
    d = h.state("t")
    assert (d.state, d.producer_epoch, d.partitions) == (
        "PREPARE_COMMIT" if commit else "PREPARE_ABORT", 1, (OFFSETS, T1))
    assert h.shard.pending_markers() == list(r.markers)
    h.complete_markers("t", 40, plan=r.markers[0])
    d = h.state("t")
    assert (d.state, d.producer_epoch, d.partitions) == ("COMPLETE_COMMIT" if commit else "COMPLETE_ABORT", 1, ())
    assert h.shard.pending_markers() == []
    # the client continues with the bumped epoch; the old epoch is fenced
    h.handle_add_partitions("t", 0, 1, [T2], 50)
    assert h.state("t").txn_start_ms == 50
    with pytest.raises(ProducerFencedError):
        h.shard.handle_add_partitions("t", 0, 0, [T1], 51)


@pytest.mark.parametrize("commit", [True, False])
def test_end_txn_retry_is_idempotent_and_the_opposite_decision_is_refused(commit):
    h = Harness()
    init(h)
    begin(h)
    r, resp = end(h, "t", 0, 0, commit)
    for _ in range(2):                     # retry while PREPARE_*, then after COMPLETE_*
        again = h.handle_end_txn("t", 0, 0, commit, 25)
        assert again.reply() == resp and again.records == () and again.markers == ()
        with pytest.raises(InvalidTxnStateError):
            h.shard.handle_end_txn("t", 0, 0, not commit, 25)
        h.complete_markers("t", 30, plan=r.markers[0])
    # once the client moved on, a retry of the old decision is a stale epoch
    h.handle_add_partitions("t", 0, 1, [T1], 60)
    with pytest.raises(ProducerFencedError):
        h.shard.handle_end_txn("t", 0, 0, commit, 61)


def test_end_txn_without_a_transaction():
    h = Harness()
    init(h)
    with pytest.raises(InvalidTxnStateError):
        h.shard.handle_end_txn("t", 0, 0, True, 1)
    r, resp = end(h, "t", 0, 0, False)               # TV2: empty abort bumps, nothing to mark
    assert resp == EndTxnResponse(0, 1) and r.markers == ()
    assert [t.state for t in r.transitions] == [TxnState.COMPLETE_ABORT]
    assert h.state("t").state == "COMPLETE_ABORT"
    assert h.handle_end_txn("t", 0, 0, False, 2).reply() == resp        # retry
    with pytest.raises(InvalidTxnStateError):
        h.shard.handle_end_txn("t", 0, 1, True, 3)                     # commit of nothing
    with pytest.raises(UnknownProducerIdError):
        h.shard.handle_end_txn("nope", 0, 0, False, 3)


def test_end_txn_epoch_checks():
    h = Harness()
    init(h)
    init(h)
    begin(h)
    with pytest.raises(ProducerFencedError):
        h.shard.handle_end_txn("t", 0, 0, True, 1)
    with pytest.raises(InvalidProducerEpochError):
        h.shard.handle_end_txn("t", 0, 2, True, 1)
    with pytest.raises(UnknownProducerIdError):
        h.shard.handle_end_txn("t", 1, 1, True, 1)
    assert h.state("t").state == "ONGOING"


# ---- epoch exhaustion -----------------------------------------------------------------------
def near_max(state=TxnState.EMPTY, epoch=32766, parts=frozenset()):
    value = TxnLogValue(500, epoch, -1, -1, -1, 60_000, state, parts, 10 if parts else -1, 0)
    return Harness(first_id=1000, log=[txn_record("t", value)])


def test_init_at_max_epoch_rotates_the_producer_id():
    h = near_max()
    r = h.handle_init_producer_id("t", 60_000, 1, expected_producer_id=500, expected_epoch=32766)
    assert r.reply() == InitProducerIdResponse(1000, 0)
    d = h.state("t")
    assert (d.producer_id, d.producer_epoch) == (1000, 0)
    retry = h.handle_init_producer_id("t", 60_000, 2, expected_producer_id=500, expected_epoch=32766)
    assert retry.reply() == InitProducerIdResponse(1000, 0) and retry.records == ()
    with pytest.raises(ProducerFencedError):          # the old pid is gone
        h.shard.handle_add_partitions("t", 500, 32766, [T1], 3)


def test_init_at_max_epoch_without_expected_identity_rotates_without_a_retry_window():
    h = near_max()
    assert init(h) == InitProducerIdResponse(1000, 0)
    with pytest.raises(ProducerFencedError):
        h.shard.handle_init_producer_id("t", 60_000, 2, expected_producer_id=500, expected_epoch=32766)


def test_end_txn_at_max_epoch_allocates_the_next_producer_id():
    h = near_max(TxnState.ONGOING, parts=frozenset({T1}))
    r, resp = end(h, "t", 500, 32766, True)
    assert resp == EndTxnResponse(1000, 0)
    assert r.markers == (MarkerPlan("t", 500, 32767, 5, True, frozenset({T1})),)   # markers: old pid, Short.MAX
    assert h.handle_end_txn("t", 500, 32766, True, 21).reply() == resp            # retry
    with pytest.raises(BrokerError) as e:
        h.shard.handle_add_partitions("t", 1000, 0, [T1], 22)
    assert code(e) == ErrorCode.CONCURRENT_TRANSACTIONS
    h.complete_markers("t", 23, plan=r.markers[0])
    d = h.state("t")
    assert (d.state, d.producer_id, d.producer_epoch) == ("COMPLETE_COMMIT", 1000, 0)
    assert h.handle_end_txn("t", 500, 32766, True, 24).reply() == resp            # retry after completion
    h.handle_add_partitions("t", 1000, 0, [T1], 25)
    with pytest.raises(ProducerFencedError):
        h.shard.handle_add_partitions("t", 500, 32767, [T1], 26)


def test_empty_abort_at_max_epoch_rotates():
    h = near_max()
    r, resp = end(h, "t", 500, 32766, False)
    assert resp == EndTxnResponse(1000, 0) and h.state("t").state == "COMPLETE_ABORT"


# ---- timeouts, operator abort, expiration ---------------------------------------------------
def test_timed_out_transactions_are_fenced_and_aborted():
    h = Harness()
    h.handle_init_producer_id("t", 100, 0).reply()
    begin(h, now=1000)
    init(h, "other")
    assert h.shard.expire_timed_out_transactions(1100) == []
    (r,) = h.shard.expire_timed_out_transactions(1101)
    assert r.markers == (MarkerPlan("t", 0, 1, 5, False, frozenset({T1})),)
    assert h.shard.expire_timed_out_transactions(1102) == []          # pending: not twice
    h.run(r)
    assert h.state("t").state == "PREPARE_ABORT"
    with pytest.raises(ProducerFencedError):
        h.shard.handle_end_txn("t", 0, 0, True, 1103)
    with pytest.raises(ProducerFencedError):
        h.shard.handle_end_txn("t", 0, 0, False, 1103)


def test_operator_abort():
    h = Harness()
    init(h)
    with pytest.raises(InvalidTxnStateError):
        h.shard.abort_transaction("t", 1)
    with pytest.raises(InvalidRequestError):
        h.shard.abort_transaction("nope", 1)
    begin(h)
    r = h.abort_transaction("t", 2)
    assert r.markers[0].commit is False and r.markers[0].producer_epoch == 1
    assert h.abort_transaction("t", 3).records == ()                   # already aborting
    h.complete_markers("t", 4, plan=r.markers[0])
    d = h.state("t")
    assert (d.state, d.producer_epoch) == ("COMPLETE_ABORT", 1)
    with pytest.raises(ProducerFencedError):       # the aborted producer is fenced, even for an abort
        h.shard.handle_end_txn("t", 0, 0, False, 5)
    assert init(h, now=6) == InitProducerIdResponse(0, 2)


def test_operator_cannot_abort_a_decided_commit():
    h = Harness()
    init(h)
    begin(h)
    end(h, "t", 0, 0, True)
    with pytest.raises(InvalidTxnStateError):
        h.shard.abort_transaction("t", 5)


def test_idle_transactional_ids_expire_to_tombstones_and_pids_are_not_reused():
    h = Harness()
    init(h, "idle", now=0)
    init(h, "busy", now=0)
    begin(h, "busy", now=0)
    r = h.expire_transactional_ids(1000, 1000)
    assert r.records == ()
    r = h.expire_transactional_ids(1001, 1000)
    assert [decode_record(k, v) for k, v in r.records] == [(decode_record(*r.records[0])[0], None)]
    assert h.state("idle") is None and h.state("busy").state == "ONGOING"
    assert init(h, "idle", now=2000).producer_id == 2               # a fresh pid, not 0
    assert TxnCoordinatorShard.load(h.log, 6, MAX_TIMEOUT, h.allocate).describe_transaction("idle").producer_id == 2


# ---- the two-phase discipline ---------------------------------------------------------------
def test_state_changes_only_at_apply():
    h = Harness()
    init(h)
    before = h.shard.committed_state()
    r = h.shard.handle_add_partitions("t", 0, 0, [T1], 5)
    assert h.shard.committed_state() == before and h.state("t").state == "EMPTY"
    with pytest.raises(BrokerError) as e:                            # busy until applied or discarded
        h.shard.handle_add_partitions("t", 0, 0, [T2], 6)
    assert code(e) == ErrorCode.CONCURRENT_TRANSACTIONS
    h.shard.discard(r)                                               # the append failed
    assert h.shard.committed_state() == before and not h.shard.has_pending()
    h.handle_add_partitions("t", 0, 0, [T2], 7)
    assert h.state("t").partitions == (T2,)


def test_new_id_is_invisible_until_applied():
    h = Harness()
    r = h.shard.handle_init_producer_id("t", 1000, 0)
    assert h.state("t") is None
    with pytest.raises(BrokerError) as e:
        h.shard.handle_init_producer_id("t", 1000, 0)
    assert code(e) == ErrorCode.CONCURRENT_TRANSACTIONS
    h.shard.discard(r)
    assert init(h) == InitProducerIdResponse(1, 0)                   # pid 0 skipped, never reused


def test_apply_is_refused_when_the_coordinator_epoch_changed():
    h = Harness(coordinator_epoch=5)
    init(h)
    before = h.shard.committed_state()
    r = h.shard.handle_add_partitions("t", 0, 0, [T1], 5)
    with pytest.raises(BrokerError) as e:
        h.shard.apply(r, 6)
    assert code(e) == ErrorCode.NOT_COORDINATOR
    assert h.shard.committed_state() == before and not h.shard.has_pending()


def test_a_result_cannot_be_applied_twice():
    h = Harness()
    init(h)
    r = h.shard.handle_add_partitions("t", 0, 0, [T1], 5)
    h.run(r)
    with pytest.raises(IllegalStateTransition):
        h.shard.apply(r, 5)


def test_complete_markers_guards():
    h = Harness()
    init(h)
    with pytest.raises(InvalidTxnStateError):
        h.shard.complete_markers("t", 1)
    begin(h)
    r, _ = end(h, "t", 0, 0, True)
    plan = r.markers[0]
    stale = MarkerPlan("t", 0, 0, 5, True, plan.partitions)
    assert h.complete_markers("t", 2, plan=stale).records == ()       # not this transaction's plan
    assert h.state("t").state == "PREPARE_COMMIT"
    with pytest.raises(BrokerError) as e:
        h.shard.complete_markers("t", 2, plan=MarkerPlan("t", 0, 1, 4, True, plan.partitions))
    assert code(e) == ErrorCode.NOT_COORDINATOR
    first = h.shard.complete_markers("t", 3, plan=plan)
    with pytest.raises(BrokerError) as e:                            # KAFKA-10080: only one completion
        h.shard.complete_markers("t", 3, plan=plan)
    assert code(e) == ErrorCode.CONCURRENT_TRANSACTIONS
    h.run(first)
    assert h.complete_markers("t", 4, plan=plan).records == ()        # late duplicate: no-op


# ---- producer-id blocks ---------------------------------------------------------------------
def test_producer_ids_come_in_blocks_and_are_never_reused_after_restart():
    h = Harness(block_size=2)
    pids = [init(h, f"t{i}").producer_id for i in range(5)]
    assert pids == [0, 1, 2, 3, 4] and h.allocations == 3
    # restart: the remainder of the last block is abandoned; the next block must be above it
    h2 = Harness(block_size=2, first_id=h.next_id, log=h.log)
    assert init(h2, "new").producer_id == 6
    # an allocator that would hand out reserved ids is refused
    h3 = Harness(block_size=2, first_id=2, log=h.log)
    with pytest.raises(UnknownServerError):
        h3.shard.handle_init_producer_id("x", 1000, 0)


def test_a_block_offered_ahead_is_used_instead_of_calling_the_allocator():
    h = Harness(block_size=2)
    assert h.shard.needs_producer_id_block()
    h.shard.offer_producer_id_block(h.allocate(2) + 0)         # what the actor fetched with await
    assert not h.shard.needs_producer_id_block()
    calls = h.allocations
    assert [init(h, f"t{i}").producer_id for i in range(2)] == [0, 1]
    assert h.allocations == calls                               # no blocking call from the shard
    assert h.shard.needs_producer_id_block()
    assert init(h, "t2").producer_id == 2 and h.allocations == calls + 1   # fallback still works
    assert init(h, "t3").producer_id == 3
    # an offered block below ids already reserved is refused like an allocator's
    h.shard.offer_producer_id_block(0)
    with pytest.raises(UnknownServerError):
        h.shard.handle_init_producer_id("x", 1000, 0)


def test_a_discarded_block_record_is_logged_again_with_the_next_id():
    h = Harness(block_size=10)
    r = h.shard.handle_init_producer_id("a", 1000, 0)
    h.shard.discard(r)
    r2 = h.handle_init_producer_id("b", 1000, 0)
    assert len(r2.records) == 2 and r2.producer_id_block == r.producer_id_block
    assert len(h.handle_init_producer_id("c", 1000, 0).records) == 1


# ---- recovery / compaction ------------------------------------------------------------------
def build_mixed(h):
    for tid in ("a", "b", "c", "d"):
        init(h, tid)
    begin(h, "a")
    begin(h, "b")
    end(h, "b", 0 + 1, 0, True)                    # b is pid 1
    begin(h, "c")
    r, _ = end(h, "c", 2, 0, False)
    h.complete_markers("c", 30, plan=r.markers[0])
    h.expire_transactional_ids(5020, 5000)        # only d (idle since 0) expires; c completed at 30


def test_replay_rebuilds_state_and_pending_markers():
    h = Harness()
    build_mixed(h)
    loaded = h.reload(coordinator_epoch=9)
    assert loaded.committed_state() == h.shard.committed_state()
    assert loaded.describe_transaction("d") is None
    assert loaded.pending_markers() == [MarkerPlan("b", 1, 1, 9, True, frozenset({T1}))]
    assert [d.state for d in loaded.list_transactions()] == ["ONGOING", "PREPARE_COMMIT", "COMPLETE_ABORT"]


def test_snapshot_records_round_trip():
    h = Harness()
    build_mixed(h)
    snap = h.shard.snapshot_records()
    assert len(snap) == 1 + 3                      # block + one per live id
    loaded = TxnCoordinatorShard.load(snap, 6, MAX_TIMEOUT, h.allocate)
    assert loaded.committed_state() == h.shard.committed_state()
    assert loaded.snapshot_records() == snap


def test_describe_and_list():
    h = Harness()
    h.handle_init_producer_id("t", 30_000, 0)
    begin(h, now=50, parts=(T2, T1))
    d = h.shard.describe_transaction("t")
    assert d.state == "ONGOING" and d.partitions == (T1, T2) and d.txn_start_ms == 50
    assert d.txn_timeout_ms == 30_000 and (d.producer_id, d.producer_epoch) == (0, 0)
    assert h.shard.list_transactions() == [d]
    assert h.shard.describe_transaction("none") is None


def test_no_transaction_can_open_at_the_fencing_epoch():
    h = near_max(TxnState.ONGOING, parts=frozenset({T1}))
    (r,) = h.shard.expire_timed_out_transactions(60_011)
    h.run(r)
    h.complete_markers("t", 60_012, plan=r.markers[0])
    assert h.state("t").producer_epoch == 32767
    with pytest.raises(ProducerFencedError):
        h.shard.handle_add_partitions("t", 500, 32767, [T1], 60_013)
    assert init(h, now=60_014) == InitProducerIdResponse(1000, 0)

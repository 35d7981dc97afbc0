"""Transaction-log record codec: round trips, versioning, tombstones, corruption."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ray_broker.errors import CorruptRecordError
from ray_broker.txn.records import (TXN_LOG_FORMAT_VERSION, ProducerIdBlockKey, ProducerIdBlockValue, TxnLogValue,
                                    TxnRecordKey, decode_key, decode_record, decode_txn_value, encode_txn_key,
                                    encode_txn_value, producer_id_block_record, txn_record)
from ray_broker.txn.state import TxnState

LOGGABLE = [s for s in TxnState if s not in (TxnState.DEAD, TxnState.PREPARE_EPOCH_FENCE)]

values = st.builds(
    TxnLogValue,
    producer_id=st.integers(0, 2**63 - 1), producer_epoch=st.integers(0, 32767),
    last_producer_id=st.integers(-1, 2**63 - 1), last_producer_epoch=st.integers(-1, 32767),
    next_producer_id=st.integers(-1, 2**63 - 1), txn_timeout_ms=st.integers(1, 900_000),
    state=st.sampled_from(LOGGABLE),
    partitions=st.frozensets(st.tuples(st.text(min_size=1, max_size=8), st.integers(0, 1000)), max_size=5),
    txn_start_ms=st.integers(-1, 2**50), last_update_ms=st.integers(-1, 2**50))


@given(st.text(min_size=1, max_size=30), values)
def test_txn_record_round_trip(tid, value):
    key, raw = txn_record(tid, value)
    k, v = decode_record(key, raw)
    assert k == TxnRecordKey(tid) and v == value
    assert json.loads(raw)["v"] == TXN_LOG_FORMAT_VERSION


def test_encoding_is_deterministic():
    v = TxnLogValue(1, 2, -1, -1, -1, 100, TxnState.ONGOING, frozenset({("b", 1), ("a", 0), ("a", 2)}), 5, 6)
    assert encode_txn_value(v) == encode_txn_value(v)
    assert json.loads(encode_txn_value(v))["partitions"] == [["a", 0], ["a", 2], ["b", 1]]


def test_tombstone_and_block_records():
    key, value = txn_record("t", None)
    assert value is None and decode_record(key, value) == (TxnRecordKey("t"), None)
    key, value = producer_id_block_record(ProducerIdBlockValue(1000, 2000))
    assert decode_record(key, value) == (ProducerIdBlockKey(), ProducerIdBlockValue(1000, 2000))
    with pytest.raises(CorruptRecordError):
        decode_record(key, None)


def test_key_kinds_are_distinct_even_for_a_tid_that_looks_like_the_block_key():
    assert decode_key(encode_txn_key("producer_id_block")) == TxnRecordKey("producer_id_block")
    with pytest.raises(CorruptRecordError):
        decode_key(b"\x00")
    with pytest.raises(CorruptRecordError):
        decode_key(b"\x00\x07abc")


@pytest.mark.parametrize("state", [TxnState.DEAD, TxnState.PREPARE_EPOCH_FENCE])
def test_never_logged_states(state):
    v = TxnLogValue(1, 0, -1, -1, -1, 100, state, frozenset(), -1, 0)
    with pytest.raises(ValueError):
        encode_txn_value(v)
    raw = json.loads(encode_txn_value(TxnLogValue(1, 0, -1, -1, -1, 100, TxnState.EMPTY, frozenset(), -1, 0)))
    raw["state"] = int(state)
    with pytest.raises(CorruptRecordError):
        decode_txn_value(json.dumps(raw).encode())


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(v=TXN_LOG_FORMAT_VERSION + 1),
    lambda d: d.pop("v"),
    lambda d: d.update(producer_id="1"),
    lambda d: d.update(state=99),
    lambda d: d.update(partitions=[["a"]]),
])
def test_corrupt_or_newer_values_are_rejected(mutate):
    doc = json.loads(encode_txn_value(TxnLogValue(1, 0, -1, -1, -1, 100, TxnState.EMPTY, frozenset(), -1, 0)))
    mutate(doc)
    with pytest.raises(CorruptRecordError):
        decode_txn_value(json.dumps(doc).encode())
    with pytest.raises(CorruptRecordError):
        decode_txn_value(b"\xff not json")


def test_unknown_fields_are_ignored_for_forward_compatibility():
    doc = json.loads(encode_txn_value(TxnLogValue(1, 0, -1, -1, -1, 100, TxnState.EMPTY, frozenset(), -1, 0)))
    doc["client_transaction_version"] = 2
    assert decode_txn_value(json.dumps(doc).encode()).producer_id == 1

"""Transaction-log records: what the coordinator appends to ``__transaction_state``.

A record is a plain ``(key: bytes, value: bytes | None)`` pair. The log is compacted by key
(last record per key wins), so every value holds the *full* state after a transition.

Key layout: a 2-byte big-endian key type (Kafka's version-prefixed keys), then the payload::

    0x0000 + utf-8 transactional id      -> TxnLogValue (or None: tombstone, the id expired)
    0x0001 + b"producer_id_block"        -> ProducerIdBlockValue (one key: latest block wins)

(The prefix exists so both record kinds can share one compacted partition; a transactional id
is otherwise the key verbatim.)

Values are compact, key-sorted JSON with a ``"v"`` format version. A decoder accepts every
version up to `TXN_LOG_FORMAT_VERSION`, ignores unknown fields (forward-compatible additions)
and raises `CorruptRecordError` on anything malformed or newer than it understands.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Union

from ..errors import CorruptRecordError
from .state import NEVER_LOGGED, TxnState

TXN_LOG_FORMAT_VERSION = 1
KEY_TYPE_TXN = 0
KEY_TYPE_PRODUCER_ID_BLOCK = 1
_PRODUCER_ID_BLOCK_KEY = struct.pack(">h", KEY_TYPE_PRODUCER_ID_BLOCK) + b"producer_id_block"

Record = tuple[bytes, Union[bytes, None]]
Partition = tuple[str, int]


@dataclass(frozen=True)
class TxnLogValue:
    """Everything the coordinator knows about one transactional id after a transition."""
    producer_id: int
    producer_epoch: int
    last_producer_id: int
    last_producer_epoch: int
    next_producer_id: int           # TV2 epoch overflow: the id switched to at COMPLETE_*; -1 = none
    txn_timeout_ms: int
    state: TxnState
    partitions: frozenset[Partition]
    txn_start_ms: int
    last_update_ms: int


@dataclass(frozen=True)
class ProducerIdBlockValue:
    """A block [block_start, block_end) reserved for this coordinator; no id below block_end may
    be handed out again by any later block."""
    block_start: int
    block_end: int


@dataclass(frozen=True)
class TxnRecordKey:
    transactional_id: str


@dataclass(frozen=True)
class ProducerIdBlockKey:
    pass


# ---- keys -----------------------------------------------------------------------------------
def encode_txn_key(transactional_id: str) -> bytes:
    return struct.pack(">h", KEY_TYPE_TXN) + transactional_id.encode("utf-8")


def producer_id_block_key() -> bytes:
    return _PRODUCER_ID_BLOCK_KEY


def decode_key(key: bytes) -> TxnRecordKey | ProducerIdBlockKey:
    if not isinstance(key, (bytes, bytearray)) or len(key) < 2:
        raise CorruptRecordError(f"transaction-log key too short: {key!r}")
    (kind,) = struct.unpack_from(">h", key)
    if kind == KEY_TYPE_TXN:
        try:
            return TxnRecordKey(bytes(key[2:]).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CorruptRecordError(f"transactional id is not utf-8: {key!r}") from e
    if kind == KEY_TYPE_PRODUCER_ID_BLOCK and bytes(key) == _PRODUCER_ID_BLOCK_KEY:
        return ProducerIdBlockKey()
    raise CorruptRecordError(f"unknown transaction-log key type {kind} in {key!r}")


# ---- values ---------------------------------------------------------------------------------
def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _loads(value: bytes) -> dict:
    try:
        doc = json.loads(bytes(value).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptRecordError(f"transaction-log value is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise CorruptRecordError("transaction-log value is not a JSON object")
    v = doc.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CorruptRecordError(f"transaction-log value has no valid format version: {v!r}")
    if v > TXN_LOG_FORMAT_VERSION:
        raise CorruptRecordError(f"transaction-log format version {v} is newer than supported "
                                 f"({TXN_LOG_FORMAT_VERSION})")
    return doc


def _int(doc: dict, name: str) -> int:
    x = doc.get(name)
    if not isinstance(x, int) or isinstance(x, bool):
        raise CorruptRecordError(f"transaction-log field {name!r} is not an integer: {x!r}")
    return x


def encode_txn_value(value: TxnLogValue) -> bytes:
    state = TxnState(value.state)
    if state in NEVER_LOGGED:
        raise ValueError(f"{state.name} is never written as a transaction-log value")
    return _dumps({
        "v": TXN_LOG_FORMAT_VERSION,
        "producer_id": value.producer_id,
        "producer_epoch": value.producer_epoch,
        "last_producer_id": value.last_producer_id,
        "last_producer_epoch": value.last_producer_epoch,
        "next_producer_id": value.next_producer_id,
        "txn_timeout_ms": value.txn_timeout_ms,
        "state": int(state),
        "partitions": sorted([t, p] for t, p in value.partitions),
        "txn_start_ms": value.txn_start_ms,
        "last_update_ms": value.last_update_ms,
    })


def decode_txn_value(value: bytes) -> TxnLogValue:
    doc = _loads(value)
    try:
        state = TxnState(_int(doc, "state"))
    except ValueError as e:
        raise CorruptRecordError(f"unknown transaction state {doc.get('state')!r}") from e
    if state in NEVER_LOGGED:
        raise CorruptRecordError(f"{state.name} must never appear as a transaction-log value")
    raw = doc.get("partitions")
    if not isinstance(raw, list):
        raise CorruptRecordError("transaction-log field 'partitions' is not a list")
    parts = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], int) or isinstance(item[1], bool)):
            raise CorruptRecordError(f"bad partition entry {item!r}")
        parts.append((item[0], item[1]))
    return TxnLogValue(
        producer_id=_int(doc, "producer_id"), producer_epoch=_int(doc, "producer_epoch"),
        last_producer_id=_int(doc, "last_producer_id"), last_producer_epoch=_int(doc, "last_producer_epoch"),
        next_producer_id=_int(doc, "next_producer_id"), txn_timeout_ms=_int(doc, "txn_timeout_ms"),
        state=state, partitions=frozenset(parts), txn_start_ms=_int(doc, "txn_start_ms"),
        last_update_ms=_int(doc, "last_update_ms"))


def encode_producer_id_block(block: ProducerIdBlockValue) -> bytes:
    return _dumps({"v": TXN_LOG_FORMAT_VERSION, "block_start": block.block_start, "block_end": block.block_end})


def decode_producer_id_block(value: bytes) -> ProducerIdBlockValue:
    doc = _loads(value)
    start, end = _int(doc, "block_start"), _int(doc, "block_end")
    if not 0 <= start < end:
        raise CorruptRecordError(f"bad producer-id block [{start}, {end})")
    return ProducerIdBlockValue(start, end)


# ---- whole records --------------------------------------------------------------------------
def txn_record(transactional_id: str, value: TxnLogValue | None) -> Record:
    """The record for `transactional_id`; `value=None` is the tombstone of an expired id."""
    return encode_txn_key(transactional_id), (None if value is None else encode_txn_value(value))


def producer_id_block_record(block: ProducerIdBlockValue) -> Record:
    return producer_id_block_key(), encode_producer_id_block(block)


def decode_record(key: bytes, value: bytes | None):
    """-> (TxnRecordKey, TxnLogValue | None) or (ProducerIdBlockKey, ProducerIdBlockValue)."""
    k = decode_key(key)
    if isinstance(k, TxnRecordKey):
        return k, (None if value is None else decode_txn_value(value))
    if value is None:
        raise CorruptRecordError("producer-id block record has no value")
    return k, decode_producer_id_block(value)

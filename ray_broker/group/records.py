"""Records of the internal replicated topic ``__consumer_offsets``: ``(key: bytes, value: bytes | None)``.

Layout (both versioned, reference section 4.2)::

    key   = uint16 record type (big endian) + canonical JSON array of the key fields
    value = uint16 value version (big endian) + JSON object;  None = tombstone

The key bytes are canonical (same logical key -> same bytes), so key-based compaction works.

=================  ==========================================  =================================
record type        key fields                                  value (None = tombstone)
=================  ==========================================  =================================
OFFSET_COMMIT      [group, topic, partition]                   {offset, metadata, commit_ms}
GROUP_METADATA     [group]                                     the whole group: state, generation,
                                                               protocol, leader, members with
                                                               subscription and assignment
TXN_OFFSET_COMMIT  [producer_id, group, topic, partition]      {producer_epoch, offset, metadata,
                                                               commit_ms}: pending until a marker
TXN_MARKER         [producer_id]                               {producer_epoch, commit}
=================  ==========================================  =================================

An OFFSET_COMMIT tombstone deletes the committed offset and the partition's pending transactional
offsets; a GROUP_METADATA tombstone deletes the group's metadata only (deleting a group writes an
OFFSET_COMMIT tombstone per partition first).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Union

from ..errors import ErrorCode, error_for
from ..records import TopicPartition
from .group import ConsumerGroup
from .offsets import OffsetAndMetadata

VALUE_VERSION = 0
_U16 = struct.Struct(">H")

Record = tuple[bytes, Union[bytes, None]]


class RecordType(IntEnum):
    OFFSET_COMMIT = 1
    GROUP_METADATA = 2
    TXN_OFFSET_COMMIT = 3
    TXN_MARKER = 4


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _key(rtype: RecordType, fields: list) -> bytes:
    return _U16.pack(int(rtype)) + _dumps(fields)


def _value(obj: dict) -> bytes:
    return _U16.pack(VALUE_VERSION) + _dumps(obj)


def _om(d: dict) -> OffsetAndMetadata:
    return OffsetAndMetadata(int(d["offset"]), str(d.get("metadata", "")), int(d.get("commit_ms", 0)))


def _om_dict(om: OffsetAndMetadata) -> dict:
    return {"offset": om.offset, "metadata": om.metadata, "commit_ms": om.commit_ms}


# ---- encoders ------------------------------------------------------------------------------------
def offset_commit_record(group: str, tp: TopicPartition, value: OffsetAndMetadata | None) -> Record:
    return (_key(RecordType.OFFSET_COMMIT, [group, tp.topic, tp.partition]),
            None if value is None else _value(_om_dict(value)))


def group_metadata_record(group: ConsumerGroup) -> Record:
    return _key(RecordType.GROUP_METADATA, [group.group_id]), _value(group.to_dict())


def group_tombstone(group_id: str) -> Record:
    return _key(RecordType.GROUP_METADATA, [group_id]), None


def txn_offset_record(producer_id: int, producer_epoch: int, group: str, tp: TopicPartition,
                      value: OffsetAndMetadata | None) -> Record:
    return (_key(RecordType.TXN_OFFSET_COMMIT, [producer_id, group, tp.topic, tp.partition]),
            None if value is None else _value({"producer_epoch": producer_epoch, **_om_dict(value)}))


def txn_marker_record(producer_id: int, producer_epoch: int, commit: bool) -> Record:
    return (_key(RecordType.TXN_MARKER, [producer_id]),
            _value({"producer_epoch": producer_epoch, "commit": bool(commit)}))


# ---- decoded forms -------------------------------------------------------------------------------
@dataclass(frozen=True)
class OffsetCommitRecord:
    group: str
    tp: TopicPartition
    value: OffsetAndMetadata | None


@dataclass(frozen=True)
class GroupMetadataRecord:
    group_id: str
    value: dict | None          # ConsumerGroup.to_dict() form


@dataclass(frozen=True)
class TxnOffsetRecord:
    producer_id: int
    group: str
    tp: TopicPartition
    producer_epoch: int
    value: OffsetAndMetadata | None


@dataclass(frozen=True)
class TxnMarkerRecord:
    producer_id: int
    producer_epoch: int
    commit: bool


GroupLogRecord = Union[OffsetCommitRecord, GroupMetadataRecord, TxnOffsetRecord, TxnMarkerRecord]


def _corrupt(msg: str):
    return error_for(ErrorCode.CORRUPT_MESSAGE, f"__consumer_offsets record: {msg}")


def decode_record(key: bytes, value: bytes | None) -> GroupLogRecord:
    if not isinstance(key, (bytes, bytearray)) or len(key) < 2:
        raise _corrupt(f"bad key {key!r}")
    (rtype,) = _U16.unpack_from(key)
    try:
        rtype = RecordType(rtype)
        fields = json.loads(bytes(key[2:]))
    except (ValueError, json.JSONDecodeError) as e:
        raise _corrupt(f"bad key {key!r}: {e}") from None
    body = None
    if value is not None:
        if len(value) < 2:
            raise _corrupt("value shorter than its version header")
        (version,) = _U16.unpack_from(value)
        if version > VALUE_VERSION:
            raise _corrupt(f"value version {version} is newer than this broker understands ({VALUE_VERSION})")
        body = json.loads(bytes(value[2:]))
    if rtype is RecordType.OFFSET_COMMIT:
        group, topic, partition = fields
        return OffsetCommitRecord(group, TopicPartition(topic, int(partition)), None if body is None else _om(body))
    if rtype is RecordType.GROUP_METADATA:
        (group_id,) = fields
        return GroupMetadataRecord(group_id, body)
    if rtype is RecordType.TXN_OFFSET_COMMIT:
        pid, group, topic, partition = fields
        return TxnOffsetRecord(int(pid), group, TopicPartition(topic, int(partition)),
                               -1 if body is None else int(body["producer_epoch"]),
                               None if body is None else _om(body))
    (pid,) = fields
    if body is None:
        raise _corrupt("a transaction marker cannot be a tombstone")
    return TxnMarkerRecord(int(pid), int(body["producer_epoch"]), bool(body["commit"]))

"""Record model shared by broker and client: schemas, topic names, metadata tuples.

A stored batch holds `timestamp` plus the topic's columns; the `offset` column is not stored (it is
`base_offset + row`) and is added when a batch is read. Default topics have columns key, value,
headers; a topic may declare its own Arrow schema instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from .errors import CorruptRecordError, InvalidRequestError, InvalidTopicError, SchemaMismatchError

OFFSET = "offset"
TIMESTAMP = "timestamp"
RESERVED_COLUMNS = (OFFSET, TIMESTAMP)
TIMESTAMP_TYPE = pa.timestamp("ms", tz="UTC")
HEADERS_TYPE = pa.list_(pa.struct([pa.field("key", pa.string()), pa.field("value", pa.binary())]))

DEFAULT_USER_SCHEMA = pa.schema([
    pa.field("key", pa.binary(), nullable=True),
    pa.field("value", pa.binary(), nullable=True),
    pa.field("headers", HEADERS_TYPE, nullable=True),
])

TOPIC_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class RecordMetadata(NamedTuple):
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class BatchMetadata:
    """Where each input row of a `send_batch` landed: arrays aligned with the input rows."""
    topic: str
    partitions: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)


def validate_topic_name(name: object, internal_ok: bool = False) -> str:
    if not isinstance(name, str) or not TOPIC_NAME_RE.match(name) or name in (".", ".."):
        raise InvalidTopicError(
            f"invalid topic name {name!r}: use 1-249 characters from [A-Za-z0-9._-]")
    if name.startswith("__") and not internal_ok:
        raise InvalidTopicError(f"invalid topic name {name!r}: names starting with '__' are internal")
    return name


def validate_user_schema(schema: pa.Schema) -> pa.Schema:
    if not isinstance(schema, pa.Schema):
        raise SchemaMismatchError(f"topic schema must be a pyarrow.Schema, got {type(schema).__name__}")
    for name in RESERVED_COLUMNS:
        if name in schema.names:
            raise SchemaMismatchError(f"topic schema may not use the reserved column name {name!r}")
    if len(set(schema.names)) != len(schema.names):
        raise SchemaMismatchError(f"topic schema has duplicate column names: {schema.names}")
    if len(schema) == 0:
        raise SchemaMismatchError("topic schema has no columns")
    return schema.remove_metadata()


def stored_schema(user_schema: pa.Schema | None) -> pa.Schema:
    """Schema of batches as stored: timestamp then the user's (or default) columns."""
    base = DEFAULT_USER_SCHEMA if user_schema is None else user_schema
    return pa.schema([pa.field(TIMESTAMP, TIMESTAMP_TYPE, nullable=False), *base])


def read_schema(user_schema: pa.Schema | None) -> pa.Schema:
    """Schema consumers receive: offset, timestamp, then the topic's columns."""
    return pa.schema([pa.field(OFFSET, pa.int64(), nullable=False), *stored_schema(user_schema)])


def check_schema_evolution(old: pa.Schema, new: pa.Schema) -> pa.Schema:
    """Allowed: the same columns with the same types, plus new nullable columns."""
    new = validate_user_schema(new)
    for f in old:
        if f.name not in new.names:
            raise SchemaMismatchError(f"schema change drops column {f.name!r}; only adding nullable columns is allowed")
        nf = new.field(f.name)
        if not nf.type.equals(f.type):
            raise SchemaMismatchError(f"schema change alters column {f.name!r} from {f.type} to {nf.type}")
    for nf in new:
        if nf.name not in old.names and not nf.nullable:
            raise SchemaMismatchError(f"added column {nf.name!r} must be nullable")
    return new


def conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Return `batch` with exactly `schema`'s columns, in order.

    Missing nullable columns are filled with nulls (schema evolution); anything else that differs is
    a `SchemaMismatchError`. Zero-copy when the batch already matches.
    """
    if batch.schema.equals(schema, check_metadata=False):
        return batch
    names = batch.schema.names
    extra = [n for n in names if n not in schema.names]
    if extra:
        raise SchemaMismatchError(f"batch has columns not in the topic schema: {extra}; topic schema: {schema}")
    if len(set(names)) != len(names):
        raise SchemaMismatchError(f"batch has duplicate column names: {names}")
    columns = []
    for f in schema:
        if f.name in names:
            col = batch.column(names.index(f.name))
            if not col.type.equals(f.type):
                raise SchemaMismatchError(
                    f"column {f.name!r} has type {col.type}, topic schema wants {f.type}")
            if not f.nullable and col.null_count:
                raise SchemaMismatchError(f"column {f.name!r} is not nullable but has {col.null_count} nulls")
            columns.append(col)
        elif f.nullable:
            columns.append(pa.nulls(batch.num_rows, f.type))
        else:
            raise SchemaMismatchError(f"batch lacks required column {f.name!r}; topic schema: {schema}")
    return pa.RecordBatch.from_arrays(columns, schema=schema)


# Below this size a produced batch crosses a Ray call as Arrow IPC bytes: Ray pickles a RecordBatch
# object by object (schema, fields, buffers), about 0.3 ms of CPU more per call than bytes (measured:
# 50-2,000 rows). Above it the pickled batch's buffers travel out of band, which copies less than IPC
# does. Fetch results stay RecordBatches: the same for them cost W4 10-20 % (A/B runs).
WIRE_IPC_MAX_BYTES = 256 * 1024


def to_wire(batch: pa.RecordBatch) -> pa.RecordBatch | bytes:
    """What to pass to a Ray call for `batch`: IPC stream bytes when small, else the batch itself."""
    if batch.nbytes > WIRE_IPC_MAX_BYTES:
        return batch
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def from_wire(payload) -> pa.RecordBatch:
    """The RecordBatch a Ray call carried (`to_wire`'s output, or a RecordBatch from older callers)."""
    if isinstance(payload, pa.RecordBatch):
        return payload
    if not isinstance(payload, (bytes, bytearray, memoryview, pa.Buffer)):
        raise InvalidRequestError(f"expected a pyarrow RecordBatch or Arrow IPC bytes, got {type(payload).__name__}")
    try:
        reader = pa.ipc.open_stream(payload)
        batches = list(reader)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptRecordError(f"produce payload is not a valid Arrow IPC stream: {exc}") from None
    if len(batches) != 1:
        raise CorruptRecordError(f"produce payload holds {len(batches)} record batches, expected 1")
    return batches[0]


def with_offsets(batch: pa.RecordBatch, base_offset: int) -> pa.RecordBatch:
    """Prepend the `offset` column (base_offset + row) to a stored batch."""
    offsets = pa.array(np.arange(base_offset, base_offset + batch.num_rows, dtype=np.int64))
    return pa.RecordBatch.from_arrays([offsets, *batch.columns],
                                      schema=pa.schema([pa.field(OFFSET, pa.int64(), nullable=False), *batch.schema]))


def schema_to_bytes(schema: pa.Schema | None) -> bytes | None:
    return None if schema is None else schema.serialize().to_pybytes()


def schema_from_bytes(data: bytes | None) -> pa.Schema | None:
    return None if data is None else pa.ipc.read_schema(pa.py_buffer(data))

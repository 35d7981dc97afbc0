"""Record generators shared by the benchmarks, jobs and tests: vectorised, deterministic, no per-record Python.

- `kv_batch(start, rows)`: the standard benchmark record, a 16-byte key ``k%015d`` and a 100-byte value
  ``%012d`` + padding (Kafka's perf-test shape), as a ``key``/``value`` Arrow batch.
- `kv_lists(start, n)`: the same records as two lists of bytes, for per-record ``send()`` loops.
- `stamped_value(ts_ns, seq)` / `decode_stamps(values)`: values carrying a send timestamp (ns) and a
  sequence number (e.g. a transaction number) in their first 16 bytes, for end-to-end latency.
- `feature_schema()` / `feature_batch(start, rows)`: rows of N float32 features plus an int32 label,
  for topics with a declared Arrow schema.
- `payments(n, accounts, seed)`, `account_keys`, `payment_values`: the payments of `jobs/main_job.py`
  (account key ``acct-%05d``, value ``<id>|<amount cents>|<padding>``).

Sizes are exact: every key has `key_bytes` bytes and every value `value_bytes` (when they are large
enough to hold the digits), so MB/s figures can be computed from record counts.
"""
from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa

__all__ = ["KEY_BYTES", "VALUE_BYTES", "STAMP_BYTES", "fixed_width_binary", "digits", "kv_keys", "kv_values",
           "kv_batch", "kv_lists", "record_bytes", "stamped_value", "decode_stamps", "feature_schema",
           "feature_batch", "payments", "account_keys", "payment_values"]

KEY_BYTES = 16
VALUE_BYTES = 100
STAMP_BYTES = 16           # 8-byte big-endian send time (ns) + 8-byte big-endian sequence
_STAMP = struct.Struct(">qq")


def fixed_width_binary(matrix: np.ndarray) -> pa.Array:
    """A `pa.binary()` array whose i-th value is row i of a 2-D uint8 matrix (zero-copy of its bytes)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.uint8)
    n, width = matrix.shape
    if n * width >= 2 ** 31:
        return pa.array([bytes(r) for r in matrix], pa.large_binary()).cast(pa.binary())
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(matrix.tobytes())])


def digits(ids: np.ndarray, width: int) -> np.ndarray:
    """ASCII decimal digits of `ids`, zero-padded to `width` (the low digits if longer): (n, width) uint8."""
    ids = np.asarray(ids, dtype=np.int64)
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64) if width <= 18 else None
    if powers is None:
        raise ValueError("width must be at most 18 digits")
    return ((ids[:, None] // powers[None, :]) % 10 + ord("0")).astype(np.uint8)


def _padded(prefix: bytes, ids: np.ndarray, ndigits: int, width: int, fill: bytes) -> np.ndarray:
    n = len(ids)
    out = np.empty((n, width), dtype=np.uint8)
    p = len(prefix)
    if p:
        out[:, :p] = np.frombuffer(prefix, dtype=np.uint8)
    nd = max(0, min(ndigits, width - p))
    if nd:
        out[:, p:p + nd] = digits(ids, nd)
    if width > p + nd:
        out[:, p + nd:] = fill[0]
    return out


def kv_keys(start: int, rows: int, key_bytes: int = KEY_BYTES, prefix: bytes = b"k") -> pa.Array:
    """Keys ``prefix`` + zero-padded id, `key_bytes` bytes each (ids start .. start+rows-1)."""
    ids = np.arange(start, start + rows, dtype=np.int64)
    return fixed_width_binary(_padded(prefix, ids, min(18, key_bytes - len(prefix)), key_bytes, b"0"))


def kv_values(start: int, rows: int, value_bytes: int = VALUE_BYTES, fill: bytes = b"v") -> pa.Array:
    """Values: the id in 12 digits, then `fill` up to `value_bytes` bytes."""
    ids = np.arange(start, start + rows, dtype=np.int64)
    return fixed_width_binary(_padded(b"", ids, min(12, value_bytes), value_bytes, fill))


def kv_batch(start: int, rows: int, key_bytes: int = KEY_BYTES, value_bytes: int = VALUE_BYTES,
             prefix: bytes = b"k", fill: bytes = b"v") -> pa.RecordBatch:
    """`rows` records (ids start..start+rows-1) as a RecordBatch with binary `key` and `value` columns."""
    return pa.RecordBatch.from_arrays([kv_keys(start, rows, key_bytes, prefix),
                                       kv_values(start, rows, value_bytes, fill)], ["key", "value"])


def kv_lists(start: int, rows: int, key_bytes: int = KEY_BYTES, value_bytes: int = VALUE_BYTES,
             prefix: bytes = b"s", fill: bytes = b"s") -> tuple[list[bytes], list[bytes]]:
    """The records of `kv_batch` as (keys, values) lists of bytes, for `send()` loops."""
    b = kv_batch(start, rows, key_bytes, value_bytes, prefix, fill)
    return b.column(0).to_pylist(), b.column(1).to_pylist()


def record_bytes(key_bytes: int = KEY_BYTES, value_bytes: int = VALUE_BYTES) -> int:
    """Payload bytes of one record (key + value), the unit of the MB/s figures."""
    return key_bytes + value_bytes


def stamped_value(ts_ns: int, seq: int = 0, value_bytes: int = VALUE_BYTES, _pads: dict = {}) -> bytes:  # noqa: B006
    """A value whose first 16 bytes are (send time in ns, seq), padded to `value_bytes`."""
    pad = _pads.get(value_bytes)
    if pad is None:
        pad = _pads[value_bytes] = b"x" * max(0, value_bytes - STAMP_BYTES)
    return _STAMP.pack(ts_ns, seq) + pad


def decode_stamps(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(send times ns, seqs) of an array of `stamped_value`s, vectorised (int64 arrays)."""
    n = len(values)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.type != pa.binary():
        values = values.cast(pa.binary())
    bufs = values.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[values.offset:values.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    idx = offsets[:-1, None].astype(np.int64) + np.arange(STAMP_BYTES, dtype=np.int64)[None, :]
    stamps = np.ascontiguousarray(data[idx]).view(">i8").astype(np.int64)
    return stamps[:, 0].copy(), stamps[:, 1].copy()


def feature_schema(features: int = 16) -> pa.Schema:
    """`f0` .. `f{features-1}` float32 and `label` int32 (all non-nullable)."""
    return pa.schema([pa.field(f"f{i}", pa.float32(), nullable=False) for i in range(features)]
                     + [pa.field("label", pa.int32(), nullable=False)])


def feature_batch(start: int, rows: int, features: int = 16, seed: int = 0) -> pa.RecordBatch:
    """`rows` rows of `feature_schema(features)`: uniform [0, 1) features, label = row id % 10."""
    rng = np.random.default_rng(seed + start)
    x = rng.random((features, rows), dtype=np.float32)
    label = (np.arange(start, start + rows, dtype=np.int64) % 10).astype(np.int32)
    return pa.RecordBatch.from_arrays([pa.array(x[i]) for i in range(features)] + [pa.array(label)],
                                      schema=feature_schema(features))


def payments(n: int, accounts: int, seed: int = 0, low: int = -5_000, high: int = 10_000
             ) -> tuple[np.ndarray, np.ndarray]:
    """(account index, amount in cents) of `n` payments, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, accounts, size=n), rng.integers(low, high, size=n)


def account_keys(accounts: np.ndarray) -> pa.Array:
    """Keys ``acct-%05d`` of account indices (vectorised)."""
    return fixed_width_binary(_padded(b"acct-", np.asarray(accounts), 5, 10, b"0"))


def payment_values(ids: np.ndarray, amounts: np.ndarray, value_bytes: int) -> pa.Array:
    """``<payment id>|<amount cents>|`` padded with ``x`` to about `value_bytes` (never truncated)."""
    out = []
    for i, a in zip(np.asarray(ids).tolist(), np.asarray(amounts).tolist()):
        v = b"%d|%d|" % (i, a)
        out.append(v + b"x" * max(0, value_bytes - len(v)))
    return pa.array(out, pa.binary())

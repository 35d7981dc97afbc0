"""Kafka-compatible partitioning: murmur2 of the key (scalar and numpy-vectorised) and sticky.

`murmur2` is bit-for-bit Java `org.apache.kafka.common.utils.Utils.murmur2` (seed 0x9747b28c), and a
keyed record goes to `toPositive(murmur2(key)) % num_partitions`, so keys land on the same partition
as with a Java Kafka producer. `murmur2_many` hashes many keys at once: keys are grouped by length
and each group is hashed as one 2-D array (no per-key Python work).
"""
from __future__ import annotations

import random
import threading
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

SEED = 0x9747B28C
M = 0x5BD1E995
R = 24
_MASK32 = 0xFFFFFFFF


def _to_signed32(h: int) -> int:
    h &= _MASK32
    return h - (1 << 32) if h & 0x80000000 else h


def murmur2(data: bytes) -> int:
    """Java Kafka `Utils.murmur2`: a signed 32-bit int."""
    length = len(data)
    h = (SEED ^ length) & _MASK32
    n4 = length // 4
    for i in range(n4):
        i4 = i * 4
        k = data[i4] | (data[i4 + 1] << 8) | (data[i4 + 2] << 16) | (data[i4 + 3] << 24)
        k = (k * M) & _MASK32
        k ^= k >> R
        k = (k * M) & _MASK32
        h = (h * M) & _MASK32
        h ^= k
    rem = length & 3
    base = length & ~3
    if rem == 3:
        h ^= data[base + 2] << 16
    if rem >= 2:
        h ^= data[base + 1] << 8
    if rem >= 1:
        h ^= data[base]
        h = (h * M) & _MASK32
    h ^= h >> 13
    h = (h * M) & _MASK32
    h ^= h >> 15
    return _to_signed32(h)


def to_positive(h: int) -> int:
    return h & 0x7FFFFFFF


def partition_for_key(key: bytes, num_partitions: int) -> int:
    return to_positive(murmur2(key)) % num_partitions


# ---------------------------------------------------------------------------------------- vectorised

def _hash_equal_length(mat: np.ndarray) -> np.ndarray:
    """murmur2 of each row of a 2-D uint8 array (all keys of one length); returns uint32."""
    n, length = mat.shape
    m = np.uint32(M)
    h = np.full(n, (SEED ^ length) & _MASK32, dtype=np.uint32)
    n4 = length // 4
    if n4:
        blocks = np.ascontiguousarray(mat[:, : n4 * 4]).view("<u4").astype(np.uint32, copy=False)
        for i in range(n4):  # loop over the key length, not over keys
            k = blocks[:, i] * m
            k ^= k >> np.uint32(R)
            k *= m
            h *= m
            h ^= k
    rem = length & 3
    base = length & ~3
    if rem == 3:
        h ^= mat[:, base + 2].astype(np.uint32) << np.uint32(16)
    if rem >= 2:
        h ^= mat[:, base + 1].astype(np.uint32) << np.uint32(8)
    if rem >= 1:
        h ^= mat[:, base].astype(np.uint32)
        h *= m
    h ^= h >> np.uint32(13)
    h *= m
    h ^= h >> np.uint32(15)
    return h


def _binary_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data uint8, starts int64, lengths int64, valid bool) of a binary-like Arrow array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_large_binary(t) \
            or pa.types.is_binary_view(t) or pa.types.is_string_view(t):
        arr = arr.cast(pa.large_binary())
    elif not pa.types.is_binary(arr.type):
        raise TypeError(f"cannot hash keys of type {arr.type}: use binary or string keys")
    n = len(arr)
    bufs = arr.buffers()
    off_dtype = np.int32 if pa.types.is_binary(arr.type) else np.int64
    offsets = np.frombuffer(bufs[1], dtype=off_dtype, count=arr.offset + n + 1)[arr.offset:].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool) if arr.null_count \
        else np.ones(n, dtype=bool)
    return data, offsets[:-1], np.diff(offsets), valid


def murmur2_many(keys: pa.Array | pa.ChunkedArray | Sequence[bytes | str | None]) -> tuple[np.ndarray, np.ndarray]:
    """murmur2 of many keys: (hashes int32, valid bool). Null keys get hash 0 and valid False.

    `keys` is an Arrow binary/string array or a sequence of bytes/str/None. Keys are grouped by
    length; each group is hashed as one 2-D array.
    """
    if not isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = pa.array([k.encode("utf-8") if isinstance(k, str) else k for k in keys], type=pa.binary())
    data, starts, lengths, valid = _binary_buffers(keys)
    n = len(starts)
    out = np.zeros(n, dtype=np.uint32)
    if n == 0:
        return out.view(np.int32), valid
    idx_valid = np.flatnonzero(valid) if not valid.all() else None
    lens_v = lengths if idx_valid is None else lengths[idx_valid]
    if len(lens_v) == 0:
        return out.view(np.int32), valid
    lo, hi = int(lens_v.min()), int(lens_v.max())
    if lo == hi:  # common case: every key the same length
        rows = np.arange(n) if idx_valid is None else idx_valid
        groups = [(lo, rows)]
    else:
        rows_all = np.arange(n) if idx_valid is None else idx_valid
        order = np.argsort(lens_v, kind="stable")
        sorted_lens = lens_v[order]
        cuts = np.flatnonzero(np.diff(sorted_lens)) + 1
        groups = [(int(sorted_lens[g[0]]), rows_all[order[g[0]:g[-1] + 1]])
                  for g in np.split(np.arange(len(order)), cuts)]
    for length, rows in groups:
        if length == 0:
            mat = np.zeros((len(rows), 0), dtype=np.uint8)
        elif len(rows) == n:
            # every key, all one length: they lie back to back in the data buffer, so the matrix is
            # a view of it (the gather below costs ~10x the hashing for 16-byte keys)
            first = int(starts[0])
            mat = data[first:first + n * length].reshape(n, length)
        else:
            mat = data[starts[rows][:, None] + np.arange(length, dtype=np.int64)[None, :]]
        out[rows] = _hash_equal_length(mat)
    return out.view(np.int32), valid


def partitions_for_keys(keys, num_partitions: int) -> np.ndarray:
    """Partition of each key (int64); -1 where the key is null."""
    h, valid = murmur2_many(keys)
    parts = (h.view(np.uint32) & np.uint32(0x7FFFFFFF)).astype(np.int64) % num_partitions
    parts[~valid] = -1
    return parts


# --------------------------------------------------------------------------------------------- sticky

class StickyPartitioner:
    """Kafka's sticky partitioner for records with neither key nor partition.

    All such records of a topic go to one partition until a batch for that partition is sent
    (`on_batch_sent`); then another partition is chosen at random (different from the previous one,
    preferring partitions whose leader is available).
    """

    def __init__(self, rng: random.Random | None = None):
        self._lock = threading.Lock()
        self._current: dict[str, int] = {}
        self._rng = rng or random.Random()

    def partition(self, topic: str, num_partitions: int, available: Iterable[int] | None = None) -> int:
        with self._lock:
            p = self._current.get(topic)
            if p is None or p >= num_partitions:
                p = self._choose(num_partitions, None, available)
                self._current[topic] = p
            return p

    def on_batch_sent(self, topic: str, partition: int, num_partitions: int,
                      available: Iterable[int] | None = None) -> None:
        """A batch of `partition` was sent: if it is the sticky one, switch to another."""
        with self._lock:
            if self._current.get(topic) == partition:
                self._current[topic] = self._choose(num_partitions, partition, available)

    def _choose(self, num_partitions: int, previous: int | None, available) -> int:
        candidates = list(available) if available is not None else []
        candidates = [p for p in candidates if 0 <= p < num_partitions]
        if not candidates:
            candidates = list(range(num_partitions))
        if previous is not None and len(candidates) > 1:
            candidates = [p for p in candidates if p != previous] or candidates
        return self._rng.choice(candidates)

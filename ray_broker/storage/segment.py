"""LogSegment: one data file of concatenated frames plus a dense offset index.

Files, named after the segment's base offset:
    {base:020d}.arrow   frames (see frame.py), appended with one write per frame
    {base:020d}.index   one 32-byte entry per frame: relative offset, file position, the frame's
                        max record timestamp and the wall time it was appended (ms), all int64 LE.
                        The first entry's append time is the segment's creation time (roll by age).

Reads memory-map the data file (re-mapped when it has grown) and hand out zero-copy slices.
A file that has ever been mapped is truncated by copying the kept prefix to a new inode and
renaming it over (never `ftruncate`), so a batch still referencing the old mapping cannot SIGBUS.
Not thread-safe.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pyarrow as pa

from ..errors import CorruptRecordError
from .frame import (BatchHeader, FrameError, StreamedFrame, check_frame, find_valid_frame_after, iter_frames,
                    parse_header)
from .files import fsync_dir, remove_if_exists

DATA_SUFFIX = ".arrow"
INDEX_SUFFIX = ".index"
_ENTRY = struct.Struct("<qqqq")
ENTRY_SIZE = _ENTRY.size


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}"


class OffsetIndex:
    """In-memory dense index: parallel int64 numpy arrays with amortized O(1) append."""

    def __init__(self, entries: np.ndarray | None = None):
        entries = np.empty((0, 4), dtype=np.int64) if entries is None else entries
        self.n = len(entries)
        cap = max(64, self.n * 2)
        self._cols = [np.empty(cap, dtype=np.int64) for _ in range(4)]
        for c in range(4):
            self._cols[c][:self.n] = entries[:, c]

    @classmethod
    def from_bytes(cls, data: bytes) -> "OffsetIndex":
        usable = len(data) - len(data) % ENTRY_SIZE
        return cls(np.frombuffer(data, dtype="<i8", count=usable // 8).reshape(-1, 4))

    def to_bytes(self) -> bytes:
        return np.stack([c[:self.n] for c in self._cols], axis=1).astype("<i8").tobytes()

    def add(self, rel: int, pos: int, max_ts: int, append_ms: int) -> None:
        if self.n == len(self._cols[0]):
            self._cols = [np.concatenate([c, np.empty_like(c)]) for c in self._cols]
        for c, v in zip(self._cols, (rel, pos, max_ts, append_ms)):
            c[self.n] = v
        self.n += 1

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    @property
    def rel(self) -> np.ndarray:
        return self._cols[0][:self.n]

    @property
    def pos(self) -> np.ndarray:
        return self._cols[1][:self.n]

    @property
    def max_ts(self) -> np.ndarray:
        return self._cols[2][:self.n]

    @property
    def append_ms(self) -> np.ndarray:
        return self._cols[3][:self.n]

    def floor(self, rel: int) -> int:
        """Index of the last entry with relative offset <= rel (-1 if none)."""
        return int(np.searchsorted(self.rel, rel, side="right")) - 1

    def well_formed(self, base_pos: int = 0) -> bool:
        if self.n == 0:
            return True
        rel, pos = self.rel, self.pos
        return bool(rel[0] == 0 and pos[0] == base_pos and np.all(np.diff(rel) > 0) and np.all(np.diff(pos) > 0))


class LogSegment:
    def __init__(self, directory: str, base_offset: int):
        self.directory = directory
        self.base_offset = base_offset
        self.data_path = os.path.join(directory, segment_name(base_offset) + DATA_SUFFIX)
        self.index_path = os.path.join(directory, segment_name(base_offset) + INDEX_SUFFIX)
        self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._index_fd = os.open(self.index_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self._data_fd).st_size
        self.index = OffsetIndex()
        self.next_offset = base_offset
        self._map: pa.MemoryMappedFile | None = None
        self._buf: pa.Buffer | None = None
        self._ever_mapped = False
        self._dirty = False

    # ---- state -------------------------------------------------------------------------------
    @property
    def empty(self) -> bool:
        return self.index.n == 0

    @property
    def num_frames(self) -> int:
        return self.index.n

    def created_ms(self) -> int | None:
        return int(self.index.append_ms[0]) if self.index.n else None

    def last_modified_ms(self) -> int | None:
        return int(self.index.append_ms[-1]) if self.index.n else None

    def largest_timestamp(self) -> int | None:
        """Largest record timestamp (ms); falls back to the last append time if there is none."""
        if not self.index.n:
            return None
        ts = int(self.index.max_ts.max())
        return ts if ts >= 0 else self.last_modified_ms()

    # ---- write -------------------------------------------------------------------------------
    def append(self, frame, header: BatchHeader, append_ms: int) -> None:
        """Append one whole frame (header + payload bytes, or a StreamedFrame) at the segment's end."""
        if header.base_offset != self.next_offset:
            raise AssertionError(f"segment {self.data_path}: append at {header.base_offset}, "
                                 f"expected {self.next_offset}")
        if isinstance(frame, StreamedFrame):
            try:
                frame.write_to(lambda data: _write_all(self._data_fd, data))
            except BaseException:
                os.ftruncate(self._data_fd, self.size)   # no partial frame before the next append
                raise
        else:
            _write_all(self._data_fd, frame)
        self.index.add(header.base_offset - self.base_offset, self.size, header.max_timestamp, append_ms)
        _write_all(self._index_fd, _ENTRY.pack(header.base_offset - self.base_offset, self.size,
                                               header.max_timestamp, append_ms))
        self.size += header.frame_length
        self.next_offset = header.next_offset
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            os.fsync(self._data_fd)
            os.fsync(self._index_fd)
            self._dirty = False

    def truncate_frames(self, keep: int) -> None:
        """Keep only the first `keep` frames; durable before returning."""
        if keep >= self.index.n:
            return
        new_size = int(self.index.pos[keep])
        self.next_offset = self.base_offset + int(self.index.rel[keep])
        self.index.truncate(keep)
        self._truncate_data(new_size)
        self._rewrite_index()
        self.flush_all()

    def flush_all(self) -> None:
        self._dirty = True
        self.flush()

    # ---- read --------------------------------------------------------------------------------
    def buffer(self) -> pa.Buffer:
        """Zero-copy view of the whole data file (re-mapped if the file has grown)."""
        if self.size == 0:
            return pa.py_buffer(b"")
        if self._buf is None or self._buf.size < self.size:
            self._map = pa.memory_map(self.data_path, "r")
            self._buf = self._map.read_buffer()
            self._ever_mapped = True
        return self._buf if self._buf.size == self.size else self._buf.slice(0, self.size)

    def header_at(self, i: int) -> BatchHeader:
        return parse_header(self.buffer(), int(self.index.pos[i]))

    def frame_end(self, i: int) -> int:
        """File position just past frame i."""
        return int(self.index.pos[i + 1]) if i + 1 < self.index.n else self.size

    def corrupt(self, position: int, offset: int, reason: str) -> CorruptRecordError:
        return CorruptRecordError(f"corrupt log segment {self.data_path}: frame at position {position} "
                                  f"(offset {offset}): {reason}")

    # ---- recovery ----------------------------------------------------------------------------
    def recover(self, verify_all: bool, is_last: bool) -> bool:
        """Load the index and check the segment; returns True if anything on disk was repaired.

        `verify_all`: CRC-verify every frame (unclean shutdown past the recovery point). Otherwise
        only the index shape and the tail (last indexed frame and anything after it) are checked.
        A bad tail of the last segment with nothing valid after it is truncated away; any other
        bad frame raises CorruptRecordError naming the file and position.
        """
        with open(self.index_path, "rb") as f:
            raw = f.read()
        old = OffsetIndex.from_bytes(raw)
        stale = len(raw) % ENTRY_SIZE != 0
        mtime_ms = int(os.stat(self.data_path).st_mtime * 1000)
        buf = self.buffer()
        start_entries = 0
        if not verify_all and old.n and old.well_formed() and int(old.pos[-1]) < self.size:
            last_pos = int(old.pos[-1])
            try:
                header = parse_header(buf, last_pos)
                check_frame(buf, last_pos, header, verify=True)
                if header.base_offset == self.base_offset + int(old.rel[-1]):
                    start_entries = old.n
            except FrameError:
                pass
        if start_entries:
            self.index = old
            last = self.header_at(old.n - 1)
            scan_from, expected = int(old.pos[-1]) + last.frame_length, last.next_offset
        else:
            self.index = OffsetIndex()
            scan_from, expected = 0, self.base_offset
        changed = stale
        truncated_at = None
        try:
            for position, header, _payload in iter_frames(buf, scan_from, verify=True):
                if header.base_offset != expected:
                    raise FrameError(position, f"offset {header.base_offset} where {expected} was expected")
                i = self.index.n
                keep_ms = (int(old.append_ms[i]) if i < old.n and int(old.pos[i]) == position else mtime_ms)
                self.index.add(header.base_offset - self.base_offset, position, header.max_timestamp, keep_ms)
                expected = header.next_offset
        except FrameError as exc:
            if not is_last or find_valid_frame_after(buf, exc.position, expected) is not None:
                raise self.corrupt(exc.position, expected, exc.reason) from None
            truncated_at = exc.position
        self.next_offset = expected
        if truncated_at is not None:
            # Nothing else references this mapping yet and nothing past the cut is touched again.
            del buf
            self._map = self._buf = None
            self._ever_mapped = False
            self._truncate_data(truncated_at)
            changed = True
        if self.index.n != old.n or not np.array_equal(self.index.pos, old.pos[:self.index.n]):
            changed = True
        if changed:
            self._rewrite_index()
            self.flush_all()
        return changed

    # ---- files -------------------------------------------------------------------------------
    def _truncate_data(self, new_size: int) -> None:
        if new_size == self.size:
            return
        if self._ever_mapped:
            # Copy the kept prefix to a fresh inode: existing mappings keep the old, intact file.
            swap = self.data_path + ".swap"
            dst = os.open(swap, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                copied = 0
                while copied < new_size:
                    n = os.copy_file_range(self._data_fd, dst, new_size - copied, copied, copied)
                    if n == 0:
                        break
                    copied += n
                os.fsync(dst)
            finally:
                os.close(dst)
            os.replace(swap, self.data_path)
            os.close(self._data_fd)
            self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_APPEND)
            fsync_dir(self.directory)
            self._map = self._buf = None
            self._ever_mapped = False
        else:
            os.ftruncate(self._data_fd, new_size)
        self.size = new_size

    def _rewrite_index(self) -> None:
        os.ftruncate(self._index_fd, 0)
        _write_all(self._index_fd, self.index.to_bytes())

    def close(self) -> None:
        for fd in (self._data_fd, self._index_fd):
            if fd >= 0:
                os.close(fd)
        self._data_fd = self._index_fd = -1
        self._map = self._buf = None

    def delete(self) -> None:
        self.close()
        remove_if_exists(self.data_path)
        remove_if_exists(self.index_path)

    def __repr__(self) -> str:
        return f"LogSegment(base={self.base_offset}, next={self.next_offset}, size={self.size}, frames={self.index.n})"


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    while view:
        view = view[os.write(fd, view):]

"""PartitionLog: the segments of one partition replica, with recovery, retention and truncation.

Directory layout:
    .format                   on-disk format version (refused if unknown)
    clean_shutdown            written by close(), removed on open
    recovery-point            offset below which everything is known fsynced (advanced by flush)
    log-start-offset          first readable offset (advanced by retention, survives restart)
    high-watermark            last checkpointed high watermark (clamped to [log_start, LEO] on open)
    leader-epoch-checkpoint   see epoch_cache.py
    {base:020d}.arrow/.index  segments, see segment.py

Not thread-safe: the owning replica actor serializes calls. Batches returned by `read` are
zero-copy views of memory-mapped segment files; they stay valid after truncation or retention
(files are replaced or unlinked, never shrunk in place while mapped).
"""
from __future__ import annotations

import bisect
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from ..config import TopicConfig
from ..errors import (CorruptRecordError, InvalidRequestError, KafkaStorageError, OffsetOutOfRangeError,
                      RecordTooLargeError)
from ..records import with_offsets
from .epoch_cache import LeaderEpochCache
from .files import atomic_write, fsync_dir, read_int, write_int
from .frame import (FORMAT_VERSION, STREAM_MIN_BYTES, BatchHeader, FrameError, StreamedFrame, check_frame,
                    decode_payload, encode_frame, iter_frames, parse_header, prepare_frame)
from .segment import DATA_SUFFIX, INDEX_SUFFIX, LogSegment

FORMAT_FILE = ".format"
CLEAN_SHUTDOWN_FILE = "clean_shutdown"
RECOVERY_POINT_FILE = "recovery-point"
LOG_START_OFFSET_FILE = "log-start-offset"
HIGH_WATERMARK_FILE = "high-watermark"


class LogFormatError(KafkaStorageError):
    """The directory holds a log in an on-disk format this code does not understand."""


@dataclass(frozen=True, slots=True)
class AppendInfo:
    base_offset: int
    last_offset: int
    header: BatchHeader
    frame: pa.Buffer | bytes | StreamedFrame  # what was appended (a large batch: streamed, not built)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class PartitionLog:
    def __init__(self, directory: str, config: TopicConfig, now_ms: Callable[[], int] | None = None):
        self._dir = os.path.abspath(os.fspath(directory))
        self.config = config
        self._now = now_ms or _wall_ms
        self._closed = False
        os.makedirs(self._dir, exist_ok=True)
        self._check_format()
        clean = os.path.exists(self._path(CLEAN_SHUTDOWN_FILE))
        if clean:
            os.remove(self._path(CLEAN_SHUTDOWN_FILE))
            fsync_dir(self._dir)
        self._recovery_point = read_int(self._path(RECOVERY_POINT_FILE), 0)
        self._log_start = read_int(self._path(LOG_START_OFFSET_FILE), 0)
        self._hw = read_int(self._path(HIGH_WATERMARK_FILE), 0)
        self._epochs = LeaderEpochCache(self._dir)
        self._segments: list[LogSegment] = []
        self._load_segments(clean)
        self._size = sum(s.size for s in self._segments)
        self._unflushed = 0
        self._last_flush_ms = self._now()
        self._dir_dirty = False

    # ---- properties --------------------------------------------------------------------------
    @property
    def directory(self) -> str:
        return self._dir

    @property
    def log_start_offset(self) -> int:
        return self._log_start

    @property
    def log_end_offset(self) -> int:
        return self._segments[-1].next_offset

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def recovery_point(self) -> int:
        return self._recovery_point

    @property
    def high_watermark_checkpoint(self) -> int:
        return self._hw

    @property
    def segments(self) -> list[LogSegment]:
        """The segments, oldest first (a copy of the list; for inspection and tests)."""
        return list(self._segments)

    # ---- open / recovery ---------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _check_format(self) -> None:
        path = self._path(FORMAT_FILE)
        try:
            with open(path, "rb") as f:
                text = f.read().strip()
        except FileNotFoundError:
            atomic_write(path, f"{FORMAT_VERSION}\n".encode())
            return
        try:
            version = int(text)
        except ValueError:
            raise LogFormatError(f"log directory {self._dir}: unreadable format file {path}: {text[:40]!r}") from None
        if version != FORMAT_VERSION:
            raise LogFormatError(f"log directory {self._dir} has on-disk format version {version}; this broker "
                                 f"reads only version {FORMAT_VERSION}")

    def _load_segments(self, clean: bool) -> None:
        names = os.listdir(self._dir)
        for name in names:
            if name.endswith((".tmp", ".swap")):
                os.remove(self._path(name))
        bases = sorted(int(n[:-len(DATA_SUFFIX)]) for n in names
                       if n.endswith(DATA_SUFFIX) and n[:-len(DATA_SUFFIX)].isdigit())
        for name in names:  # an index whose data file is gone
            if name.endswith(INDEX_SUFFIX) and name[:-len(INDEX_SUFFIX)].isdigit() \
                    and int(name[:-len(INDEX_SUFFIX)]) not in bases:
                os.remove(self._path(name))
        # segments wholly below the log start (retention interrupted between checkpoint and unlink)
        while len(bases) > 1 and bases[1] <= self._log_start:
            LogSegment(self._dir, bases.pop(0)).delete()
        for i, base in enumerate(bases):
            is_last = i == len(bases) - 1
            verify = not clean and (is_last or bases[i + 1] > self._recovery_point)
            seg = LogSegment(self._dir, base)
            self._segments.append(seg)
            seg.recover(verify_all=verify, is_last=is_last)
        for prev, nxt in zip(self._segments, self._segments[1:]):
            if prev.next_offset != nxt.base_offset:
                raise CorruptRecordError(f"log {self._dir}: segment {prev.data_path} ends at offset "
                                         f"{prev.next_offset} but the next segment starts at {nxt.base_offset}")
        if not self._segments:
            self._segments.append(LogSegment(self._dir, self._log_start))
            fsync_dir(self._dir)
        if self.log_end_offset < self._log_start:  # interrupted truncate_fully_and_start_at
            self.truncate_fully_and_start_at(self._log_start)
        self._log_start = max(self._log_start, self._segments[0].base_offset)
        leo = self.log_end_offset
        self._epochs.truncate_from_end(leo + 1)  # an epoch may start at the log end (new leader, no data yet)
        self._epochs.truncate_from_start(self._log_start)
        self._hw = min(max(self._hw, self._log_start), leo)
        if not clean:
            for seg in self._segments:
                if seg.next_offset > self._recovery_point:
                    seg.flush_all()
        if self._recovery_point != leo:
            self._recovery_point = leo
            write_int(self._path(RECOVERY_POINT_FILE), leo)

    # ---- append ------------------------------------------------------------------------------
    def append(self, batch: pa.RecordBatch, *, leader_epoch: int, producer_id: int = -1, producer_epoch: int = -1,
               base_sequence: int = -1, is_transactional: bool = False, is_control: bool = False) -> AppendInfo:
        """Append one batch as a leader: assign offsets from the log end and encode one frame."""
        self._check_open()
        if batch.num_rows == 0:
            raise InvalidRequestError(f"log {self._dir}: cannot append an empty batch")
        base = self.log_end_offset
        meta = dict(base_offset=base, leader_epoch=leader_epoch, producer_id=producer_id,
                    producer_epoch=producer_epoch, base_sequence=base_sequence, is_transactional=is_transactional,
                    is_control=is_control)
        if self.config.compression_type in (None, "none") and batch.nbytes >= STREAM_MIN_BYTES:
            frame = prepare_frame(batch, **meta)
            header = frame.header
        else:
            header, frame = encode_frame(batch, compression=self.config.compression_type, **meta)
        if header.frame_length > self.config.max_message_bytes:
            raise RecordTooLargeError(f"batch of {batch.num_rows} records encodes to {header.frame_length} bytes, "
                                      f"above max.message.bytes {self.config.max_message_bytes}")
        now = self._now()
        self._append_frame(frame, header, now)
        self._after_append(1, now)
        return AppendInfo(base, header.last_offset, header, frame)

    def append_frames(self, frames: bytes | pa.Buffer) -> list[BatchHeader]:
        """Append frames copied verbatim from the leader (follower path); all-or-nothing on bad input."""
        self._check_open()
        buf = frames if isinstance(frames, pa.Buffer) else pa.py_buffer(frames)
        parsed: list[tuple[BatchHeader, pa.Buffer]] = []
        try:
            for position, header, _payload in iter_frames(buf, verify=True):
                parsed.append((header, buf.slice(position, header.frame_length)))
        except FrameError as exc:
            raise CorruptRecordError(f"log {self._dir}: corrupt frames from leader: {exc}") from None
        if not parsed:
            return []
        expected = self.log_end_offset
        if parsed[0][0].base_offset != expected:
            raise InvalidRequestError(f"log {self._dir}: frames start at offset {parsed[0][0].base_offset} "
                                      f"but the log end offset is {expected}")
        for header, _ in parsed:
            if header.base_offset != expected:
                raise InvalidRequestError(f"log {self._dir}: frames are not contiguous: offset "
                                          f"{header.base_offset} where {expected} was expected")
            expected = header.next_offset
        now = self._now()
        for header, frame in parsed:
            self._append_frame(frame, header, now)
        self._after_append(len(parsed), now)
        return [h for h, _ in parsed]

    def _append_frame(self, frame, header: BatchHeader, now: int) -> None:
        active = self._segments[-1]
        if not active.empty and (active.size + header.frame_length > self.config.segment_bytes
                                 or now - active.created_ms() >= self.config.segment_ms):
            active = self.roll()
        active.append(frame, header, now)
        self._size += header.frame_length
        if header.leader_epoch > self._epochs.latest_epoch():
            self._epochs.assign(header.leader_epoch, header.base_offset)

    def _after_append(self, batches: int, now: int) -> None:
        self._unflushed += batches
        if self._unflushed >= self.config.flush_messages or now - self._last_flush_ms >= self.config.flush_ms:
            self.flush()

    # ---- read --------------------------------------------------------------------------------
    def read(self, offset: int, max_bytes: int, max_offset: int | None = None) -> list[pa.RecordBatch]:
        """User batches (offset column prepended) from `offset`, below `max_offset`, ~max_bytes.

        At least one batch is returned when any data lies in [offset, max_offset). Control
        frames are skipped. The first and last batches are sliced to the requested range.
        """
        return self.read_batches(offset, max_bytes, max_offset)[0]

    def read_batches(self, offset: int, max_bytes: int, max_offset: int | None = None,
                     skip: Callable[[BatchHeader], bool] | None = None) -> tuple[list[pa.RecordBatch], int]:
        """Like `read`, also skipping frames for which `skip(header)` is true (e.g. aborted
        transactions), and returning the offset after the last frame looked at: where a reader
        continues, past skipped and control frames."""
        self._check_open()
        self._check_range(offset)
        end = self.log_end_offset if max_offset is None else min(max_offset, self.log_end_offset)
        out: list[pa.RecordBatch] = []
        used = 0
        next_offset = offset
        if offset >= end:
            return out, next_offset
        for seg, position, header, payload in self._iter_from(offset):
            if header.base_offset >= end or (out and used + header.frame_length > max_bytes):
                break
            if header.next_offset > end:
                next_offset = max(next_offset, end)
            else:
                next_offset = max(next_offset, header.next_offset)
            if header.is_control or (skip is not None and skip(header)):
                continue
            used += header.frame_length
            self._verify(seg, position, header)
            try:
                batch = decode_payload(payload)
            except (pa.ArrowException, ValueError) as exc:
                raise CorruptRecordError(f"log {self._dir}: undecodable batch at offset {header.base_offset}: "
                                         f"{exc}") from None
            lo = max(offset - header.base_offset, 0)
            hi = min(end - header.base_offset, header.record_count)
            if lo > 0 or hi < header.record_count:
                batch = batch.slice(lo, hi - lo)
            out.append(with_offsets(batch, header.base_offset + lo))
        return out, next_offset

    def control_batches(self, from_offset: int | None = None) -> Iterator[tuple[BatchHeader, pa.RecordBatch]]:
        """(header, decoded batch) of every control frame from `from_offset` (transaction markers)."""
        start = self._log_start if from_offset is None else max(from_offset, self._log_start)
        for seg, position, header, payload in self._iter_from(start):
            if header.is_control and header.base_offset >= start:
                self._verify(seg, position, header)
                yield header, decode_payload(payload)

    def read_frames(self, offset: int, max_bytes: int) -> tuple[list[BatchHeader], pa.Buffer | bytes]:
        """Raw frames from the frame starting at `offset` (at least one, ~max_bytes), for followers."""
        self._check_open()
        self._check_range(offset)
        headers: list[BatchHeader] = []
        pieces: list[pa.Buffer] = []
        used = 0
        if offset == self.log_end_offset:
            return headers, b""
        si = self._segment_index(offset)
        i = self._segments[si].index.floor(offset - self._segments[si].base_offset)
        seg = self._segments[si]
        if i < 0 or seg.base_offset + int(seg.index.rel[i]) != offset:
            raise InvalidRequestError(f"log {self._dir}: offset {offset} is not the start of a batch")
        full = False
        for seg in self._segments[si:]:
            start = end = int(seg.index.pos[i]) if seg.index.n else 0
            for position, header, _payload in self._iter_segment(seg, i):
                if headers and used + header.frame_length > max_bytes:
                    full = True
                    break
                self._verify(seg, position, header)
                headers.append(header)
                used += header.frame_length
                end = position + header.frame_length
            if end > start:
                pieces.append(seg.buffer().slice(start, end - start))
            if full:
                break
            i = 0
        if len(pieces) == 1:
            return headers, pieces[0]
        return headers, pa.py_buffer(b"".join(pieces))

    def headers(self, from_offset: int | None = None) -> Iterator[BatchHeader]:
        """Headers of all frames from the one containing `from_offset` (default: log start); no payload decode."""
        start = self._log_start if from_offset is None else max(from_offset, self._log_start)
        if start >= self.log_end_offset:
            return
        si = self._segment_index(start)
        first = True
        for seg in self._segments[si:]:
            i = max(seg.index.floor(start - seg.base_offset), 0) if first else 0
            first = False
            buf = seg.buffer()
            for pos in seg.index.pos[i:].tolist():
                yield parse_header(buf, pos)

    def _iter_from(self, offset: int) -> Iterator[tuple[LogSegment, int, BatchHeader, pa.Buffer]]:
        if offset >= self.log_end_offset:
            return
        si = self._segment_index(offset)
        for k, seg in enumerate(self._segments[si:]):
            i = max(seg.index.floor(offset - seg.base_offset), 0) if k == 0 else 0
            for position, header, payload in self._iter_segment(seg, i):
                yield seg, position, header, payload

    def _iter_segment(self, seg: LogSegment, i: int) -> Iterator[tuple[int, BatchHeader, pa.Buffer]]:
        """Frames of `seg` from index entry i, bounds-checked only (callers `_verify` what they serve)."""
        if i >= seg.index.n:
            return
        try:
            yield from iter_frames(seg.buffer(), int(seg.index.pos[i]), verify=False)
        except FrameError as exc:
            raise self._corrupt(seg, exc) from None

    def _verify(self, seg: LogSegment, position: int, header: BatchHeader) -> None:
        try:
            check_frame(seg.buffer(), position, header, verify=True)
        except FrameError as exc:
            raise self._corrupt(seg, exc) from None

    @staticmethod
    def _corrupt(seg: LogSegment, exc: FrameError) -> CorruptRecordError:
        j = int(np.searchsorted(seg.index.pos, exc.position))
        offset = seg.base_offset + int(seg.index.rel[min(j, seg.index.n - 1)])
        return seg.corrupt(exc.position, offset, exc.reason)

    def _segment_index(self, offset: int) -> int:
        return max(bisect.bisect_right(self._segments, offset, key=lambda s: s.base_offset) - 1, 0)

    def _check_range(self, offset: int) -> None:
        if offset < self._log_start or offset > self.log_end_offset:
            raise OffsetOutOfRangeError(f"offset {offset} is outside [{self._log_start}, {self.log_end_offset}] "
                                        f"of log {self._dir}")

    def _check_open(self) -> None:
        if self._closed:
            raise KafkaStorageError(f"log {self._dir} is closed")

    # ---- leader epochs -----------------------------------------------------------------------
    def epoch_entries(self) -> list[tuple[int, int]]:
        return self._epochs.entries()

    def latest_epoch(self) -> int:
        return self._epochs.latest_epoch()

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        return self._epochs.end_offset_for(epoch, self.log_end_offset)

    def assign_epoch(self, epoch: int, start_offset: int) -> None:
        self._epochs.assign(epoch, start_offset)

    # ---- roll / retention / truncation -------------------------------------------------------
    def roll(self) -> LogSegment:
        """Start a new active segment at the log end (no-op if the active segment is empty)."""
        self._check_open()
        if self._segments[-1].empty:
            return self._segments[-1]
        seg = LogSegment(self._dir, self.log_end_offset)
        self._segments.append(seg)
        self._dir_dirty = True
        return seg

    def maybe_roll(self, now_ms: int | None = None) -> bool:
        now = self._now() if now_ms is None else now_ms
        active = self._segments[-1]
        if not active.empty and (active.size >= self.config.segment_bytes
                                 or now - active.created_ms() >= self.config.segment_ms):
            self.roll()
            return True
        return False

    def apply_retention(self, now_ms: int | None = None, max_offset: int | None = None) -> int:
        """Delete whole old segments by retention.ms / retention.bytes; never the active one.

        `max_offset` (optional, e.g. the high watermark) keeps any segment holding offsets >= it.
        Returns the number of segments deleted.
        """
        self._check_open()
        now = self._now() if now_ms is None else now_ms
        cfg = self.config
        total = self._size
        k = 0
        while k < len(self._segments) - 1:
            seg, nxt = self._segments[k], self._segments[k + 1]
            if max_offset is not None and nxt.base_offset > max_offset:
                break
            largest = seg.largest_timestamp()
            by_time = cfg.retention_ms >= 0 and largest is not None and largest < now - cfg.retention_ms
            by_size = cfg.retention_bytes >= 0 and total - seg.size >= cfg.retention_bytes
            if not (by_time or by_size):
                break
            total -= seg.size
            k += 1
        if k == 0:
            return 0
        new_start = max(self._log_start, self._segments[k].base_offset)
        write_int(self._path(LOG_START_OFFSET_FILE), new_start)  # before unlinking: see _load_segments
        self._log_start = new_start
        for seg in self._segments[:k]:
            seg.delete()
        del self._segments[:k]
        fsync_dir(self._dir)
        self._size = total
        self._epochs.truncate_from_start(new_start)
        if self._hw < new_start:
            self.checkpoint_high_watermark(new_start)
        return k

    def delete_records_before(self, offset: int) -> int:
        """Advance the log start to `offset` (Kafka's DeleteRecords): reads below it are out of range
        and whole segments below it are deleted. Returns the number of segments deleted."""
        self._check_open()
        offset = min(offset, self.log_end_offset)
        if offset <= self._log_start:
            return 0
        k = 0
        while k < len(self._segments) - 1 and self._segments[k + 1].base_offset <= offset:
            k += 1
        write_int(self._path(LOG_START_OFFSET_FILE), offset)
        self._log_start = offset
        for seg in self._segments[:k]:
            self._size -= seg.size
            seg.delete()
        del self._segments[:k]
        fsync_dir(self._dir)
        self._epochs.truncate_from_start(offset)
        if self._hw < offset:
            self.checkpoint_high_watermark(offset)
        return k

    def truncate_to(self, offset: int) -> None:
        """Remove every frame with base_offset >= `offset`; durable on return.

        If `offset` falls inside a frame, that whole frame is removed too (the log end becomes
        the frame's base offset: rounded down to a frame boundary). `offset` >= the log end is a
        no-op; `offset` < the log start empties the log and restarts it at `offset`.
        """
        self._check_open()
        if offset >= self.log_end_offset:
            return
        if offset < self._log_start:
            self.truncate_fully_and_start_at(offset)
            return
        si = self._segment_index(offset)
        for seg in self._segments[si + 1:]:
            seg.delete()
        del self._segments[si + 1:]
        seg = self._segments[si]
        seg.truncate_frames(max(seg.index.floor(offset - seg.base_offset), 0))
        if seg.empty and len(self._segments) > 1:
            seg.delete()
            self._segments.pop()
        fsync_dir(self._dir)
        self._size = sum(s.size for s in self._segments)
        leo = self.log_end_offset
        self._epochs.truncate_from_end(leo)
        if self._recovery_point > leo:
            self._recovery_point = leo
            write_int(self._path(RECOVERY_POINT_FILE), leo)
        if self._hw > leo:
            self.checkpoint_high_watermark(leo)

    def truncate_fully_and_start_at(self, offset: int) -> None:
        """Delete all data; the log becomes empty with log start = log end = `offset`."""
        self._check_open()
        write_int(self._path(LOG_START_OFFSET_FILE), offset)
        for seg in self._segments:
            seg.delete()
        self._segments = [LogSegment(self._dir, offset)]
        fsync_dir(self._dir)
        self._log_start = offset
        self._size = 0
        self._epochs.clear()
        self._recovery_point = offset
        write_int(self._path(RECOVERY_POINT_FILE), offset)
        self._hw = offset
        write_int(self._path(HIGH_WATERMARK_FILE), offset)

    # ---- durability --------------------------------------------------------------------------
    def flush(self) -> None:
        """fsync every dirty segment and advance the recovery point to the log end."""
        self._check_open()
        for seg in reversed(self._segments):
            seg.flush()
            if seg.base_offset <= self._recovery_point:
                break
        if self._dir_dirty:
            fsync_dir(self._dir)
            self._dir_dirty = False
        self._unflushed = 0
        self._last_flush_ms = self._now()
        if self._recovery_point != self.log_end_offset:
            self._recovery_point = self.log_end_offset
            write_int(self._path(RECOVERY_POINT_FILE), self._recovery_point)

    def maybe_flush(self, now_ms: int | None = None) -> bool:
        now = self._now() if now_ms is None else now_ms
        if self._unflushed and (self._unflushed >= self.config.flush_messages
                                or now - self._last_flush_ms >= self.config.flush_ms):
            self.flush()
            return True
        return False

    def checkpoint_high_watermark(self, hw: int) -> None:
        if hw != self._hw or not os.path.exists(self._path(HIGH_WATERMARK_FILE)):
            self._hw = hw
            write_int(self._path(HIGH_WATERMARK_FILE), hw)

    def close(self) -> None:
        """Flush, close files and mark a clean shutdown (the next open skips full verification)."""
        if self._closed:
            return
        self.flush()
        for seg in self._segments:
            seg.close()
        atomic_write(self._path(CLEAN_SHUTDOWN_FILE), b"")
        self._closed = True

    def delete(self) -> None:
        """Close and remove the whole log directory."""
        if not self._closed:
            for seg in self._segments:
                seg.close()
            self._closed = True
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "PartitionLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"PartitionLog({self._dir!r}, start={self._log_start}, end={self.log_end_offset}, "
                f"segments={len(self._segments)}, bytes={self._size})")


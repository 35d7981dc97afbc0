"""On-disk frame: a fixed 64-byte header followed by an Arrow IPC stream holding one RecordBatch.

Header layout (little-endian, 64 bytes so every frame, and so every Arrow buffer, stays 8-byte
aligned in the file and in a memory map):

    magic            4s   b"RBF1"
    crc              u32  CRC32C of header[8:64] + payload
    --- covered by the CRC from here ---
    version          u16  FORMAT_VERSION
    flags            u16  bit 0 transactional, bit 1 control
    payload_length   u32
    base_offset      i64
    record_count     i32
    first_timestamp  i64  ms (min of the `timestamp` column, -1 if none)
    max_timestamp    i64  ms (max of the `timestamp` column, -1 if none)
    producer_id      i64  -1 = none
    producer_epoch   i16  -1 = none
    base_sequence    i32  -1 = none
    leader_epoch     i32  partition leader epoch that wrote the batch
    reserved         u16  0

The payload is self-describing (schema + batch + end-of-stream marker), so batches written under
older topic schemas still decode.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Iterator

import crc32c as _crc32c
import pyarrow as pa
import pyarrow.compute as pc

FORMAT_VERSION = 1
MAGIC = b"RBF1"

_PREFIX = struct.Struct("<4sI")
_BODY = struct.Struct("<HHIqiqqqhiiH")
HEADER_SIZE = _PREFIX.size + _BODY.size
assert HEADER_SIZE == 64, HEADER_SIZE

FLAG_TRANSACTIONAL = 0x1
FLAG_CONTROL = 0x2

_COMPRESSION = {"none": None, None: None, "lz4": "lz4", "zstd": "zstd"}


class FrameError(Exception):
    """A frame at `position` is truncated (`truncated=True`) or corrupt (bad magic/CRC/length)."""

    def __init__(self, position: int, reason: str, truncated: bool = False):
        self.position = position
        self.reason = reason
        self.truncated = truncated
        super().__init__(f"bad frame at position {position}: {reason}")


@dataclass(frozen=True, slots=True)
class BatchHeader:
    version: int
    base_offset: int
    record_count: int
    first_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    leader_epoch: int
    is_transactional: bool
    is_control: bool
    payload_length: int
    crc: int

    @property
    def frame_length(self) -> int:
        return HEADER_SIZE + self.payload_length

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.record_count - 1

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.record_count

    @property
    def flags(self) -> int:
        return (FLAG_TRANSACTIONAL if self.is_transactional else 0) | (FLAG_CONTROL if self.is_control else 0)


def _as_buffer(data) -> pa.Buffer:
    return data if isinstance(data, pa.Buffer) else pa.py_buffer(data)


def _timestamps(batch: pa.RecordBatch) -> tuple[int, int]:
    idx = batch.schema.get_field_index("timestamp")
    if idx < 0 or batch.num_rows == 0:
        return -1, -1
    col = batch.column(idx)
    if pa.types.is_timestamp(col.type) and col.type.unit == "ms":
        col = col.view(pa.int64())  # zero-copy reinterpretation
    elif not pa.types.is_integer(col.type):
        col = col.cast(pa.timestamp("ms")).view(pa.int64())
    mm = pc.min_max(col)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    return (-1 if lo is None else int(lo)), (-1 if hi is None else int(hi))


def _ipc_size(batch: pa.RecordBatch, options=None) -> int:
    """Bytes of `batch` as an IPC stream (a mock write: nothing is copied)."""
    mock = pa.MockOutputStream()
    with pa.ipc.new_stream(mock, batch.schema, options=options) as writer:
        writer.write_batch(batch)
    return mock.size()


def _new_header(batch: pa.RecordBatch, payload_length: int, base_offset: int, leader_epoch: int, producer_id: int,
                producer_epoch: int, base_sequence: int, is_transactional: bool, is_control: bool) -> BatchHeader:
    """The header of `batch`'s frame, CRC still 0 (it covers the packed body and the payload)."""
    first_ts, max_ts = _timestamps(batch)
    return BatchHeader(FORMAT_VERSION, base_offset, batch.num_rows, first_ts, max_ts, producer_id, producer_epoch,
                       base_sequence, leader_epoch, is_transactional, is_control, payload_length, 0)


def _body_fields(h: BatchHeader) -> tuple:
    """The CRC-covered header fields, in `_BODY` order."""
    return (h.version, h.flags, h.payload_length, h.base_offset, h.record_count, h.first_timestamp, h.max_timestamp,
            h.producer_id, h.producer_epoch, h.base_sequence, h.leader_epoch, 0)


def encode_frame(batch: pa.RecordBatch, *, base_offset: int, leader_epoch: int, producer_id: int = -1,
                 producer_epoch: int = -1, base_sequence: int = -1, is_transactional: bool = False,
                 is_control: bool = False, compression: str | None = "none") -> tuple[BatchHeader, pa.Buffer]:
    """Serialize `batch` into one frame; returns its header and the whole frame (header + payload).

    The IPC stream is written right after a placeholder header into one buffer, then the header
    is packed in place: no copy of the payload beyond Arrow's own serialization.
    """
    if compression not in _COMPRESSION:
        raise ValueError(f"unknown compression {compression!r}")
    codec = _COMPRESSION[compression]
    options = pa.ipc.IpcWriteOptions(compression=codec)
    if codec is None:
        # Size the stream first (a mock write copies nothing), then serialize once into an exactly
        # sized buffer: ~3x faster than a growing BufferOutputStream for MB-sized batches.
        frame = pa.allocate_buffer(HEADER_SIZE + _ipc_size(batch, options))
        sink = pa.FixedSizeBufferWriter(frame)
    else:
        sink = pa.BufferOutputStream()
    sink.write(b"\0" * HEADER_SIZE)
    with pa.ipc.new_stream(sink, batch.schema, options=options) as writer:
        writer.write_batch(batch)
    if codec is not None:
        frame = sink.getvalue()
    header = _new_header(batch, frame.size - HEADER_SIZE, base_offset, leader_epoch, producer_id, producer_epoch,
                         base_sequence, is_transactional, is_control)
    _BODY.pack_into(frame, _PREFIX.size, *_body_fields(header))
    crc = _crc32c.crc32c(frame.slice(_PREFIX.size))
    _PREFIX.pack_into(frame, 0, MAGIC, crc)
    header = replace(header, crc=crc)
    return header, frame


# From this size on an uncompressed frame is streamed to the file rather than built in memory
STREAM_MIN_BYTES = 256 << 10
_SMALL_WRITE = 4096


class _IpcSink:
    """A file object for Arrow's IPC writer: keeps the CRC32C and size of what goes through and,
    given `write`, hands it on (Arrow passes body buffers zero-copy; its small metadata pieces
    are gathered so a frame costs a few writes, not a dozen)."""

    closed = False

    def __init__(self, write=None, crc: int = 0, head: bytes = b""):
        self._write = write
        self.crc = crc
        self.size = 0
        self._small = bytearray(head)

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if self._write is None:
            self.crc = _crc32c.crc32c(data, self.crc)
        elif n < _SMALL_WRITE:
            self._small += data
        else:
            self.drain()
            self._write(data)
        self.size += n
        return n

    def drain(self) -> None:
        if self._small:
            self._write(self._small)
            self._small = bytearray()

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.size


def _write_ipc(batch: pa.RecordBatch, sink: _IpcSink) -> None:
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), batch.schema) as writer:
        writer.write_batch(batch)


class StreamedFrame:
    """A frame that is never assembled in memory: `write_to(write)` hands its bytes (the same as
    encode_frame's) to `write` in pieces. Serializing the batch twice (once for the CRC, once to
    write) costs less than copying it into a new frame-sized buffer, which on this kind of VM
    pays a page fault per 4 KiB for a buffer that is written once and dropped."""

    __slots__ = ("header", "_batch", "_head")

    def __init__(self, header: BatchHeader, batch: pa.RecordBatch, head: bytes):
        self.header = header
        self._batch = batch
        self._head = head

    def write_to(self, write) -> None:
        sink = _IpcSink(write, head=self._head)
        _write_ipc(self._batch, sink)
        sink.drain()
        if HEADER_SIZE + sink.size != self.header.frame_length:   # Arrow wrote other bytes this time
            raise FrameError(-1, f"streamed frame of {HEADER_SIZE + sink.size} bytes, header says "
                                 f"{self.header.frame_length}")


def prepare_frame(batch: pa.RecordBatch, *, base_offset: int, leader_epoch: int, producer_id: int = -1,
                  producer_epoch: int = -1, base_sequence: int = -1, is_transactional: bool = False,
                  is_control: bool = False) -> StreamedFrame:
    """The uncompressed frame of `batch` (as encode_frame would build it) to be streamed out."""
    header = _new_header(batch, _ipc_size(batch), base_offset, leader_epoch, producer_id, producer_epoch,
                         base_sequence, is_transactional, is_control)
    body = _BODY.pack(*_body_fields(header))
    # CRC32C(body + payload): the body's, continued over the payload's bytes as Arrow emits them
    payload = _IpcSink(crc=_crc32c.crc32c(body))
    _write_ipc(batch, payload)
    header = replace(header, crc=payload.crc)
    return StreamedFrame(header, batch, _PREFIX.pack(MAGIC, header.crc) + body)


def parse_header(buf, position: int = 0) -> BatchHeader:
    """Unpack the header at `position` (no CRC check). Raises FrameError if short or bad magic."""
    size = len(buf) if not isinstance(buf, pa.Buffer) else buf.size
    if size - position < HEADER_SIZE:
        raise FrameError(position, f"truncated header ({size - position} of {HEADER_SIZE} bytes)", truncated=True)
    magic, crc = _PREFIX.unpack_from(buf, position)
    if magic != MAGIC:
        raise FrameError(position, f"bad magic {magic!r}")
    (version, flags, payload_length, base_offset, record_count, first_ts, max_ts, producer_id, producer_epoch,
     base_sequence, leader_epoch, _reserved) = _BODY.unpack_from(buf, position + _PREFIX.size)
    if version != FORMAT_VERSION:
        raise FrameError(position, f"unknown frame format version {version}")
    if record_count <= 0:
        raise FrameError(position, f"bad record count {record_count}")
    return BatchHeader(version, base_offset, record_count, first_ts, max_ts, producer_id, producer_epoch,
                       base_sequence, leader_epoch, bool(flags & FLAG_TRANSACTIONAL), bool(flags & FLAG_CONTROL),
                       payload_length, crc)


def check_frame(buf: pa.Buffer, position: int, header: BatchHeader, verify: bool = True) -> pa.Buffer:
    """Bounds-check (and CRC-check if `verify`) the frame at `position`; returns its payload."""
    end = position + header.frame_length
    if end > buf.size:
        raise FrameError(position, f"truncated frame (needs {header.frame_length} bytes, "
                                   f"{buf.size - position} present)", truncated=True)
    if verify:
        actual = _crc32c.crc32c(buf.slice(position + _PREFIX.size, header.frame_length - _PREFIX.size))
        if actual != header.crc:
            raise FrameError(position, f"CRC mismatch (stored {header.crc:#010x}, computed {actual:#010x})")
    return buf.slice(position + HEADER_SIZE, header.payload_length)


def iter_frames(buf, start: int = 0, verify: bool = True,
                end: int | None = None) -> Iterator[tuple[int, BatchHeader, pa.Buffer]]:
    """Yield (position, header, payload) for each frame in buf[start:end]; lazy, zero-copy.

    Raises FrameError for a truncated or corrupt frame; frames before it have been yielded.
    """
    buf = _as_buffer(buf)
    if end is not None and end < buf.size:
        buf = buf.slice(0, end)
    position = start
    while position < buf.size:
        header = parse_header(buf, position)
        payload = check_frame(buf, position, header, verify)
        yield position, header, payload
        position += header.frame_length


def decode_payload(payload) -> pa.RecordBatch:
    """The RecordBatch inside a frame payload (zero-copy for uncompressed payloads)."""
    return pa.ipc.open_stream(_as_buffer(payload)).read_next_batch()


def find_valid_frame_after(buf, position: int, min_base_offset: int) -> int | None:
    """Position of a CRC-valid frame starting after `position` with base_offset >= min_base_offset.

    Used by recovery to tell a torn tail (nothing valid follows: truncate) from corruption in the
    middle (valid data follows: refuse). Recovery-only, so one copy of the tail is fine.
    """
    buf = _as_buffer(buf)
    tail = buf.slice(position + 1).to_pybytes()
    at = 0
    while (i := tail.find(MAGIC, at)) >= 0:
        candidate = position + 1 + i
        try:
            header = parse_header(buf, candidate)
            check_frame(buf, candidate, header, verify=True)
            if header.base_offset >= min_base_offset:
                return candidate
        except FrameError:
            pass
        at = i + 1
    return None

"""Unit tests for ray_broker.storage (no Ray): frames, segments, PartitionLog recovery and policies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from ray_broker.config import TopicConfig
from ray_broker.errors import CorruptRecordError, InvalidRequestError, OffsetOutOfRangeError, RecordTooLargeError
from ray_broker.records import stored_schema, validate_user_schema
from ray_broker.storage import (FORMAT_VERSION, BatchHeader, FrameError, LogFormatError, PartitionLog, atomic_write,
                                decode_payload, encode_frame, iter_frames)
from ray_broker.storage.frame import HEADER_SIZE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA = stored_schema(None)
HEADERS_TYPE = SCHEMA.field("headers").type


class Clock:
    def __init__(self, t: int = 1_000_000):
        self.t = t

    def __call__(self) -> int:
        return self.t


def make_batch(n: int, start: int = 0, ts: int = 1_000_000, value_size: int = 8) -> pa.RecordBatch:
    values = [(b"%d" % (start + i)).ljust(value_size, b"x") for i in range(n)]
    return pa.RecordBatch.from_arrays([
        pa.array(np.full(n, ts, dtype=np.int64)).cast(pa.timestamp("ms", tz="UTC")),
        pa.array([b"k%d" % (start + i) for i in range(n)], pa.binary()),
        pa.array(values, pa.binary()),
        pa.nulls(n, HEADERS_TYPE),
    ], schema=SCHEMA)


def open_log(path, clock=None, **cfg) -> PartitionLog:
    return PartitionLog(str(path), TopicConfig(**cfg), now_ms=clock or Clock())


def all_values(log: PartitionLog, start: int | None = None) -> list:
    out = []
    offset = log.log_start_offset if start is None else start
    while offset < log.log_end_offset:
        batches = log.read(offset, 1 << 20)
        for b in batches:
            out.extend(zip(b.column(0).to_pylist(), b.column("value").to_pylist()))
        offset = batches[-1].column(0)[-1].as_py() + 1
    return out


def fill(log: PartitionLog, batches: int, rows: int = 5, epoch: int = 0, **kw) -> None:
    for _ in range(batches):
        log.append(make_batch(rows, start=log.log_end_offset, **kw), leader_epoch=epoch)


def expected_values(start: int, end: int, value_size: int = 8) -> list:
    return [(o, (b"%d" % o).ljust(value_size, b"x")) for o in range(start, end)]


def crash(log: PartitionLog) -> None:
    """Drop the log like a killed process would: close fds, no flush, no clean-shutdown marker."""
    for seg in log.segments:
        seg.close()


# ---- frames --------------------------------------------------------------------------------------
def test_frame_header_fields_and_crc():
    batch = make_batch(4, ts=123)
    header, frame = encode_frame(batch, base_offset=10, leader_epoch=3, producer_id=7, producer_epoch=2,
                                 base_sequence=5, is_transactional=True)
    assert isinstance(header, BatchHeader)
    assert (header.base_offset, header.record_count, header.last_offset, header.next_offset) == (10, 4, 13, 14)
    assert (header.first_timestamp, header.max_timestamp, header.leader_epoch) == (123, 123, 3)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (7, 2, 5)
    assert header.is_transactional and not header.is_control
    assert header.frame_length == len(frame) and HEADER_SIZE % 8 == 0
    [(pos, parsed, payload)] = list(iter_frames(frame))
    assert pos == 0 and parsed == header
    assert decode_payload(payload).equals(batch)
    bad = bytearray(frame.to_pybytes())
    bad[-20] ^= 0xFF
    with pytest.raises(FrameError) as err:
        list(iter_frames(bytes(bad)))
    assert not err.value.truncated and "CRC" in str(err.value)
    with pytest.raises(FrameError) as err:
        list(iter_frames(frame.to_pybytes()[:-3]))
    assert err.value.truncated and err.value.position == 0


def test_control_frame_any_schema_has_no_timestamps():
    marker = pa.record_batch({"type": pa.array([1], pa.int8())})
    header, frame = encode_frame(marker, base_offset=0, leader_epoch=0, is_control=True)
    assert header.is_control and header.first_timestamp == -1 and header.max_timestamp == -1


def test_streamed_frame_is_byte_for_byte_the_encoded_frame():
    from ray_broker.storage.frame import prepare_frame

    big = make_batch(3000, ts=77, value_size=200)
    for batch in (big, big.slice(123, 1500), make_batch(1)):
        meta = dict(base_offset=40, leader_epoch=2, producer_id=9, producer_epoch=1, base_sequence=6,
                    is_transactional=True)
        header, frame = encode_frame(batch, **meta)
        streamed = prepare_frame(batch, **meta)
        pieces = []
        streamed.write_to(lambda data: pieces.append(bytes(data)))
        assert streamed.header == header
        assert b"".join(pieces) == frame.to_pybytes()


def test_large_append_is_streamed_and_a_failed_write_leaves_no_partial_frame(tmp_path, monkeypatch):
    from ray_broker.storage import segment as segment_mod
    from ray_broker.storage.frame import STREAM_MIN_BYTES, StreamedFrame

    log = open_log(tmp_path)
    fill(log, 1)
    big = make_batch(2000, start=5, value_size=STREAM_MIN_BYTES // 1000)
    info = log.append(big, leader_epoch=0)
    assert isinstance(info.frame, StreamedFrame)
    size = log.segments[-1].size
    real_write, calls = segment_mod._write_all, []

    def failing_write(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(segment_mod, "_write_all", failing_write)
    with pytest.raises(OSError):
        log.append(make_batch(2000, start=2005, value_size=STREAM_MIN_BYTES // 1000), leader_epoch=0)
    monkeypatch.setattr(segment_mod, "_write_all", real_write)
    assert os.path.getsize(log.segments[-1].data_path) == size == log.segments[-1].size
    log.append(make_batch(2, start=2005), leader_epoch=0)
    expected = all_values(log)
    assert [o for o, _ in expected] == list(range(2007))
    log.close()
    reopened = open_log(tmp_path)
    assert all_values(reopened) == expected


def test_atomic_write(tmp_path):
    p = tmp_path / "f"
    atomic_write(str(p), b"one")
    atomic_write(str(p), b"two")
    assert p.read_bytes() == b"two" and not (tmp_path / "f.tmp").exists()


# ---- append / read -------------------------------------------------------------------------------
def test_append_read_round_trip_default_schema(tmp_path):
    log = open_log(tmp_path)
    info = log.append(make_batch(3), leader_epoch=0)
    assert (info.base_offset, info.last_offset) == (0, 2)
    assert info.header.frame_length == len(info.frame)
    info = log.append(make_batch(2, start=3), leader_epoch=0)
    assert (info.base_offset, info.last_offset, log.log_end_offset) == (3, 4, 5)
    [b1, b2] = log.read(0, 1 << 20)
    assert b1.schema.names == ["offset", "timestamp", "key", "value", "headers"]
    assert b1.column("offset").to_pylist() == [0, 1, 2] and b2.column("offset").to_pylist() == [3, 4]
    assert b1.drop_columns(["offset"]).equals(make_batch(3))
    assert log.read(5, 1 << 20) == []


def test_custom_schema_round_trip(tmp_path):
    user = validate_user_schema(pa.schema([pa.field("price", pa.float64()), pa.field("sym", pa.string())]))
    schema = stored_schema(user)
    batch = pa.RecordBatch.from_arrays([
        pa.array([5, 6], pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        pa.array([1.5, 2.5]), pa.array(["a", "b"])], schema=schema)
    log = open_log(tmp_path)
    log.append(batch, leader_epoch=0)
    [out] = log.read(0, 100)
    assert out.column("offset").to_pylist() == [0, 1]
    assert out.column("price").to_pylist() == [1.5, 2.5] and out.column("sym").to_pylist() == ["a", "b"]


def test_offsets_contiguous_across_segments(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000)
    fill(log, 20, rows=7)
    assert len(log.segments) > 3
    assert all_values(log) == expected_values(0, 140)
    bases = [s.base_offset for s in log.segments]
    assert bases == sorted(bases) and bases[0] == 0


def test_read_offset_in_middle_slices_and_max_offset_bound(tmp_path):
    log = open_log(tmp_path)
    fill(log, 4, rows=10)
    batches = log.read(13, 1 << 20, max_offset=27)
    offsets = [o for b in batches for o in b.column("offset").to_pylist()]
    assert offsets == list(range(13, 27))
    assert batches[0].column("value")[0].as_py().startswith(b"13")
    assert log.read(13, 1 << 20, max_offset=13) == []
    assert log.read(13, 1 << 20, max_offset=12) == []


def test_read_max_bytes_respected_but_at_least_one_batch(tmp_path):
    log = open_log(tmp_path)
    fill(log, 10, rows=100, value_size=100)
    lengths = [h.frame_length for h in log.headers()]
    assert len(log.read(0, 1)) == 1
    assert len(log.read(0, sum(lengths[:3]))) == 3
    assert len(log.read(0, sum(lengths[:3]) - 1)) == 2
    assert len(log.read(50, 1)) == 1 and log.read(50, 1)[0].num_rows == 50


def test_read_out_of_range(tmp_path):
    log = open_log(tmp_path)
    fill(log, 2)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(11, 100)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(-1, 100)


def test_control_frames_skipped_by_read_but_kept_in_frames_and_headers(tmp_path):
    log = open_log(tmp_path)
    fill(log, 1, rows=3)
    log.append(pa.record_batch({"type": pa.array([0], pa.int8())}), leader_epoch=0, producer_id=9,
               producer_epoch=0, is_transactional=True, is_control=True)
    fill(log, 1, rows=3)
    offsets = [o for b in log.read(0, 1 << 20) for o in b.column("offset").to_pylist()]
    assert offsets == [0, 1, 2, 4, 5, 6]
    assert log.read(3, 1)[0].column("offset").to_pylist() == [4, 5, 6]
    hs = list(log.headers())
    assert [h.is_control for h in hs] == [False, True, False] and hs[1].producer_id == 9
    assert [h.base_offset for h in log.headers(5)] == [4]


def test_record_too_large_appends_nothing(tmp_path):
    log = open_log(tmp_path, max_message_bytes=2000)
    fill(log, 1)
    size = log.size_bytes
    with pytest.raises(RecordTooLargeError):
        log.append(make_batch(100, value_size=100), leader_epoch=0)
    assert log.log_end_offset == 5 and log.size_bytes == size
    with pytest.raises(InvalidRequestError):
        log.append(make_batch(0), leader_epoch=0)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compression_round_trip(tmp_path, codec):
    log = open_log(tmp_path, compression_type=codec)
    fill(log, 3, rows=200, value_size=500)
    plain = open_log(tmp_path / "plain")
    fill(plain, 3, rows=200, value_size=500)
    assert log.size_bytes < plain.size_bytes / 5
    assert all_values(log) == expected_values(0, 600, 500)
    log.close()
    assert all_values(open_log(tmp_path, compression_type="none")) == expected_values(0, 600, 500)


# ---- roll ----------------------------------------------------------------------------------------
def test_roll_by_size(tmp_path):
    log = open_log(tmp_path, segment_bytes=4000)
    fill(log, 12, rows=5)
    frame_len = next(log.headers()).frame_length
    per_segment = 4000 // frame_len
    assert all(s.num_frames == per_segment for s in log.segments[:-1])
    assert all(s.size <= 4000 for s in log.segments)


def test_roll_by_age_and_maybe_roll(tmp_path):
    clock = Clock()
    log = open_log(tmp_path, clock, segment_ms=1000)
    fill(log, 2)
    clock.t += 999
    fill(log, 1)
    assert len(log.segments) == 1
    clock.t += 1
    fill(log, 1)
    assert [s.base_offset for s in log.segments] == [0, 15]
    assert not log.maybe_roll(clock.t + 999)
    assert log.maybe_roll(clock.t + 1000)
    assert [s.base_offset for s in log.segments] == [0, 15, 20]
    assert not log.maybe_roll(clock.t + 5000)  # active segment is empty
    log.close()
    log = open_log(tmp_path, clock, segment_ms=1000)  # creation time survives restart
    fill(log, 1)
    assert log.segments[-1].created_ms() == clock.t


# ---- retention -----------------------------------------------------------------------------------
def test_retention_by_size_deletes_old_segments_and_survives_reopen(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000, retention_bytes=7000)
    fill(log, 20)
    n_before = len(log.segments)
    deleted = log.apply_retention()
    assert deleted > 0 and len(log.segments) == n_before - deleted
    assert log.size_bytes >= 7000 and log.size_bytes - log.segments[0].size < 7000
    start = log.log_start_offset
    assert start == log.segments[0].base_offset > 0
    with pytest.raises(OffsetOutOfRangeError):
        log.read(0, 100)
    assert all_values(log) == expected_values(start, 100)
    log.close()
    log = open_log(tmp_path, segment_bytes=3000, retention_bytes=7000)
    assert log.log_start_offset == start and all_values(log) == expected_values(start, 100)


def test_retention_by_time_never_deletes_active_segment(tmp_path):
    clock = Clock(10_000)
    log = open_log(tmp_path, clock, segment_bytes=3000, retention_ms=5000)
    fill(log, 6, ts=1_000)           # old records
    old_segments = len(log.segments)
    log.roll()
    fill(log, 2, ts=9_000)           # new records
    assert log.apply_retention(clock.t) == old_segments
    assert log.log_start_offset == 30 and [s.base_offset for s in log.segments] == [30]
    assert log.apply_retention(100_000) == 0  # only the active segment is left
    crash(log)
    log = open_log(tmp_path, clock)
    assert log.log_start_offset == 30 and all_values(log) == expected_values(30, 40)


def test_retention_crash_between_checkpoint_and_unlink(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000)
    fill(log, 10)
    second = log.segments[1].base_offset
    (tmp_path / "log-start-offset").write_text(f"{second}\n")
    crash(log)
    log = open_log(tmp_path)
    assert log.log_start_offset == second and log.segments[0].base_offset == second


# ---- recovery ------------------------------------------------------------------------------------
def test_reopen_after_clean_close_keeps_everything(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000)
    fill(log, 5, epoch=1)
    fill(log, 5, epoch=3)
    log.checkpoint_high_watermark(42)
    before = (log.log_end_offset, log.size_bytes, log.epoch_entries(), len(log.segments))
    log.close()
    assert (tmp_path / "clean_shutdown").exists()
    log = open_log(tmp_path, segment_bytes=3000)
    assert not (tmp_path / "clean_shutdown").exists()
    assert (log.log_end_offset, log.size_bytes, log.epoch_entries(), len(log.segments)) == before
    assert log.high_watermark_checkpoint == 42 and log.recovery_point == 50
    assert all_values(log) == expected_values(0, 50)
    fill(log, 1)
    assert log.log_end_offset == 55


def test_high_watermark_clamped_on_open(tmp_path):
    log = open_log(tmp_path)
    fill(log, 2)
    log.checkpoint_high_watermark(999)
    log.close()
    assert open_log(tmp_path).high_watermark_checkpoint == 10


def test_unknown_format_version_refused(tmp_path):
    open_log(tmp_path).close()
    assert (tmp_path / ".format").read_text().strip() == str(FORMAT_VERSION)
    (tmp_path / ".format").write_text("99\n")
    with pytest.raises(LogFormatError, match="version 99"):
        open_log(tmp_path)


TORN_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import numpy as np, pyarrow as pa
    from ray_broker.config import TopicConfig
    from ray_broker.records import stored_schema
    from ray_broker.storage import PartitionLog, encode_frame

    schema = stored_schema(None)
    def batch(start, n=5):
        return pa.RecordBatch.from_arrays([
            pa.array(np.full(n, 1_000_000, dtype=np.int64)).cast(pa.timestamp("ms", tz="UTC")),
            pa.array([b"k%d" % (start + i) for i in range(n)], pa.binary()),
            pa.array([(b"%d" % (start + i)).ljust(8, b"x") for i in range(n)], pa.binary()),
            pa.nulls(n, schema.field("headers").type)], schema=schema)

    log = PartitionLog({path!r}, TopicConfig(segment_bytes=100_000), now_ms=lambda: 1_000_000)
    for start in (0, 5, 10):
        log.append(batch(start), leader_epoch=0)
    header, frame = encode_frame(batch(15), base_offset=15, leader_epoch=0)
    with open(log.segments[-1].data_path, "ab") as f:   # a torn write: only half the frame landed
        f.write(frame.to_pybytes()[: len(frame) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_recovery_truncates_torn_tail_from_killed_process(tmp_path):
    path = tmp_path / "log"
    proc = subprocess.run([sys.executable, "-c", TORN_WRITER.format(repo=REPO, path=str(path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (path / "clean_shutdown").exists()
    data_file = path / f"{0:020d}.arrow"
    torn_size = data_file.stat().st_size
    log = open_log(path, segment_bytes=100_000)
    assert log.log_end_offset == 15
    assert data_file.stat().st_size == log.size_bytes < torn_size
    assert all_values(log) == expected_values(0, 15)
    fill(log, 1)
    crash(log)
    log = open_log(path, segment_bytes=100_000)
    assert all_values(log) == expected_values(0, 20)


def flip_byte(path, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        b = f.read(1)
        f.seek(position)
        f.write(bytes([b[0] ^ 0xFF]))


def test_flipped_byte_in_middle_detected_by_crc(tmp_path):
    log = open_log(tmp_path)
    fill(log, 4)
    data_path = log.segments[0].data_path
    frame_len = log.segments[0].size // 4
    crash(log)
    flip_byte(data_path, frame_len + HEADER_SIZE + 40)  # inside frame 2's payload
    with pytest.raises(CorruptRecordError) as err:
        open_log(tmp_path)
    assert data_path in str(err.value) and "offset 5" in str(err.value)


def test_flipped_byte_after_clean_shutdown_detected_on_read(tmp_path):
    log = open_log(tmp_path)
    fill(log, 4)
    data_path = log.segments[0].data_path
    frame_len = log.segments[0].size // 4
    log.close()
    flip_byte(data_path, frame_len + HEADER_SIZE + 40)
    log = open_log(tmp_path)  # clean shutdown: only the tail is checked
    assert log.read(0, 1)[0].num_rows == 5
    with pytest.raises(CorruptRecordError, match="offset 5") as err:
        log.read(0, 1 << 20)
    assert data_path in str(err.value)
    with pytest.raises(CorruptRecordError):
        log.read_frames(5, 1 << 20)


def test_corruption_in_non_last_segment_refused(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000)
    fill(log, 10)
    seg = log.segments[0]
    crash(log)
    flip_byte(seg.data_path, seg.size - 10)  # last frame of a sealed segment
    with pytest.raises(CorruptRecordError, match=seg.data_path):
        open_log(tmp_path, segment_bytes=3000)


def test_flipped_byte_in_last_frame_is_truncated(tmp_path):
    log = open_log(tmp_path)
    fill(log, 4)
    data_path = log.segments[0].data_path
    size = log.segments[0].size
    crash(log)
    flip_byte(data_path, size - 30)
    log = open_log(tmp_path)
    assert log.log_end_offset == 15 and all_values(log) == expected_values(0, 15)
    assert os.path.getsize(data_path) == size * 3 // 4


def test_zero_filled_tail_is_truncated(tmp_path):
    log = open_log(tmp_path)
    fill(log, 2)
    data_path = log.segments[0].data_path
    crash(log)
    with open(data_path, "ab") as f:
        f.write(b"\0" * 5000)
    log = open_log(tmp_path)
    assert log.log_end_offset == 10 and all_values(log) == expected_values(0, 10)


def test_index_rebuilt_when_deleted(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000)
    fill(log, 10)
    index_paths = [s.index_path for s in log.segments]
    contents = [open(p, "rb").read() for p in index_paths]
    log.close()
    for p in index_paths:
        os.remove(p)
    log = open_log(tmp_path, segment_bytes=3000)
    assert [open(p, "rb").read()[:16] for p in index_paths] == [c[:16] for c in contents]
    assert [len(open(p, "rb").read()) for p in index_paths] == [len(c) for c in contents]
    assert all_values(log) == expected_values(0, 50)
    assert log.read(23, 1)[0].column("offset")[0].as_py() == 23


def test_index_rebuilt_when_stale(tmp_path):
    log = open_log(tmp_path)
    fill(log, 2)
    index_path = log.segments[0].index_path
    stale = open(index_path, "rb").read()
    fill(log, 3)
    full = open(index_path, "rb").read()
    log.close()
    with open(index_path, "wb") as f:
        f.write(stale + b"\x01\x02\x03")  # fewer entries than frames, plus a torn entry
    log = open_log(tmp_path)
    assert log.segments[0].num_frames == 5 and open(index_path, "rb").read()[:len(stale)] == stale
    assert len(open(index_path, "rb").read()) == len(full)
    assert all_values(log) == expected_values(0, 25)
    assert [h.base_offset for h in log.headers()] == [0, 5, 10, 15, 20]


def test_index_ahead_of_data_is_repaired(tmp_path):
    log = open_log(tmp_path)
    fill(log, 3)
    seg = log.segments[0]
    keep = int(seg.index.pos[2])
    crash(log)
    os.truncate(seg.data_path, keep + 10)  # last frame torn, index still lists it
    log = open_log(tmp_path)
    assert log.log_end_offset == 10 and log.segments[0].num_frames == 2


def test_unclean_shutdown_verifies_only_past_recovery_point(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000)
    fill(log, 10)
    log.flush()
    assert log.recovery_point == 50
    first = log.segments[0]
    fill(log, 2)
    crash(log)
    flip_byte(first.data_path, HEADER_SIZE + 40)  # below the recovery point: not scanned at open
    log = open_log(tmp_path, segment_bytes=3000)
    assert log.log_end_offset == 60
    with pytest.raises(CorruptRecordError):
        log.read(0, 1)


# ---- replication path ----------------------------------------------------------------------------
def test_append_frames_from_read_frames_gives_identical_log(tmp_path):
    leader = open_log(tmp_path / "leader", segment_bytes=3000)
    fill(leader, 5, epoch=1)
    fill(leader, 5, epoch=2)
    follower = open_log(tmp_path / "follower", segment_bytes=3000)
    while follower.log_end_offset < leader.log_end_offset:
        headers, frames = leader.read_frames(follower.log_end_offset, 2500)
        assert headers
        assert [h.base_offset for h in follower.append_frames(frames)] == [h.base_offset for h in headers]
    assert follower.epoch_entries() == leader.epoch_entries() == [(1, 0), (2, 25)]
    assert all_values(follower) == all_values(leader)
    for a, b in zip(leader.segments, follower.segments):
        assert open(a.data_path, "rb").read() == open(b.data_path, "rb").read()
    headers, frames = leader.read_frames(0, 1 << 30)  # spans segments
    assert len(headers) == 10 and len(frames) == leader.size_bytes
    assert leader.read_frames(50, 100) == ([], b"")


def test_append_frames_rejects_gap_and_corruption(tmp_path):
    leader = open_log(tmp_path / "leader")
    fill(leader, 3)
    follower = open_log(tmp_path / "follower")
    _, frames = leader.read_frames(5, 1 << 20)
    with pytest.raises(InvalidRequestError, match="5.*0|0.*5"):
        follower.append_frames(frames)
    _, frames = leader.read_frames(0, 1 << 20)
    bad = bytearray(frames.to_pybytes())
    bad[-5] ^= 1
    with pytest.raises(CorruptRecordError):
        follower.append_frames(bytes(bad))
    with pytest.raises(CorruptRecordError):
        follower.append_frames(frames.to_pybytes()[:-1])
    assert follower.log_end_offset == 0 and follower.size_bytes == 0
    with pytest.raises(InvalidRequestError):
        leader.read_frames(3, 100)


def test_append_info_frame_replicates(tmp_path):
    leader = open_log(tmp_path / "leader")
    follower = open_log(tmp_path / "follower")
    for i in range(3):
        info = leader.append(make_batch(4, start=4 * i), leader_epoch=7)
        follower.append_frames(info.frame)
    assert all_values(follower) == expected_values(0, 12) and follower.latest_epoch() == 7


# ---- truncation ----------------------------------------------------------------------------------
def test_truncate_to_boundary_mid_frame_and_across_segments(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000)
    fill(log, 4, epoch=1)
    fill(log, 4, epoch=2)
    fill(log, 4, epoch=3)
    assert log.epoch_entries() == [(1, 0), (2, 20), (3, 40)]
    log.checkpoint_high_watermark(60)
    log.truncate_to(60)  # == LEO: no-op
    assert log.log_end_offset == 60
    log.truncate_to(42)  # inside the frame [40, 45): rounds down to 40
    assert log.log_end_offset == 40 and log.epoch_entries() == [(1, 0), (2, 20)]
    assert log.high_watermark_checkpoint == 40
    log.truncate_to(15)
    assert log.log_end_offset == 15 and log.epoch_entries() == [(1, 0)]
    assert log.segments[-1].next_offset == 15 and not log.segments[-1].empty
    assert all_values(log) == expected_values(0, 15)
    assert log.size_bytes == sum(os.path.getsize(s.data_path) for s in log.segments)
    fill(log, 1, epoch=4)
    crash(log)
    log = open_log(tmp_path, segment_bytes=3000)
    assert log.log_end_offset == 20 and log.epoch_entries() == [(1, 0), (4, 15)]
    assert all_values(log) == expected_values(0, 20)


def test_truncate_keeps_earlier_reads_valid(tmp_path):
    log = open_log(tmp_path)
    fill(log, 4)
    batches = log.read(0, 1 << 20)  # zero-copy views of the mapped file
    log.truncate_to(5)
    assert [o for b in batches for o in b.column("offset").to_pylist()] == list(range(20))
    assert sum(len(v) for b in batches for v in b.column("value").to_pylist()) == 20 * 8
    assert all_values(log) == expected_values(0, 5)


def test_truncate_fully_and_start_at(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000)
    fill(log, 10, epoch=1)
    log.truncate_fully_and_start_at(1234)
    assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (1234, 1234, 0)
    assert log.epoch_entries() == [] and log.read(1234, 100) == []
    with pytest.raises(OffsetOutOfRangeError):
        log.read(0, 100)
    fill(log, 1, epoch=5)
    assert log.epoch_entries() == [(5, 1234)]
    log.close()
    log = open_log(tmp_path)
    assert (log.log_start_offset, log.log_end_offset) == (1234, 1239)
    assert all_values(log) == expected_values(1234, 1239)


# ---- leader epochs -------------------------------------------------------------------------------
def test_end_offset_for_epoch(tmp_path):
    log = open_log(tmp_path)
    assert log.end_offset_for_epoch(0) == (-1, -1) and log.latest_epoch() == -1
    fill(log, 2, epoch=2)   # [0, 10)
    fill(log, 1, epoch=4)   # [10, 15)
    fill(log, 3, epoch=7)   # [15, 30)
    assert log.epoch_entries() == [(2, 0), (4, 10), (7, 15)] and log.latest_epoch() == 7
    assert log.end_offset_for_epoch(1) == (-1, -1)
    assert log.end_offset_for_epoch(2) == (2, 10)
    assert log.end_offset_for_epoch(3) == (2, 10)
    assert log.end_offset_for_epoch(4) == (4, 15)
    assert log.end_offset_for_epoch(6) == (4, 15)
    assert log.end_offset_for_epoch(7) == (7, 30)
    assert log.end_offset_for_epoch(100) == (7, 30)
    fill(log, 1, epoch=6)   # a stale epoch does not rewrite the cache
    assert log.latest_epoch() == 7


def test_epoch_assigned_at_log_end_survives_reopen_and_truncation(tmp_path):
    log = open_log(tmp_path)
    fill(log, 2, epoch=1)
    log.assign_epoch(3, log.log_end_offset)  # new leader, nothing written yet in epoch 3
    assert log.end_offset_for_epoch(1) == (1, 10) and log.end_offset_for_epoch(3) == (3, 10)
    crash(log)
    log = open_log(tmp_path)
    assert log.epoch_entries() == [(1, 0), (3, 10)]
    fill(log, 1, epoch=3)
    assert log.epoch_entries() == [(1, 0), (3, 10)]
    log.truncate_to(10)
    assert log.epoch_entries() == [(1, 0)]


def test_epoch_cache_after_retention(tmp_path):
    log = open_log(tmp_path, segment_bytes=3000, retention_bytes=1)
    fill(log, 5, epoch=1)
    fill(log, 5, epoch=2)
    log.apply_retention()
    start = log.log_start_offset
    assert start > 25 and log.epoch_entries() == [(2, start)]


# ---- flush policy --------------------------------------------------------------------------------
def test_flush_policy_messages_and_ms(tmp_path):
    log = open_log(tmp_path / "a", flush_messages=2)
    fill(log, 1)
    assert log.recovery_point == 0
    fill(log, 1)
    assert log.recovery_point == 10
    clock = Clock()
    log = open_log(tmp_path / "b", clock, flush_ms=100)
    fill(log, 1)
    assert log.recovery_point == 0 and not log.maybe_flush(clock.t + 50)
    assert log.maybe_flush(clock.t + 100) and log.recovery_point == 5
    clock.t += 100
    fill(log, 1)
    assert log.recovery_point == 10


def test_delete_removes_directory(tmp_path):
    log = open_log(tmp_path / "x")
    fill(log, 1)
    log.delete()
    assert not (tmp_path / "x").exists()


# ---- property ------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=15), seg=st.integers(1500, 6000),
       start=st.data())
def test_property_read_back_everything(tmp_path_factory, sizes, seg, start):
    path = tmp_path_factory.mktemp("prop")
    log = open_log(path, segment_bytes=seg)
    for n in sizes:
        log.append(make_batch(n, start=log.log_end_offset), leader_epoch=0)
    total = sum(sizes)
    assert all_values(log) == expected_values(0, total)
    offset = start.draw(st.integers(0, total - 1))
    limit = start.draw(st.integers(offset + 1, total))
    got = [o for b in log.read(offset, 1 << 30, max_offset=limit) for o in b.column("offset").to_pylist()]
    assert got == list(range(offset, limit))
    log.close()
    assert all_values(open_log(path, segment_bytes=seg)) == expected_values(0, total)


def test_benchmark_sanity_print(tmp_path):
    """Not a timing assertion: prints append/read throughput for 1 MB batches."""
    import time
    log = open_log(tmp_path, segment_bytes=64 << 20)
    batch = make_batch(1024, value_size=1024)
    t0 = time.perf_counter()
    for _ in range(20):
        log.append(batch, leader_epoch=0)
    t1 = time.perf_counter()
    n = sum(b.num_rows for b in log.read(0, 1 << 30))
    t2 = time.perf_counter()
    assert n == 20 * 1024
    print(f"\nappend {20 * batch.nbytes / (t1 - t0) / 1e6:.0f} MB/s, read {20 * batch.nbytes / (t2 - t1) / 1e6:.0f} MB/s")

"""Partition storage: Arrow IPC frames in segment files, with recovery, retention and epochs.

Pure Python + pyarrow (no Ray). Modules: `frame` (on-disk unit), `segment` (data file + offset
index), `epoch_cache` (leader epochs), `log` (PartitionLog), `files` (durable file helpers).
"""
from .epoch_cache import LeaderEpochCache
from .files import atomic_write
from .frame import FORMAT_VERSION, BatchHeader, FrameError, decode_payload, encode_frame, iter_frames
from .log import AppendInfo, LogFormatError, PartitionLog
from .segment import LogSegment

__all__ = ["PartitionLog", "BatchHeader", "AppendInfo", "encode_frame", "iter_frames", "decode_payload",
           "atomic_write", "FORMAT_VERSION", "FrameError", "LeaderEpochCache", "LogFormatError", "LogSegment"]

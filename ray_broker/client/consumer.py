"""The consumer: manual assignment, one prefetching fetch per partition, Arrow batches out.

`poll()` returns `{TopicPartition: pa.RecordBatch}` (read schema: `offset`, `timestamp`, topic
columns), one concatenated batch per partition that has new records. One fetch is kept in flight
per assigned partition whose buffer is empty, so the next poll usually finds data already there.

Not thread-safe: use a consumer from one thread at a time.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Iterable

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from ..config import ConsumerConfig
from ..errors import BrokerError, BrokerTimeoutError, InvalidRequestError, OffsetOutOfRangeError
from ..records import TopicPartition
from .metadata_cache import ClientContext, unwrap_error

log = logging.getLogger(__name__)

__all__ = ["Consumer"]

RETRY_BACKOFF_S = 0.1


class _PartState:
    __slots__ = ("tp", "fetch_offset", "gen", "buffer", "ref", "ref_offset", "ref_gen", "ref_sent_at",
                 "ref_leader", "retry_at", "high_watermark", "last_stable_offset", "log_start_offset")

    def __init__(self, tp: TopicPartition):
        self.tp = tp
        self.fetch_offset: int | None = None  # None: resolve with auto.offset.reset
        self.gen = 0                          # bumped by seek/reset: older fetch results are discarded
        self.buffer: deque[pa.RecordBatch] = deque()
        self.ref = None
        self.ref_offset = -1
        self.ref_gen = -1
        self.ref_sent_at = 0.0
        self.ref_leader = None
        self.retry_at = 0.0
        self.high_watermark = -1
        self.last_stable_offset = -1
        self.log_start_offset = -1

    def set_position(self, offset: int) -> None:
        self.fetch_offset = offset
        self.gen += 1
        self.buffer.clear()
        self.ref = None
        self.retry_at = 0.0

    def position(self) -> int | None:
        if self.buffer:
            return self.buffer[0].column(0)[0].as_py()
        return self.fetch_offset


def _tp(tp) -> TopicPartition:
    if isinstance(tp, TopicPartition):
        return tp
    try:
        topic, partition = tp
    except (TypeError, ValueError):
        raise InvalidRequestError(f"expected a TopicPartition(topic, partition), got {tp!r}") from None
    return TopicPartition(topic, partition)


class Consumer:
    """Manually assigned consumer (`assign`/`seek`/`poll`); see the module docstring."""

    def __init__(self, context: ClientContext, config: ConsumerConfig | None = None):
        self.context = context
        self.config = config or ConsumerConfig()
        self._isolation = self.config.isolation_level
        self._parts: dict[TopicPartition, _PartState] = {}
        self._refs: dict = {}  # ref -> _PartState
        self._rr = 0
        self._closed = False

    # ================================================================ assignment and positions
    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Replace the assignment; positions of partitions kept in it are kept."""
        self._check_open()
        tps: list[TopicPartition] = []
        for tp in partitions:
            tp = _tp(tp)
            self.context.check_partition(tp.topic, tp.partition)
            if tp not in tps:
                tps.append(tp)
        new = {}
        for tp in tps:
            new[tp] = self._parts.get(tp) or _PartState(tp)
        for tp, ps in self._parts.items():
            if tp not in new and ps.ref is not None:
                self._refs.pop(ps.ref, None)
        self._parts = new

    def assignment(self) -> set[TopicPartition]:
        return set(self._parts)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._check_open()
        ps = self._state(partition)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidRequestError(f"seek offset must be an int >= 0, got {offset!r}")
        self._set_position(ps, offset)

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        self._seek_to(partitions, "earliest")

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        self._seek_to(partitions, "latest")

    def _seek_to(self, partitions, which: str) -> None:
        self._check_open()
        states = [self._state(tp) for tp in partitions] if partitions is not None else list(self._parts.values())
        offsets = self._list_offsets([ps.tp for ps in states], which)
        for ps in states:
            self._set_position(ps, offsets[ps.tp])

    def position(self, partition: TopicPartition) -> int:
        """Offset of the next record poll() will return (resolving auto.offset.reset if needed)."""
        self._check_open()
        ps = self._state(partition)
        if ps.fetch_offset is None:
            self._reset([ps])
        return ps.position()

    def highwater(self, partition: TopicPartition) -> int | None:
        """High watermark from the last fetch of `partition` (None before the first)."""
        ps = self._state(partition)
        return ps.high_watermark if ps.high_watermark >= 0 else None

    # ================================================================ offsets lookup
    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """High watermark (read_uncommitted) or last stable offset (read_committed) per partition."""
        self._check_open()
        return self._list_offsets([_tp(tp) for tp in partitions], "latest")

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        self._check_open()
        return self._list_offsets([_tp(tp) for tp in partitions], "earliest")

    def _list_offsets(self, tps: list[TopicPartition], which: str) -> dict[TopicPartition, int]:
        """list_offset on every partition's leader in parallel, retrying retriable errors."""
        ctx = self.context
        deadline = time.monotonic() + self.config.request_timeout_ms / 1000.0
        result: dict[TopicPartition, int] = {}
        todo = list(dict.fromkeys(tps))
        last: dict[TopicPartition, BaseException] = {}
        while todo:
            calls = []
            for tp in todo:
                try:
                    leader, handle = ctx.leader_handle(tp.topic, tp.partition)
                    calls.append((tp, leader, handle.list_offset.remote(which, self._isolation)))
                except BaseException as exc:
                    err = unwrap_error(exc)
                    if not self._retriable(err):
                        raise err
                    ctx.on_error(tp.topic, tp.partition)
                    last[tp] = err
            retry = [tp for tp in todo if tp not in {c[0] for c in calls}]
            for tp, leader, ref in calls:
                try:
                    result[tp] = int(ray.get(ref, timeout=max(0.001, deadline - time.monotonic())))
                except BaseException as exc:
                    err = unwrap_error(exc)
                    if not self._retriable(err):
                        raise err
                    ctx.on_error(tp.topic, tp.partition, leader if isinstance(err, RayActorError) else None)
                    last[tp] = err
                    retry.append(tp)
            todo = retry
            if todo:
                if time.monotonic() + RETRY_BACKOFF_S > deadline:
                    raise BrokerTimeoutError(
                        f"list_offset({which!r}) for {todo} timed out; last errors: {[last.get(t) for t in todo]}")
                time.sleep(RETRY_BACKOFF_S)
        return result

    # ================================================================ poll
    def poll(self, timeout: float | None = 1.0) -> dict[TopicPartition, pa.RecordBatch]:
        """Records fetched within `timeout` seconds (None: until something arrives):
        {partition: one RecordBatch}; partitions with nothing new are left out (an empty dict when
        nothing arrived). Retriable errors (leader moved, actor restarted) are retried inside;
        `OffsetOutOfRangeError` with auto.offset.reset='none' and non-retriable errors raise."""
        self._check_open()
        if not self._parts:
            raise InvalidRequestError("poll() without an assignment: call assign() first")
        deadline = float("inf") if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            self._reset([ps for ps in self._parts.values() if ps.fetch_offset is None])
            now = time.monotonic()
            self._send_fetches(now)
            if any(ps.buffer for ps in self._parts.values()):
                break
            remaining = deadline - now
            if remaining <= 0:
                break
            wait = min(remaining, 1.0)
            pending_retry = [ps.retry_at for ps in self._parts.values() if ps.ref is None and ps.retry_at > now]
            if pending_retry:
                wait = min(wait, max(0.0, min(pending_retry) - now))
            if not self._refs:
                time.sleep(wait)
                continue
            refs = list(self._refs)
            ready, rest = ray.wait(refs, num_returns=1, timeout=wait, fetch_local=True)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=True)
                ready += more
            for ref in ready:
                ps = self._refs.pop(ref, None)
                if ps is not None:
                    self._on_fetch(ps, ref)
        out = self._collect()
        self._send_fetches(time.monotonic())  # prefetch for the partitions just drained
        return out

    def _send_fetches(self, now: float) -> None:
        ctx = self.context
        c = self.config
        stale_after = (c.fetch_max_wait_ms + c.request_timeout_ms) / 1000.0
        for ps in self._parts.values():
            if ps.ref is not None:
                if now - ps.ref_sent_at <= stale_after:
                    continue
                self._refs.pop(ps.ref, None)   # no answer: abandon and fetch again
                ps.ref = None
            if ps.buffer or ps.fetch_offset is None or now < ps.retry_at:
                continue
            try:
                leader, handle = ctx.leader_handle(ps.tp.topic, ps.tp.partition)
                ref = handle.fetch.remote(ps.fetch_offset, c.max_partition_fetch_bytes, self._isolation,
                                          c.fetch_max_wait_ms)
            except BaseException as exc:
                err = unwrap_error(exc)
                if not self._retriable(err):
                    raise err
                ctx.on_error(ps.tp.topic, ps.tp.partition)
                ps.retry_at = now + RETRY_BACKOFF_S
                continue
            ps.ref = ref
            ps.ref_offset = ps.fetch_offset
            ps.ref_gen = ps.gen
            ps.ref_sent_at = now
            ps.ref_leader = leader
            self._refs[ref] = ps

    def _on_fetch(self, ps: _PartState, ref) -> None:
        if ps.ref is not ref:
            return
        ps.ref = None
        if self._parts.get(ps.tp) is not ps or ps.ref_gen != ps.gen or ps.ref_offset != ps.fetch_offset:
            return  # a seek happened meanwhile
        try:
            res = ray.get(ref, timeout=0)
        except BaseException as exc:
            err = unwrap_error(exc)
            if isinstance(err, OffsetOutOfRangeError):
                log.info("offset %s out of range for %s; resetting (%s)", ps.fetch_offset, ps.tp,
                         self.config.auto_offset_reset)
                self._reset([ps], cause=err)
                return
            if not self._retriable(err):
                raise err
            self.context.on_error(ps.tp.topic, ps.tp.partition,
                                  ps.ref_leader if isinstance(err, RayActorError) else None)
            ps.retry_at = time.monotonic() + RETRY_BACKOFF_S
            return
        for b in res.batches:
            if b.num_rows:
                ps.buffer.append(b)
        ps.fetch_offset = max(int(res.next_offset), ps.fetch_offset)
        ps.high_watermark = res.high_watermark
        ps.last_stable_offset = res.last_stable_offset
        ps.log_start_offset = res.log_start_offset

    def _collect(self) -> dict[TopicPartition, pa.RecordBatch]:
        c = self.config
        out: dict[TopicPartition, pa.RecordBatch] = {}
        records_left = c.max_poll_records if c.max_poll_records is not None else float("inf")
        bytes_left = c.fetch_max_bytes
        states = list(self._parts.values())
        if not states:
            return out
        start = self._rr % len(states)
        self._rr += 1
        for ps in states[start:] + states[:start]:
            if not ps.buffer or records_left <= 0 or (bytes_left <= 0 and out):
                continue
            taken: list[pa.RecordBatch] = []
            part_bytes = 0
            while ps.buffer and records_left > 0:
                b = ps.buffer[0]
                nb = b.nbytes
                if taken and (part_bytes + nb > c.max_partition_fetch_bytes or nb > bytes_left):
                    break
                if (out or taken) and nb > bytes_left:
                    break
                ps.buffer.popleft()
                if b.num_rows > records_left:
                    k = int(records_left)
                    ps.buffer.appendleft(b.slice(k))
                    b = b.slice(0, k)
                    nb = b.nbytes
                taken.append(b)
                part_bytes += nb
                bytes_left -= nb
                records_left -= b.num_rows
            if taken:
                out[ps.tp] = taken[0] if len(taken) == 1 else pa.concat_batches(taken)
        return out

    # ================================================================ helpers
    def _reset(self, states: list[_PartState], cause: BaseException | None = None) -> None:
        if not states:
            return
        policy = self.config.auto_offset_reset
        if policy == "none":
            tps = [ps.tp for ps in states]
            if cause is not None:
                raise OffsetOutOfRangeError(f"{cause.message if isinstance(cause, BrokerError) else cause}; "
                                            f"auto.offset.reset is 'none' for {tps}")
            raise OffsetOutOfRangeError(f"no position for {tps} and auto.offset.reset is 'none': seek() first")
        offsets = self._list_offsets([ps.tp for ps in states], "earliest" if policy == "earliest" else "latest")
        for ps in states:
            self._set_position(ps, offsets[ps.tp])

    def _set_position(self, ps: _PartState, offset: int) -> None:
        if ps.ref is not None:
            self._refs.pop(ps.ref, None)
        ps.set_position(offset)

    def _state(self, tp) -> _PartState:
        tp = _tp(tp)
        ps = self._parts.get(tp)
        if ps is None:
            raise InvalidRequestError(f"{tp} is not assigned to this consumer")
        return ps

    @staticmethod
    def _retriable(err: BaseException) -> bool:
        if isinstance(err, BrokerError):
            return err.retriable
        return isinstance(err, (RayActorError, GetTimeoutError))

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequestError("consumer is closed")

    def close(self) -> None:
        self._closed = True
        self._refs.clear()
        self._parts.clear()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


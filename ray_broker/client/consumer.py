"""The consumer: manual assignment or group subscription, one prefetching fetch per partition, Arrow batches out.

`poll()` returns `{TopicPartition: pa.RecordBatch}` (read schema: `offset`, `timestamp`, topic
columns), one concatenated batch per partition that has new records. One fetch is kept in flight
per assigned partition whose buffer is empty, so the next poll usually finds data already there.

Consumer groups (``group_id`` set): `subscribe(topics, on_assign, on_revoke, on_lost)` joins the
group (`membership.Membership`: join/sync driven from `poll()`, heartbeats from a background
thread). The rebalance callbacks get ``list[TopicPartition]`` and run inside `poll()` (and
`close()` / `unsubscribe()` for the final revocation). Eager assignors ("range", "roundrobin")
revoke everything before each rejoin; "cooperative-sticky" revokes only what moves (KIP-429).
A newly assigned partition starts at the group's committed offset (retried while a transaction
holding offsets for it is open: UNSTABLE_OFFSET_COMMIT), else at ``auto_offset_reset``.
`commit()` / `committed()` / `group_metadata()` (for `Producer.send_offsets_to_transaction`)
work with `subscribe()` and, as a "simple" group (generation -1, no member), with `assign()`.

Not thread-safe: use a consumer from one thread at a time.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Iterable

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError

from ..config import ConsumerConfig
from ..errors import (BrokerError, BrokerTimeoutError, InvalidRequestError, OffsetOutOfRangeError,
                      UnstableOffsetCommitError)
from ..records import TopicPartition
from .membership import NO_GENERATION, SYNC_POLL_S, CoordinatorClient, GroupMetadata, Membership
from .metadata_cache import ACTOR_GONE, ClientContext, discard_ref, unwrap_error

log = logging.getLogger(__name__)

__all__ = ["Consumer", "GroupMetadata"]

RETRY_BACKOFF_S = 0.1
# a partition's buffered batches are joined into one per poll up to this size; a bigger batch is
# returned alone (joining copies: W4's consumer spent ~28 % of its CPU in concat_batches)
COALESCE_BYTES = 1 << 20
GROUP_WAIT_S = 0.1            # longest wait inside poll() between checks of the group state
DEFAULT_ASSIGNOR = "range"    # Kafka's default (partition.assignment.strategy)


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
        # consumer groups
        self._membership: Membership | None = None
        self._coordinator_client: CoordinatorClient | None = None
        self._on_assign = self._on_revoke = self._on_lost = None
        self._awaiting: set[TopicPartition] = set()   # assigned; position from the committed offset pending
        self._committed_retry_at = 0.0
        self._awaiting_sync = False
        self._next_auto_commit = time.monotonic() + self.config.auto_commit_interval_ms / 1000.0

    # ================================================================ assignment and positions
    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Replace the assignment; positions of partitions kept in it are kept."""
        self._check_open()
        if self._membership is not None:
            raise InvalidRequestError("assign() on a consumer that subscribed to a group: unsubscribe() first")
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
                discard_ref(ps.ref)
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
        if ps.tp in self._awaiting:
            self._resolve_committed(time.monotonic() + self.config.request_timeout_ms / 1000.0, blocking=True)
        if ps.fetch_offset is None:
            self._reset([ps])
        return ps.position()

    def pending_positions(self) -> set[TopicPartition]:
        """Assigned partitions whose start position still waits for the group's committed offset
        (for instance held back by an open transaction, Kafka's require_stable)."""
        return set(self._awaiting)

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
                    ctx.on_error(tp.topic, tp.partition, leader if isinstance(err, ACTOR_GONE) else None)
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
        nothing arrived). A partition's fetched batches are joined up to 1 MiB per poll; a bigger
        one comes alone, uncopied (the rest follows in the next polls). Retriable errors (leader
        moved, actor restarted) are retried inside;
        `OffsetOutOfRangeError` with auto.offset.reset='none' and non-retriable errors raise."""
        self._check_open()
        group = self._membership is not None
        if not self._parts and not group:
            raise InvalidRequestError("poll() without an assignment: call assign() or subscribe() first")
        deadline = float("inf") if timeout is None else time.monotonic() + max(0.0, timeout)
        if group:
            self._maybe_auto_commit()
        while True:
            if group:
                self._membership.on_poll()
                self._group_step(deadline)
                if self._awaiting:
                    self._resolve_committed(deadline)
            self._reset([ps for ps in self._parts.values() if ps.fetch_offset is None and ps.tp not in self._awaiting])
            now = time.monotonic()
            self._send_fetches(now)
            if any(ps.buffer for ps in self._parts.values()):
                break
            remaining = deadline - now
            if remaining <= 0:
                break
            wait = min(remaining, GROUP_WAIT_S if group else 1.0)
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
                discard_ref(ps.ref)
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
                                  ps.ref_leader if isinstance(err, ACTOR_GONE) else None)
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
                if taken and (part_bytes + nb > min(c.max_partition_fetch_bytes, COALESCE_BYTES) or nb > bytes_left):
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

    # ================================================================ consumer groups
    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None, *,
                  assignor: str | None = None) -> None:
        """Join the consumer group ``config.group_id`` for `topics` (list, or one name). Partitions
        are assigned by the group (``assignor``: "range" (default), "roundrobin" or
        "cooperative-sticky"; default from ``partition_assignment_strategy`` when the config has it).
        Callbacks take ``list[TopicPartition]`` and run inside `poll()`: ``on_revoke`` before
        partitions are taken away (commit here), ``on_assign`` after new ones are added,
        ``on_lost`` when the member was removed (session expired; ``on_revoke`` if not given)."""
        self._check_open()
        group_id = self.config.group_id
        if not group_id:
            raise InvalidRequestError("subscribe() needs config group_id")
        if isinstance(topics, str):
            topics = [topics]
        topics = sorted(set(topics))
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise InvalidRequestError(f"subscribe() needs a non-empty list of topic names, got {topics!r}")
        if self._membership is None and self._parts:
            raise InvalidRequestError("subscribe() on a manually assigned consumer: assign([]) first")
        protocol = assignor or getattr(self.config, "partition_assignment_strategy", None) or DEFAULT_ASSIGNOR
        from ..group.assignors import assignor_for

        assignor_for(protocol)  # validates the name
        if self._membership is not None and self._membership.protocol != protocol:
            raise InvalidRequestError(f"already subscribed with assignor {self._membership.protocol!r}")
        self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
        if self._membership is None:
            c = self.config
            self._membership = Membership(
                group_id, self.context.namespace, session_timeout_ms=c.session_timeout_ms,
                rebalance_timeout_ms=c.max_poll_interval_ms, heartbeat_interval_ms=c.heartbeat_interval_ms,
                max_poll_interval_ms=c.max_poll_interval_ms, request_timeout_ms=c.request_timeout_ms,
                protocol=protocol, client_id=c.client_id)
            self._coordinator_client = self._membership.coordinator
        self._membership.subscribe(topics)

    def subscription(self) -> set[str]:
        return set(self._membership.topics) if self._membership is not None else set()

    def unsubscribe(self) -> None:
        """Revoke everything (callback), leave the group; the consumer can then assign() or subscribe()."""
        self._check_open()
        m = self._membership
        if m is None:
            return
        self._maybe_auto_commit(force=True)
        try:
            if self._parts:
                self._revoke(set(self._parts), commit=False)
        finally:
            m.leave()
            self._membership = None
            self._awaiting.clear()
            self._awaiting_sync = False

    def group_metadata(self) -> GroupMetadata:
        """(group_id, generation_id, member_id) for `Producer.send_offsets_to_transaction` (KIP-447)."""
        group_id = self._require_group()
        if self._membership is None:
            return GroupMetadata(group_id, NO_GENERATION, None)
        return self._membership.group_metadata()

    def commit(self, offsets: dict | None = None, timeout: float | None = None) -> None:
        """Commit ``{TopicPartition: next offset to read}`` (None: the current positions of every
        assigned partition) to the group. A member whose generation is stale gets
        `IllegalGenerationError` / `UnknownMemberIdError` (the group rebalanced: the partitions may
        belong to another member now)."""
        self._check_open()
        group_id = self._require_group()
        if offsets is None:
            offsets = self._positions(self._parts)
        else:
            offsets = {_tp(tp): off for tp, off in offsets.items()}
        if not offsets:
            return
        timeout_s = None if timeout is None else float(timeout)
        if self._membership is not None:
            self._membership.commit(offsets, timeout_s=timeout_s)
        else:
            self._coordinator().call("commit_offsets", group_id, NO_GENERATION, None, offsets, timeout_s=timeout_s)

    def committed(self, partitions: Iterable[TopicPartition], timeout: float | None = None
                  ) -> dict[TopicPartition, int | None]:
        """The group's committed offsets (None: nothing committed). Waits while a partition has
        offsets of an open transaction (require_stable)."""
        self._check_open()
        group_id = self._require_group()
        tps = [_tp(tp) for tp in partitions]
        return self._coordinator().call("fetch_offsets", group_id, tps, True,
                                        timeout_s=None if timeout is None else float(timeout))

    def _require_group(self) -> str:
        if not self.config.group_id:
            raise InvalidRequestError("this consumer has no group_id")
        return self.config.group_id

    def _coordinator(self) -> CoordinatorClient:
        if self._coordinator_client is None:
            self._coordinator_client = CoordinatorClient(self.config.group_id, self.context.namespace,
                                                         self.config.request_timeout_ms)
        return self._coordinator_client

    def _positions(self, tps) -> dict[TopicPartition, int]:
        out = {}
        for tp in list(tps):
            ps = self._parts.get(tp)
            if ps is None or tp in self._awaiting:
                continue
            pos = ps.position()
            if pos is not None:
                out[tp] = pos
        return out

    def _maybe_auto_commit(self, force: bool = False, tps=None) -> None:
        if not self.config.enable_auto_commit or self._membership is None:
            return
        now = time.monotonic()
        if not force and now < self._next_auto_commit:
            return
        self._next_auto_commit = now + self.config.auto_commit_interval_ms / 1000.0
        offsets = self._positions(self._parts if tps is None else tps)
        if not offsets:
            return
        try:
            self._membership.commit(offsets)
        except BaseException as exc:  # noqa: BLE001 - auto-commit is best effort (at-least-once)
            log.info("auto-commit for group %s failed: %s", self.config.group_id, exc)

    def _callback(self, fn, tps) -> None:
        if fn is None:
            return
        try:
            fn(sorted(tps))
        except Exception:  # noqa: BLE001 - a failing callback must not break the membership state
            log.exception("rebalance callback %r failed", fn)
            raise

    def _drop(self, tps) -> None:
        for tp in tps:
            ps = self._parts.pop(tp, None)
            if ps is not None and ps.ref is not None:
                self._refs.pop(ps.ref, None)
                discard_ref(ps.ref)
            self._awaiting.discard(tp)

    def _revoke(self, tps, commit: bool = True) -> None:
        """Stop consuming `tps`: auto-commit them, on_revoke, drop them."""
        tps = set(tps)
        if commit:
            self._maybe_auto_commit(force=True, tps=tps)
        try:
            self._callback(self._on_revoke, tps)
        finally:
            self._drop(tps)

    def _lose_all(self) -> None:
        tps = set(self._parts)
        if not tps:
            return
        try:
            self._callback(self._on_lost if self._on_lost is not None else self._on_revoke, tps)
        finally:
            self._drop(tps)

    def _apply_assignment(self, assignment) -> None:
        owned = set(self._parts)
        new = set(assignment)
        revoked, added = owned - new, new - owned
        if revoked:
            self._revoke(revoked)
        for tp in sorted(added):
            self._parts[tp] = _PartState(tp)
            self._awaiting.add(tp)
        self._committed_retry_at = 0.0
        self._callback(self._on_assign, added)

    def _group_step(self, deadline: float) -> None:
        """Drive the membership: report lost partitions, (re)join, poll sync until the generation
        is complete or `deadline`; runs the rebalance callbacks."""
        m = self._membership
        while True:
            if m.take_lost():
                log.info("group %s: member removed by the coordinator; partitions lost", m.group_id)
                self._lose_all()
                self._awaiting_sync = False
            if m.needs_join():
                if self._parts and not m.is_cooperative:
                    self._revoke(set(self._parts))      # eager: give up everything before rejoining
                try:
                    m.join()
                except (BrokerError, *ACTOR_GONE, GetTimeoutError) as exc:
                    if isinstance(exc, BrokerError) and not exc.retriable and not isinstance(exc, BrokerTimeoutError):
                        raise
                    log.info("join of group %s failed (retrying): %s", m.group_id, exc)
                    return
                self._awaiting_sync = True
                continue
            if not self._awaiting_sync:
                return
            try:
                outcome = m.try_sync()
            except (BrokerError, *ACTOR_GONE, GetTimeoutError) as exc:
                if isinstance(exc, BrokerError) and not exc.retriable and not isinstance(exc, BrokerTimeoutError):
                    raise
                log.info("sync of group %s failed (retrying): %s", m.group_id, exc)
                return
            if outcome is not None:
                self._awaiting_sync = False
                self._apply_assignment(outcome.assignment)
                continue          # a cooperative follow-up may need a join at once
            if m.needs_join() or m.lost:
                if time.monotonic() >= deadline:
                    return
                continue
            if time.monotonic() + SYNC_POLL_S >= deadline:
                return
            time.sleep(SYNC_POLL_S)

    def _resolve_committed(self, deadline: float, blocking: bool = False) -> None:
        """Positions of newly assigned partitions from the group's committed offsets."""
        now = time.monotonic()
        if not self._awaiting or (not blocking and now < self._committed_retry_at):
            return
        tps = sorted(self._awaiting)
        timeout_s = max(0.5, deadline - now) if blocking else min(max(0.5, deadline - now),
                                                                  self.config.request_timeout_ms / 1000.0)
        try:
            got = self._coordinator().call("fetch_offsets", self.config.group_id, tps, True, timeout_s=timeout_s)
        except (UnstableOffsetCommitError, BrokerTimeoutError, *ACTOR_GONE, GetTimeoutError) as exc:
            if blocking:
                raise
            log.debug("committed offsets of %s not available yet: %s", tps, exc)
            self._committed_retry_at = time.monotonic() + RETRY_BACKOFF_S
            return
        except BrokerError as exc:
            if exc.retriable and not blocking:
                self._committed_retry_at = time.monotonic() + RETRY_BACKOFF_S
                return
            raise
        for tp in tps:
            ps = self._parts.get(tp)
            self._awaiting.discard(tp)
            off = got.get(tp)
            if ps is not None and off is not None:
                self._set_position(ps, int(off))

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
            discard_ref(ps.ref)
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
        return isinstance(err, (*ACTOR_GONE, GetTimeoutError))

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequestError("consumer is closed")

    def close(self, leave_group: bool = True, timeout: float | None = None) -> None:
        """Close; a group member commits (auto-commit), revokes and leaves the group (the leave
        call waits at most `timeout` s, default 5). With ``leave_group=False`` it only stops
        heartbeating: its session expires on the coordinator after session_timeout_ms (Kafka's
        CloseOptions REMAIN_IN_GROUP; also how tests fake a crash)."""
        if self._closed:
            return
        m = self._membership
        try:
            if m is not None:
                if leave_group:
                    self._maybe_auto_commit(force=True)
                    try:
                        if self._parts:
                            self._revoke(set(self._parts), commit=False)
                    finally:
                        m.leave(timeout_s=5.0 if timeout is None else timeout)
                else:
                    m.stop_heartbeats()
        finally:
            self._closed = True
            for ref in self._refs:
                discard_ref(ref)
            self._refs.clear()
            self._parts.clear()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


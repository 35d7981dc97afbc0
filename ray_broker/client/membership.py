"""`Membership`: a consumer's side of the consumer-group protocol (classic protocol, server-side assignment).

The coordinator of group ``g`` is the actor ``group-coordinator/<n>`` with
``n = to_positive(murmur2(g)) % cluster_info()["group_coordinators"]``.

Threads
-------
* The consumer's thread (inside ``poll()``) does everything that changes the assignment: join,
  sync, revocation and assignment callbacks.
* A daemon heartbeat thread sends ``heartbeat`` every ``heartbeat_interval_ms``. It never changes
  the assignment: REBALANCE_IN_PROGRESS / ILLEGAL_GENERATION set ``rejoin_needed``;
  UNKNOWN_MEMBER_ID (session expired, removed) marks the member lost. It also enforces
  ``max_poll_interval_ms``: a consumer that has not polled for that long leaves the group (its
  partitions are then lost, reported by the next ``poll()``).

The group decides the assignment when the rebalance completes; ``sync`` answers ``ready=False``
until then, so joining is a short sequence of non-blocking calls polled from ``poll()``.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError

from ..errors import (BrokerError, BrokerTimeoutError, CoordinatorNotAvailableError, ErrorCode,
                      IllegalGenerationError, RebalanceInProgressError, UnknownMemberIdError)
from ..protocol import CONTROLLER_NAME, group_coordinator_name
from .metadata_cache import ACTOR_GONE, discard_ref, unwrap_error
from .partitioner import murmur2, to_positive

log = logging.getLogger(__name__)

__all__ = ["GroupMetadata", "Membership", "CoordinatorClient", "NO_GENERATION"]

NO_GENERATION = -1
RETRY_BACKOFF_S = 0.1
SYNC_POLL_S = 0.05


@dataclass(frozen=True)
class GroupMetadata:
    """What `Producer.send_offsets_to_transaction` needs to fence zombies (KIP-447)."""
    group_id: str
    generation_id: int = NO_GENERATION
    member_id: str | None = None


class CoordinatorClient:
    """Calls the group coordinator of one group, retrying retriable errors and actor restarts."""

    def __init__(self, group_id: str, namespace: str, request_timeout_ms: int):
        self.group_id = group_id
        self.namespace = namespace
        self.request_timeout_s = request_timeout_ms / 1000.0
        self._handle = None
        self._lock = threading.Lock()

    def handle(self, refresh: bool = False):
        with self._lock:
            if self._handle is not None and not refresh:
                return self._handle
        controller = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
        n = ray.get(controller.cluster_info.remote(), timeout=self.request_timeout_s)["group_coordinators"]
        name = group_coordinator_name(to_positive(murmur2(self.group_id.encode())) % n)
        try:
            h = ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            raise CoordinatorNotAvailableError(f"group coordinator {name!r} not found (restarting?)") from None
        with self._lock:
            self._handle = h
        return h

    def call(self, method: str, *args, timeout_s: float | None = None, retry_while=None):
        """`method(*args)` on the coordinator; retriable errors (and any error `retry_while` accepts)
        are retried until `timeout_s` (default request.timeout.ms), then raised."""
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        refresh = False
        while True:
            try:
                h = self.handle(refresh)
                remaining = max(0.001, deadline - time.monotonic())
                ref = getattr(h, method).remote(*args)
                try:
                    return ray.get(ref, timeout=remaining)
                except GetTimeoutError:
                    # collect its late outcome, or Ray logs it as an "unhandled error" when it fails
                    discard_ref(ref)
                    raise
            except BaseException as exc:  # noqa: BLE001 - sorted below
                err = unwrap_error(exc)
                if isinstance(err, ValueError) and not isinstance(err, BrokerError):
                    err = CoordinatorNotAvailableError(str(err))   # controller not found / restarting
                retriable = (isinstance(err, (*ACTOR_GONE, GetTimeoutError))
                             or (isinstance(err, BrokerError) and err.retriable)
                             or (retry_while is not None and retry_while(err)))
                if not retriable:
                    raise err from None
                refresh = isinstance(err, (*ACTOR_GONE, CoordinatorNotAvailableError)) or (
                    isinstance(err, BrokerError) and err.code == ErrorCode.NOT_COORDINATOR)
                if time.monotonic() + RETRY_BACKOFF_S > deadline:
                    if isinstance(err, BrokerError):
                        raise err from None
                    raise BrokerTimeoutError(f"group coordinator {method} for {self.group_id!r}: {err}") from None
                time.sleep(RETRY_BACKOFF_S)


@dataclass
class SyncOutcome:
    assignment: frozenset          # the full assignment of the generation just synced
    generation_id: int


class Membership:
    """Group membership state of one consumer (see the module docstring)."""

    def __init__(self, group_id: str, namespace: str, *, session_timeout_ms: int, rebalance_timeout_ms: int,
                 heartbeat_interval_ms: int, max_poll_interval_ms: int, request_timeout_ms: int,
                 protocol: str, client_id: str = ""):
        self.group_id = group_id
        self.coordinator = CoordinatorClient(group_id, namespace, request_timeout_ms)
        self.session_timeout_ms = session_timeout_ms
        self.rebalance_timeout_ms = rebalance_timeout_ms
        self.heartbeat_interval_s = heartbeat_interval_ms / 1000.0
        self.max_poll_interval_s = max_poll_interval_ms / 1000.0
        self.protocol = protocol
        self.client_id = client_id
        self.topics: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self.member_id: str | None = None
        self.generation_id = NO_GENERATION        # generation being joined / synced (heartbeats use it)
        self.synced_generation = NO_GENERATION    # generation of the assignment owned (commits use it)
        self.stable = False                       # synced the current generation
        self.rejoin_needed = True
        self.lost = False                         # removed by the coordinator: owned partitions are lost
        self.last_poll = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- identity ------------------------------------------------------------------------------
    def group_metadata(self) -> GroupMetadata:
        with self._lock:
            if self.member_id is None:
                return GroupMetadata(self.group_id, NO_GENERATION, None)
            return GroupMetadata(self.group_id, self.synced_generation, self.member_id)

    @property
    def is_cooperative(self) -> bool:
        from ..group.assignors import COOPERATIVE, assignor_for

        return assignor_for(self.protocol).rebalance_protocol == COOPERATIVE

    def subscribe(self, topics) -> None:
        topics = tuple(sorted(set(topics)))
        with self._lock:
            if topics != self.topics:
                self.topics = topics
                self.rejoin_needed = True
        self._start_heartbeats()

    def needs_join(self) -> bool:
        with self._lock:
            return self.rejoin_needed or self.member_id is None or self.lost

    def take_lost(self) -> bool:
        """True once after the coordinator removed this member (its partitions are lost)."""
        with self._lock:
            lost, self.lost = self.lost, False
            if lost:
                self.member_id, self.generation_id, self.stable = None, NO_GENERATION, False
                self.synced_generation = NO_GENERATION
                self.rejoin_needed = True
            return lost

    def request_rejoin(self) -> None:
        with self._lock:
            self.rejoin_needed = True

    def on_poll(self) -> None:
        self.last_poll = time.monotonic()

    # ---- join / sync (consumer thread) ------------------------------------------------------------
    def join(self) -> None:
        """Send JoinGroup (a new member id on the first join, or after removal)."""
        with self._lock:
            member_id = self.member_id
            self.rejoin_needed = False
            self.stable = False
        try:
            res = self.coordinator.call("join_group", self.group_id, member_id, list(self.topics),
                                        self.session_timeout_ms, self.rebalance_timeout_ms, self.protocol,
                                        self.client_id)
        except UnknownMemberIdError:
            with self._lock:      # removed meanwhile: what it owned is lost; join again as a new member
                self.lost = True
            return
        except BaseException:
            with self._lock:
                self.rejoin_needed = True
            raise
        with self._lock:
            self.member_id = res.member_id
            self.generation_id = res.generation_id
            self.last_poll = time.monotonic()

    def try_sync(self) -> SyncOutcome | None:
        """One SyncGroup: the new assignment when the generation is complete, None while it is not
        (or when a rejoin is needed: `needs_join()` tells)."""
        with self._lock:
            member_id, generation = self.member_id, self.generation_id
        if member_id is None:
            return None
        try:
            res = self.coordinator.call("sync_group", self.group_id, member_id, generation)
        except (RebalanceInProgressError, IllegalGenerationError):
            self.request_rejoin()
            return None
        except UnknownMemberIdError:
            with self._lock:
                self.lost = True
            return None
        if not res.ready:
            return None
        with self._lock:
            if self.member_id != member_id or self.generation_id != generation:
                return None  # the heartbeat thread saw a newer state meanwhile
            self.stable = True
            self.synced_generation = generation
            if res.rejoin:
                self.rejoin_needed = True   # cooperative follow-up rebalance: join again at once
        return SyncOutcome(frozenset(res.assignment), res.generation_id)

    def commit(self, offsets: dict, timeout_s: float | None = None) -> dict:
        with self._lock:
            member_id, generation = self.member_id, self.synced_generation
        if member_id is None or generation == NO_GENERATION:
            raise UnknownMemberIdError(f"consumer is not a member of group {self.group_id!r} (rejoining)")
        try:
            return self.coordinator.call("commit_offsets", self.group_id, generation, member_id, offsets,
                                         timeout_s=timeout_s)
        except UnknownMemberIdError:
            with self._lock:
                if self.member_id == member_id:
                    self.lost = True
            raise

    def leave(self, timeout_s: float = 5.0) -> None:
        """LeaveGroup (best effort, at most `timeout_s`) and stop heartbeating."""
        self.stop_heartbeats()
        with self._lock:
            member_id, self.member_id = self.member_id, None
            self.generation_id, self.stable, self.rejoin_needed = NO_GENERATION, False, True
            self.synced_generation = NO_GENERATION
        if member_id is None:
            return
        try:
            self.coordinator.call("leave_group", self.group_id, member_id, timeout_s=max(0.001, timeout_s))
        except BaseException as exc:  # noqa: BLE001 - the session expires anyway
            log.info("leave_group(%s, %s) failed: %s", self.group_id, member_id, exc)

    # ---- heartbeats (background thread) ------------------------------------------------------------
    def _start_heartbeats(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.group_id}",
                                        daemon=True)
        self._thread.start()

    def stop_heartbeats(self) -> None:
        """Stop the heartbeat thread without leaving (the session then expires on the coordinator)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        self._thread = None

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            with self._lock:
                member_id, generation, lost = self.member_id, self.generation_id, self.lost
            if member_id is None or lost:
                continue           # out of the group until the next poll() joins again
            if time.monotonic() - self.last_poll > self.max_poll_interval_s:
                log.warning("consumer of group %s did not poll for max.poll.interval.ms (%d ms): leaving the group",
                            self.group_id, int(self.max_poll_interval_s * 1000))
                try:
                    self.coordinator.call("leave_group", self.group_id, member_id,
                                          timeout_s=max(self.heartbeat_interval_s, self.session_timeout_ms / 3000.0))
                except BaseException as exc:  # noqa: BLE001
                    log.info("leave_group after poll timeout failed: %s", exc)
                with self._lock:
                    if self.member_id == member_id:
                        self.lost = True
                continue
            try:
                self.coordinator.call("heartbeat", self.group_id, member_id, generation,
                                      timeout_s=max(self.heartbeat_interval_s, self.session_timeout_ms / 3000.0))
            except (RebalanceInProgressError, IllegalGenerationError):
                with self._lock:
                    if self.member_id == member_id and self.generation_id == generation:
                        self.rejoin_needed = True
            except UnknownMemberIdError:
                with self._lock:
                    if self.member_id == member_id:
                        self.lost = True
            except BaseException as exc:  # noqa: BLE001 - coordinator away: try again next interval
                log.debug("heartbeat for %s failed: %s", self.group_id, exc)

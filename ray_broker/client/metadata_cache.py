"""Client-side cache of the controller handle, topic metadata and replica actor handles."""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import ray
from ray.exceptions import ActorUnschedulableError, GetTimeoutError, RayActorError, RayTaskError

from ..errors import (BrokerError, BrokerNotFoundError, BrokerTimeoutError, LeaderNotAvailableError,
                      UnknownTopicOrPartitionError)
from ..protocol import CONTROLLER_NAME, NAMESPACE, TopicMetadata, replica_actor_name

__all__ = ["ClientContext", "unwrap_error", "is_retriable", "ACTOR_GONE"]

# A call through a handle whose actor is gone: died (RayActorError), or pinned to a node that is
# gone (ActorUnschedulableError, not a RayActorError: the controller re-creates a replica of a
# removed node under the same name elsewhere). Either way: drop the handle, refresh, retry.
ACTOR_GONE = (RayActorError, ActorUnschedulableError)


def unwrap_error(exc: BaseException) -> BaseException:
    """The `BrokerError` inside a Ray task error (Ray wraps actor exceptions), else `exc`."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BrokerError):
            return cause
    return exc


def discard_ref(ref) -> None:
    """Stop waiting for a call's result but still collect it: a result that is an error and is never
    retrieved makes Ray log an "Unhandled error" when the ref is dropped."""
    if ref is not None:
        ref.future().add_done_callback(_consume_outcome)


def _consume_outcome(fut) -> None:
    if not fut.cancelled():
        fut.exception()


def is_retriable(exc: BaseException) -> bool:
    if isinstance(exc, BrokerError):
        return exc.retriable
    return isinstance(exc, (*ACTOR_GONE, GetTimeoutError))


class ClientContext:
    """Handles and metadata shared by producers and consumers of one broker (Ray namespace).

    Needs Ray to be initialised (`ray.init(address=...)`) unless `address` is given, in which case
    the context connects. Thread-safe.
    """

    def __init__(self, namespace: str = NAMESPACE, address: str | None = None,
                 metadata_timeout_s: float = 30.0):
        if not ray.is_initialized():
            if address is None:
                raise BrokerNotFoundError(
                    "Ray is not initialised: call ray.init(address=...) first or pass address=")
            ray.init(address=address, namespace=namespace, ignore_reinit_error=True)
        self.namespace = namespace
        self.metadata_timeout_s = metadata_timeout_s
        self._lock = threading.RLock()
        self._controller = None
        self._topics: dict[str, TopicMetadata] = {}
        # read-only view for per-record hot paths (a dict lookup instead of a method call)
        self.cached_topics: Mapping[str, TopicMetadata] = self._topics
        self._replicas: dict[tuple[str, int, int], object] = {}

    # ------------------------------------------------------------------------------- controller
    def controller(self, refresh: bool = False):
        """The controller's handle, looked up by name every time (about 0.04 ms): a controller
        that was killed is recreated under the same name as a new actor, and a cached handle to
        the old one would fail forever."""
        try:
            handle = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
        except ValueError:
            raise BrokerNotFoundError(
                f"no broker controller named {CONTROLLER_NAME!r} in Ray namespace {self.namespace!r}") from None
        with self._lock:
            self._controller = handle
        return handle

    def _get_metadata(self, topics: list[str] | None) -> dict[str, TopicMetadata]:
        """Ask the controller, retrying actor errors until `metadata_timeout_s`."""
        deadline = time.monotonic() + self.metadata_timeout_s
        refresh = False
        last: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerTimeoutError(f"metadata request for {topics} timed out: {last}")
            try:
                ctrl = self.controller(refresh=refresh)
                return ray.get(ctrl.get_metadata.remote(topics), timeout=remaining)
            except BrokerNotFoundError as exc:
                last = exc
                if self._controller is None and not refresh:
                    raise
            except GetTimeoutError as exc:
                last = exc
            except (*ACTOR_GONE, RayTaskError, BrokerError) as exc:
                err = unwrap_error(exc)
                if isinstance(err, BrokerError):
                    if not err.retriable:
                        raise err from None
                elif not isinstance(err, ACTOR_GONE):
                    raise
                last = err
            refresh = True
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------------------------- metadata
    def topic_metadata(self, topic: str, refresh: bool = False) -> TopicMetadata:
        if not refresh:
            md = self._topics.get(topic)
            if md is not None:
                return md
        result = self._get_metadata([topic])
        md = result.get(topic) if isinstance(result, dict) else None
        if md is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {topic!r}")
        with self._lock:
            old = self._topics.get(topic)
            if old is not None and old.topic_id != md.topic_id:
                # topic recreated: replica handles may point at dead actors
                for key in [k for k in self._replicas if k[0] == topic]:
                    del self._replicas[key]
            self._topics[topic] = md
        return md

    def metadata(self, topics: list[str] | None = None) -> dict[str, TopicMetadata]:
        """Fresh metadata for `topics` (None = all); updates the cache."""
        result = self._get_metadata(topics)
        with self._lock:
            self._topics.update(result)
        return result

    def invalidate(self, topic: str | None = None) -> None:
        """Forget cached metadata of `topic` (None = all) so the next lookup asks the controller."""
        with self._lock:
            if topic is None:
                self._topics.clear()
            else:
                self._topics.pop(topic, None)

    def num_partitions(self, topic: str) -> int:
        return self.topic_metadata(topic).num_partitions

    def check_partition(self, topic: str, partition: int) -> TopicMetadata:
        """Metadata of `topic`, raising `UnknownTopicOrPartitionError` if `partition` is not in it."""
        md = self.topic_metadata(topic)
        if not isinstance(partition, int) or not 0 <= partition < md.num_partitions:
            md = self.topic_metadata(topic, refresh=True)
            if not isinstance(partition, int) or not 0 <= partition < md.num_partitions:
                raise UnknownTopicOrPartitionError(
                    f"topic {topic!r} has no partition {partition!r} (it has {md.num_partitions})")
        return md

    # ------------------------------------------------------------------------------- replicas
    def replica(self, topic: str, partition: int, replica_id: int):
        key = (topic, partition, replica_id)
        handle = self._replicas.get(key)
        if handle is not None:
            return handle
        name = replica_actor_name(topic, partition, replica_id)
        try:
            handle = ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            raise LeaderNotAvailableError(f"replica actor {name!r} not found") from None
        with self._lock:
            self._replicas[key] = handle
        return handle

    def drop_replica(self, topic: str, partition: int, replica_id: int | None = None) -> None:
        """Forget cached handles (after an actor error: the actor may have been recreated)."""
        with self._lock:
            for key in [k for k in self._replicas
                        if k[0] == topic and k[1] == partition and (replica_id is None or k[2] == replica_id)]:
                del self._replicas[key]

    def leader_handle(self, topic: str, partition: int, refresh: bool = False) -> tuple[int, object]:
        md = self.topic_metadata(topic, refresh=refresh)
        if not 0 <= partition < md.num_partitions:
            raise UnknownTopicOrPartitionError(f"topic {topic!r} has no partition {partition}")
        leader = md.partitions[partition].leader
        if leader is None:
            raise LeaderNotAvailableError(f"partition {topic}-{partition} has no leader right now")
        return leader, self.replica(topic, partition, leader)

    def on_error(self, topic: str, partition: int, replica_id: int | None = None) -> None:
        """A call to a replica failed retriably: forget its handle and the topic's metadata."""
        self.drop_replica(topic, partition, replica_id)
        self.invalidate(topic)

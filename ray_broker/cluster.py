"""`rb.connect()`: attach to a broker on a Ray cluster, or start an embedded one; and the admin client."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping

import ray

from .config import BrokerConfig, ConsumerConfig, ProducerConfig, load_config_file
from .errors import BrokerError, BrokerNotFoundError, BrokerTimeoutError, InvalidConfigError
from .group.lag import ConsumerGroupDescription, group_lag
from .protocol import CONTROLLER_NAME, NAMESPACE, RAY_SYSTEM_CONFIG, TopicDescription
from .records import schema_to_bytes

DEFAULT_DATA_DIR = "./ray_broker_data"


def _broker_config(config: Mapping[str, Any] | str | os.PathLike | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        config = load_config_file(config)
    # validate now, in the caller's process, so a typo fails here and not inside an actor
    return BrokerConfig.from_dict(config).to_dict()


def deploy(namespace: str = NAMESPACE, data_dir: str = DEFAULT_DATA_DIR, config=None, timeout_s: float = 60.0):
    """Start (or find) the controller on the current Ray cluster; returns its handle."""
    from .actors.deployment import start_controller

    return start_controller(namespace, os.path.abspath(data_dir), _broker_config(config), timeout_s)


def find_controller(namespace: str = NAMESPACE):
    from .actors.deployment import ensure_controller

    handle = ensure_controller(namespace)
    if handle is None:
        raise BrokerNotFoundError(
            f"no ray_broker is deployed in Ray namespace {namespace!r}; start one with `ray-broker start`")
    return handle


class Cluster:
    """A connection to one broker deployment; makes admin, producer and consumer clients."""

    def __init__(self, namespace: str, controller, started_ray: bool, data_dir: str | None):
        from .client.metadata_cache import ClientContext

        self.namespace = namespace
        self._controller = controller
        self.data_dir = data_dir
        self._started_ray = started_ray
        self._context = ClientContext(namespace)
        self._clients: list = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def controller(self):
        """The controller's handle, looked up by name each time: a controller killed with
        `ray.kill` is recreated under the same name, and an old handle would stay dead."""
        try:
            self._controller = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
        except ValueError:
            self._controller = find_controller(self.namespace)
        return self._controller

    @controller.setter
    def controller(self, handle) -> None:
        self._controller = handle

    def admin(self) -> "Admin":
        return Admin(self)

    def producer(self, config: Mapping[str, Any] | None = None, **kw):
        from .client.producer import Producer

        p = Producer(self._context, ProducerConfig.from_dict(config, **kw))
        with self._lock:
            self._clients.append(p)
        return p

    def consumer(self, config: Mapping[str, Any] | None = None, **kw):
        from .client.consumer import Consumer

        c = Consumer(self._context, ConsumerConfig.from_dict(config, **kw))
        with self._lock:
            self._clients.append(c)
        return c

    def shutdown(self) -> None:
        """Close clients made here; stop Ray only if `connect` started it."""
        if self._closed:
            return
        self._closed = True
        for c in self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        if self._started_ray:
            try:
                ray.get(self.controller.shutdown_broker.remote(), timeout=10)
            except Exception:  # noqa: BLE001
                pass
            ray.shutdown()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def connect(address: str | None = None, namespace: str = NAMESPACE, data_dir: str | None = None,
            config: Mapping[str, Any] | str | None = None) -> Cluster:
    """Attach to the broker in `namespace`, or start an embedded local Ray and broker.

    - Ray already initialised in this process, or `address` / RAY_ADDRESS given: use that cluster;
      raise BrokerNotFoundError if no broker is deployed there.
    - Otherwise: start a local Ray and a broker storing data in `data_dir` (default ./ray_broker_data).
    """
    broker_config = _broker_config(config)  # fail fast on bad configs
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized() or address:
        if not ray.is_initialized():
            ray.init(address=address, namespace=namespace, logging_level="WARNING", log_to_driver=False)
        return Cluster(namespace, find_controller(namespace), started_ray=False, data_dir=data_dir)
    # address="local": always a new local instance, never whatever cluster happens to run on the machine
    ray.init(address="local", namespace=namespace, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, configure_logging=False, _system_config=dict(RAY_SYSTEM_CONFIG))
    data_dir = os.path.abspath(data_dir or DEFAULT_DATA_DIR)
    controller = deploy(namespace, data_dir, broker_config)
    return Cluster(namespace, controller, started_ray=True, data_dir=data_dir)


class Admin:
    """Topic administration (Kafka's AdminClient, synchronous)."""

    def __init__(self, cluster: Cluster):
        self._cluster = cluster

    def _call(self, method, *args, timeout: float = 120.0, **kw):
        try:
            return ray.get(getattr(self._cluster.controller, method).remote(*args, **kw), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise BrokerTimeoutError(f"admin {method} did not answer within {timeout} s") from None
        except ray.exceptions.RayActorError:
            # the controller restarted mid-call; calls are idempotent or fail cleanly, so retry once
            time.sleep(1.0)
            return ray.get(getattr(self._cluster.controller, method).remote(*args, **kw), timeout=timeout)

    def create_topic(self, name: str, partitions: int | None = None, replication_factor: int | None = None,
                     config: Mapping[str, Any] | None = None, schema=None) -> TopicDescription:
        """Create a topic; partitions / replication factor default to the broker's num.partitions and
        default.replication.factor."""
        if config is not None and not isinstance(config, Mapping):
            raise InvalidConfigError(f"topic config must be a mapping, got {type(config).__name__}")
        from .records import validate_user_schema

        schema_bytes = None if schema is None else schema_to_bytes(validate_user_schema(schema))
        self._call("create_topic", name, partitions, replication_factor, dict(config or {}), schema_bytes)
        self._cluster._context.invalidate(name)
        return self.describe_topic(name)

    def delete_topic(self, name: str) -> None:
        self._call("delete_topic", name)
        self._cluster._context.invalidate(name)

    def list_topics(self, include_internal: bool = False) -> list[str]:
        return self._call("list_topics", include_internal)

    def describe_topic(self, name: str) -> TopicDescription:
        return self._call("describe_topic", name)

    # ---- transactions (Kafka's KIP-664 tooling) ------------------------------------------------
    def _coordinator_call(self, name: str, method: str, *args, timeout: float = 60.0):
        """`method(*args)` on the coordinator actor `name`, retried while it is restarting, being
        recreated or loading (retriable errors) until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = ray.get_actor(name, namespace=self._cluster.namespace)
                return ray.get(getattr(h, method).remote(*args), timeout=max(0.001, deadline - time.monotonic()))
            except BaseException as exc:  # noqa: BLE001 - sorted below
                from .client.metadata_cache import unwrap_error

                err = unwrap_error(exc)
                retriable = isinstance(err, (ray.exceptions.RayActorError, ValueError)) or (
                    isinstance(err, BrokerError) and err.retriable)
                if not retriable:
                    raise err from None
                if time.monotonic() + 0.2 > deadline:
                    raise BrokerTimeoutError(f"admin {method} on {name}: {err}") from None
                time.sleep(0.2)

    def _txn_coordinator_names(self) -> list[str]:
        from .protocol import txn_coordinator_name

        return [txn_coordinator_name(i) for i in range(self._call("cluster_info")["transaction_coordinators"])]

    def _txn_coordinator_for(self, transactional_id: str) -> str:
        from .client.partitioner import murmur2, to_positive

        names = self._txn_coordinator_names()
        return names[to_positive(murmur2(transactional_id.encode())) % len(names)]

    def list_transactions(self, timeout: float = 60.0) -> list:
        """Every transactional id the coordinators know: state, partitions, start time, producer id/epoch.
        `timeout`: per coordinator, retrying while it restarts or loads."""
        out = []
        for name in self._txn_coordinator_names():
            out.extend(self._coordinator_call(name, "list_transactions", timeout=timeout))
        return sorted(out, key=lambda d: d.transactional_id)

    def describe_transaction(self, transactional_id: str):
        desc = self._coordinator_call(self._txn_coordinator_for(transactional_id), "describe_transaction",
                                      transactional_id)
        if desc is None:
            from .errors import InvalidRequestError

            raise InvalidRequestError(f"unknown transactional id {transactional_id!r}")
        return desc

    def abort_transaction(self, transactional_id: str) -> None:
        """Abort a hanging transaction (its producer is fenced); for operators."""
        self._coordinator_call(self._txn_coordinator_for(transactional_id), "abort_transaction", transactional_id)

    # ---- consumer groups --------------------------------------------------------------------
    def _group_coordinator_names(self) -> list[str]:
        from .protocol import group_coordinator_name

        return [group_coordinator_name(i) for i in range(self._call("cluster_info")["group_coordinators"])]

    def _group_coordinator(self, group_id: str) -> str:
        from .client.partitioner import murmur2, to_positive

        names = self._group_coordinator_names()
        return names[to_positive(murmur2(group_id.encode())) % len(names)]

    def list_groups(self, timeout: float = 60.0) -> list:
        """Every group the coordinators know (`timeout`: per coordinator, as list_transactions)."""
        out = []
        for name in self._group_coordinator_names():
            out.extend(self._coordinator_call(name, "list_groups", timeout=timeout))
        return sorted(out, key=lambda g: getattr(g, "group_id", g))

    def describe_group(self, group_id: str, timeout: float = 60.0,
                       last_stable_offsets: dict | None = None) -> "ConsumerGroupDescription":
        """Members, assignment, committed offsets and, in ``.partitions``, per partition the owner,
        committed offset, last stable offset and lag (LSO - committed: what a read_committed
        member still has to read; None when nothing is committed or the leader is unavailable).
        `last_stable_offsets` ({(topic, partition): LSO}): a caller that has just described the
        topics passes them, instead of one lookup per topic here."""
        desc = self._coordinator_call(self._group_coordinator(group_id), "describe_group", group_id,
                                      timeout=timeout)
        lso = last_stable_offsets
        if lso is None:
            tps = set(desc.offsets) | set(desc.pending_offsets)
            for m in desc.members:
                tps.update(m.assignment)
            lso = {}
            for topic in sorted({tp.topic for tp in tps}):
                try:
                    for p in self.describe_topic(topic).partitions:
                        lso[(topic, p.partition)] = p.last_stable_offset
                except Exception:  # noqa: BLE001 - a deleted topic: no lag
                    pass
        return ConsumerGroupDescription(**{f: getattr(desc, f) for f in desc.__dataclass_fields__},
                                        partitions=group_lag(desc, lso))

    def reset_offsets(self, group_id: str, offsets) -> None:
        """Set committed offsets ({TopicPartition: offset}); refused while the group has live members."""
        self._coordinator_call(self._group_coordinator(group_id), "reset_offsets", group_id, dict(offsets))

    def delete_group(self, group_id: str) -> None:
        self._coordinator_call(self._group_coordinator(group_id), "delete_group", group_id)

    def alter_topic_schema(self, name: str, schema) -> None:
        """Evolve a schema'd topic: only new nullable columns may be added."""
        self._call("alter_topic_schema", name, schema_to_bytes(schema))
        self._cluster._context.invalidate(name)

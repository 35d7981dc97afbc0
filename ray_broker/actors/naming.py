"""Actor names and placement options: one place that knows how broker actors are found and pinned."""
from __future__ import annotations

from typing import Any

import ray

from ..errors import BrokerError
from ..protocol import CONTROLLER_NAME, NAMESPACE, replica_actor_name  # noqa: F401  (re-exported)

HEAD_RESOURCE = "node:__internal_head__"


def head_node_id() -> str | None:
    for node in ray.nodes():
        if node.get("Alive") and HEAD_RESOURCE in node.get("Resources", {}):
            return node["NodeID"]
    return None


def alive_node_ids() -> list[str]:
    """Alive nodes, head first, then by id (a stable order for placement)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    head = [n["NodeID"] for n in nodes if HEAD_RESOURCE in n.get("Resources", {})]
    rest = sorted(n["NodeID"] for n in nodes if HEAD_RESOURCE not in n.get("Resources", {}))
    return head + rest


def broker_actor_options(name: str, namespace: str, max_concurrency: int = 1000) -> dict:
    """What every broker actor is started with: named and detached (it outlives the driver that
    deployed it), restarted by Ray without limit, its calls never retried by Ray (callers retry with
    our own fencing), no CPU reserved (the broker's actors mostly wait on I/O)."""
    return {"name": name, "namespace": namespace, "lifetime": "detached", "max_restarts": -1,
            "max_task_retries": 0, "num_cpus": 0, "max_concurrency": max_concurrency}


def pinned(node_id: str | None) -> dict:
    """Options that pin an actor to a node (hard affinity; soft affinity did not hold in our tests)."""
    if node_id is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


class NamedActors:
    """Handles of named actors, looked up once per name.

    `ray.get_actor` is a blocking round trip to the GCS: 1.6 ms measured inside an actor, where it
    also stalls the event loop. The transaction paths needed one per partition per transaction
    (a leader adding its partition, the coordinator writing markers). A name may get a new actor
    behind it (the controller recreates killed actors), so a call through a cached handle that
    fails for any reason but a broker error (which proves the actor answered) forgets the handle;
    the caller's retry looks the name up again."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self._handles: dict[str, Any] = {}

    def get(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = ray.get_actor(name, namespace=self.namespace)
        return handle

    def forget(self, name: str) -> None:
        self._handles.pop(name, None)

    async def call(self, name: str, method: str, *args):
        """`await actor.method.remote(*args)` on the named actor."""
        try:
            return await getattr(self.get(name), method).remote(*args)
        except BrokerError:
            raise
        except Exception:
            self.forget(name)
            raise

"""Actor names and placement options: one place that knows how broker actors are found and pinned."""
from __future__ import annotations

import ray

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


def pinned(node_id: str | None) -> dict:
    """Options that pin an actor to a node (hard affinity; soft affinity did not hold in our tests)."""
    if node_id is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}

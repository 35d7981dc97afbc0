"""Cluster metadata owned by the controller: topics, assignment, leaders, ISR, epochs.

Pure and JSON-persistable; every method either changes state consistently or raises a BrokerError
and changes nothing. The actor persists after each change (`to_json`) before acting on it.
"""
from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field

from ..config import BrokerConfig, TopicConfig
from ..errors import (FencedLeaderEpochError, InvalidConfigError, InvalidPartitionsError,
                      InvalidReplicationFactorError, TopicAlreadyExistsError, UnknownTopicOrPartitionError)
from ..protocol import PartitionState, TopicMetadata
from ..records import schema_from_bytes, schema_to_bytes, validate_topic_name, validate_user_schema

FORMAT_VERSION = 1


@dataclass
class ReplicaPlacement:
    node_id: str | None          # Ray node id hex; None = anywhere (one-node cluster)
    incarnation: int = 0         # bumped when the replica moves to a new node (its old disk is gone)


@dataclass
class PartitionRecord:
    replicas: list[int]
    leader: int | None
    leader_epoch: int
    isr: list[int]
    placement: dict[int, ReplicaPlacement] = field(default_factory=dict)

    def state(self, partition: int) -> PartitionState:
        pl = self.placement.get(self.leader) if self.leader is not None else None
        return PartitionState(partition, tuple(self.replicas), self.leader, self.leader_epoch, tuple(self.isr),
                              pl.node_id if pl is not None else None)


@dataclass
class TopicRecord:
    name: str
    topic_id: str
    partitions: list[PartitionRecord]
    config: dict
    schema: bytes | None
    internal: bool = False

    def metadata(self) -> TopicMetadata:
        return TopicMetadata(self.name, self.topic_id,
                             tuple(p.state(i) for i, p in enumerate(self.partitions)),
                             dict(self.config), self.schema, self.internal)


class ClusterState:
    def __init__(self, broker_config: BrokerConfig | None = None):
        self.broker_config = broker_config or BrokerConfig()
        self.controller_epoch = 0
        self.topics: dict[str, TopicRecord] = {}
        self.next_producer_id = 0
        # coordinator "kind/index" -> [producer_id, epoch]: the id a coordinator writes its log with,
        # and an epoch bumped at every (re)load so a stale coordinator is fenced
        self.coordinators: dict[str, list[int]] = {}

    # ---- topics -------------------------------------------------------------------------------
    def validate_new_topic(self, name, partitions, replication_factor, config, schema, alive_nodes: int,
                           internal: bool = False) -> tuple[TopicConfig, bytes | None]:
        validate_topic_name(name, internal_ok=internal)
        if name in self.topics:
            raise TopicAlreadyExistsError(f"topic {name!r} already exists")
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise InvalidPartitionsError(f"partitions must be an integer >= 1, got {partitions!r}")
        if isinstance(replication_factor, bool) or not isinstance(replication_factor, int) or replication_factor < 1:
            raise InvalidReplicationFactorError(
                f"replication factor must be an integer >= 1, got {replication_factor!r}")
        limit = self.broker_config.replication_factor_max if alive_nodes <= 1 else alive_nodes
        if replication_factor > limit:
            why = (f"replication.factor.max is {limit} on a one-node cluster" if alive_nodes <= 1
                   else f"only {alive_nodes} nodes are alive")
            raise InvalidReplicationFactorError(f"replication factor {replication_factor} is too large: {why}")
        topic_config = self.broker_config.topic_defaults().with_overrides(config or {})
        if topic_config.min_insync_replicas > replication_factor:
            raise InvalidConfigError(f"min.insync.replicas {topic_config.min_insync_replicas} exceeds the "
                                     f"replication factor {replication_factor}")
        schema_bytes = None
        if schema is not None:
            schema_bytes = schema_to_bytes(validate_user_schema(schema))
        return topic_config, schema_bytes

    def add_topic(self, name: str, partitions: int, replication_factor: int, topic_config: TopicConfig,
                  schema_bytes: bytes | None, nodes: list[str | None], internal: bool = False) -> TopicRecord:
        records = []
        for p in range(partitions):
            replicas = list(range(replication_factor))
            leader = p % replication_factor
            placement = {}
            for r in replicas:
                node = nodes[(p + r) % len(nodes)] if len(nodes) > 1 else (nodes[0] if nodes else None)
                placement[r] = ReplicaPlacement(node)
            records.append(PartitionRecord(replicas, leader, 0, list(replicas), placement))
        topic = TopicRecord(name, uuid.uuid4().hex, records, topic_config.to_dict(), schema_bytes, internal)
        self.topics[name] = topic
        return topic

    def topic(self, name: str) -> TopicRecord:
        try:
            return self.topics[name]
        except KeyError:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}") from None

    def partition(self, name: str, partition: int) -> PartitionRecord:
        t = self.topic(name)
        if not 0 <= partition < len(t.partitions):
            raise UnknownTopicOrPartitionError(f"topic {name!r} has no partition {partition}")
        return t.partitions[partition]

    def remove_topic(self, name: str) -> TopicRecord:
        return self.topics.pop(self.topic(name).name)

    def set_schema(self, name: str, schema_bytes: bytes) -> None:
        self.topic(name).schema = schema_bytes

    # ---- leadership ---------------------------------------------------------------------------
    def elect_leader(self, name: str, partition: int, usable: set[int]) -> bool:
        """Make a usable in-sync replica the leader (bumping the epoch) if the leader is not usable.

        `usable` = replicas alive and holding their log (not offline, not rebuilding). Returns True
        when the partition state changed. With no usable ISR member the partition goes offline
        (leader None) unless unclean election is enabled for the topic.
        """
        t = self.topic(name)
        p = t.partitions[partition]
        if p.leader is not None and p.leader in usable:
            return False
        candidates = [r for r in p.isr if r in usable and r != p.leader]
        if not candidates and t.config.get("unclean_leader_election_enable"):
            candidates = [r for r in p.replicas if r in usable]
            if candidates:
                p.isr = [candidates[0]]
        if candidates:
            # prefer the preferred replica (partition % rf) when it is eligible, else the first in the ISR
            preferred = partition % len(p.replicas)
            new_leader = preferred if preferred in candidates else candidates[0]
        else:
            new_leader = None
        if new_leader == p.leader:
            return False
        p.leader = new_leader
        p.leader_epoch += 1
        if new_leader is not None:
            # replicas that are not usable cannot count as in sync for the new leader
            p.isr = sorted(r for r in p.isr if r in usable or r == new_leader)
        return True

    def reconcile_partition(self, name: str, partition: int, alive: set[int], usable: set[int],
                            starting: set[int], restarted: set[int]) -> bool:
        """Decide one partition from what the controller saw this round. Returns True on a change.

        alive: replicas that answered; usable: alive and holding their log; starting: not answering
        but created recently (no verdict yet); restarted: alive with a new process since last round.
        """
        p = self.partition(name, partition)
        if p.leader is not None and p.leader not in alive and p.leader in starting:
            return False                       # the leader is still starting: no election yet
        changed = False
        if p.leader is not None and p.leader in restarted:
            # The leader process restarted and lost its in-memory state: prefer another in-sync
            # replica; if there is none it leads again, at a new epoch.
            others = usable - {p.leader}
            if any(r in p.isr for r in others):
                changed |= self.elect_leader(name, partition, others)
            else:
                self.bump_leader_epoch(name, partition)
                changed = True
        changed |= self.elect_leader(name, partition, usable)
        if p.leader is None or p.leader not in alive:
            # Offline: keep the ISR as it is. Shrinking it now could empty it, and a partition with
            # an empty ISR could never elect a leader again.
            return changed
        for r in list(p.isr):
            if r != p.leader and r not in alive and r not in starting:
                changed |= self.remove_from_isr(name, partition, r)
        return changed

    def bump_leader_epoch(self, name: str, partition: int) -> None:
        self.partition(name, partition).leader_epoch += 1

    def alter_isr(self, name: str, partition: int, leader: int, leader_epoch: int, new_isr) -> PartitionState:
        p = self.partition(name, partition)
        if p.leader != leader or p.leader_epoch != leader_epoch:
            raise FencedLeaderEpochError(
                f"{name}/{partition}: ISR change from replica {leader} at epoch {leader_epoch} is stale "
                f"(leader {p.leader}, epoch {p.leader_epoch})")
        new = sorted(set(int(r) for r in new_isr) & set(p.replicas) | {leader})
        p.isr = new
        return p.state(partition)

    def remove_from_isr(self, name: str, partition: int, replica: int) -> bool:
        p = self.partition(name, partition)
        if replica in p.isr and replica != p.leader:
            p.isr = [r for r in p.isr if r != replica]
            return True
        return False

    def move_replica(self, name: str, partition: int, replica: int, node_id: str | None) -> None:
        """Place a replica on another node: it starts with an empty log (a new incarnation).

        It leaves the ISR, and leadership if it led: an empty replica leading would make its
        followers truncate to nothing. The next reconcile elects another in-sync replica; if it was
        the only one, the partition is offline (Kafka's clean-election rule; see
        unclean.leader.election.enable)."""
        p = self.partition(name, partition)
        old = p.placement.get(replica, ReplicaPlacement(None))
        p.placement[replica] = ReplicaPlacement(node_id, old.incarnation + 1)
        p.isr = [r for r in p.isr if r != replica]
        if p.leader == replica:
            p.leader = None

    # ---- producer ids -------------------------------------------------------------------------
    def allocate_producer_ids(self, count: int) -> int:
        """Reserve `count` producer ids; persisted before they are handed out, so never reused."""
        first = self.next_producer_id
        self.next_producer_id += count
        return first

    def next_coordinator_identity(self, kind: str, index: int) -> tuple[int, int]:
        key = f"{kind}/{index}"
        if key not in self.coordinators:
            self.coordinators[key] = [self.allocate_producer_ids(1), -1]
        self.coordinators[key][1] += 1
        return tuple(self.coordinators[key])

    # ---- persistence --------------------------------------------------------------------------
    def to_json(self) -> bytes:
        def part(p: PartitionRecord):
            return {"replicas": p.replicas, "leader": p.leader, "leader_epoch": p.leader_epoch, "isr": p.isr,
                    "placement": {str(r): [pl.node_id, pl.incarnation] for r, pl in p.placement.items()}}

        doc = {
            "format_version": FORMAT_VERSION,
            "controller_epoch": self.controller_epoch,
            "next_producer_id": self.next_producer_id,
            "coordinators": self.coordinators,
            "topics": {
                n: {"topic_id": t.topic_id, "config": t.config, "internal": t.internal,
                    "schema": None if t.schema is None else base64.b64encode(t.schema).decode(),
                    "partitions": [part(p) for p in t.partitions]}
                for n, t in self.topics.items()
            },
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, broker_config: BrokerConfig | None = None) -> "ClusterState":
        doc = json.loads(data)
        if doc.get("format_version") != FORMAT_VERSION:
            raise InvalidConfigError(f"controller metadata format {doc.get('format_version')} is not supported "
                                     f"(this version reads {FORMAT_VERSION})")
        state = cls(broker_config)
        state.controller_epoch = doc["controller_epoch"]
        state.next_producer_id = doc.get("next_producer_id", 0)
        state.coordinators = {k: list(v) for k, v in doc.get("coordinators", {}).items()}
        for name, t in doc["topics"].items():
            parts = [PartitionRecord(p["replicas"], p["leader"], p["leader_epoch"], p["isr"],
                                     {int(r): ReplicaPlacement(v[0], v[1]) for r, v in p["placement"].items()})
                     for p in t["partitions"]]
            schema = None if t["schema"] is None else base64.b64decode(t["schema"])
            state.topics[name] = TopicRecord(name, t["topic_id"], parts, t["config"], schema, t.get("internal", False))
        return state


def user_schema(topic: TopicRecord):
    return schema_from_bytes(topic.schema)

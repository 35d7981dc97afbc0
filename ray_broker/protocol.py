"""Request/response shapes that cross actor boundaries (pure; no Ray import).

Cluster metadata is owned by the controller; produce/fetch results come from partition leaders.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

NO_PRODUCER_ID = -1
NO_PRODUCER_EPOCH = -1
NO_SEQUENCE = -1

ACKS_ALL = -1

READ_COMMITTED = "read_committed"
READ_UNCOMMITTED = "read_uncommitted"

NAMESPACE = "ray_broker"
# Ray settings for the clusters ray_broker starts itself (embedded `connect()`, `ray-broker start`).
# Call arguments up to max_direct_call_object_size travel inline with the call instead of through
# the object store; Ray's default is 100 KiB, and a produce call of 100-512 KiB (a lingered batch of
# a few thousand records) then cost ~2 ms of CPU on each side instead of ~1 (measured here), so
# W1 went from 223k/247k to 311k/308k records/s, W2 +11-14 % (alternating runs). Larger batches
# still go through the object store (inline copies cost more above ~1 MiB). On a cluster you run
# yourself, pass the same to `ray start --system-config`.
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 512 * 1024}
CONTROLLER_NAME = "controller"


def replica_actor_name(topic: str, partition: int, replica: int) -> str:
    return f"replica/{topic}/{partition}/{replica}"


def txn_coordinator_name(n: int) -> str:
    return f"txn-coordinator/{n}"


def group_coordinator_name(n: int) -> str:
    return f"group-coordinator/{n}"


TXN_STATE_TOPIC = "__transaction_state"
OFFSETS_TOPIC = "__consumer_offsets"


@dataclass(frozen=True)
class PartitionState:
    """Controller's view of one partition: who leads, who is in sync, at which leader epoch."""
    partition: int
    replicas: tuple[int, ...]
    leader: int | None
    leader_epoch: int
    isr: tuple[int, ...]
    leader_node: str | None = None  # Ray node id of the leader's placement; None = not pinned (one node)


@dataclass(frozen=True)
class TopicMetadata:
    name: str
    topic_id: str                  # changes when a topic is deleted and created again
    partitions: tuple[PartitionState, ...]
    config: dict                   # the topic's effective TopicConfig as a dict
    schema: bytes | None           # serialized pyarrow.Schema of user columns; None = default record model
    internal: bool = False

    @property
    def num_partitions(self) -> int:
        return len(self.partitions)


@dataclass(frozen=True)
class PartitionDescription:
    partition: int
    leader: int | None
    replicas: list[int]
    isr: list[int]
    leader_epoch: int
    log_start_offset: int
    high_watermark: int
    last_stable_offset: int


@dataclass(frozen=True)
class TopicDescription:
    name: str
    topic_id: str
    partitions: list[PartitionDescription]
    config: dict
    schema: pa.Schema | None
    internal: bool = False


@dataclass(frozen=True)
class ProduceResult:
    base_offset: int               # offset of the batch's first record (-1 with acks=0)
    log_start_offset: int = 0
    duplicate: bool = False        # a retry of an already-appended batch: original offsets returned


@dataclass
class FetchResult:
    batches: list[pa.RecordBatch] = field(default_factory=list)  # read schema (offset first)
    high_watermark: int = 0
    last_stable_offset: int = 0
    log_start_offset: int = 0
    # where the consumer continues: past the returned records and past anything skipped
    # (control batches, aborted data), never past the HW / LSO.
    next_offset: int = 0

"""Typed configs, one per component, with Kafka's key names and meanings.

Keys may be given Kafka-style (`linger.ms`) or snake_case (`linger_ms`); both mean the same field.
Unknown keys and out-of-range values raise `InvalidConfigError` naming the key, so a typo in a YAML
file is caught at start-up instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, TypeVar

from .errors import InvalidConfigError

MiB = 1024 * 1024
C = TypeVar("C", bound="_Config")


def _key(name: str) -> str:
    return name.strip().lower().replace(".", "_").replace("-", "_")


def _opt(default, doc: str, check: Callable[[Any], bool] | None = None, kafka_default: str | None = None):
    """A config field: `doc` is shown in the README table; `kafka_default` marks a deliberate difference."""
    meta = {"doc": doc, "check": check, "kafka_default": kafka_default}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _coerce(value: Any, target: Any, key: str) -> Any:
    """Accept strings from YAML/CLI for ints, floats and bools."""
    if value is None:
        return None
    if target in ("bool", bool) or target == "bool | None":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise InvalidConfigError(f"config {key!r}: expected a boolean, got {value!r}")
    if target in ("int", int) or target == "int | None":
        if isinstance(value, bool):
            raise InvalidConfigError(f"config {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise InvalidConfigError(f"config {key!r}: expected an integer, got {value!r}")
    if target in ("float", float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InvalidConfigError(f"config {key!r}: expected a number, got {value!r}") from None
    if target in ("str", str) or target == "str | None":
        if not isinstance(value, str):
            raise InvalidConfigError(f"config {key!r}: expected a string, got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class _Config:
    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls: type[C], config: Mapping[str, Any] | None = None, **overrides: Any) -> C:
        """Build from Kafka-style and/or snake_case keys; unknown keys raise InvalidConfigError."""
        merged: dict[str, Any] = {}
        for source in (config or {}), overrides:
            if not isinstance(source, Mapping):
                raise InvalidConfigError(f"config must be a mapping, got {type(source).__name__}")
            for raw, value in source.items():
                merged[_key(str(raw))] = value
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(merged) - set(known))
        if unknown:
            raise InvalidConfigError(
                f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        kwargs = {k: _coerce(v, known[k].type, k) for k, v in merged.items()}
        return cls(**kwargs)

    def with_overrides(self: C, config: Mapping[str, Any] | None = None, **overrides: Any) -> C:
        base = dataclasses.asdict(self)
        base.update({_key(k): v for k, v in (config or {}).items()})
        base.update({_key(k): v for k, v in overrides.items()})
        return type(self).from_dict(base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and value is not None and not check(value):
                raise InvalidConfigError(f"config {f.name.replace('_', '.')!r}: invalid value {value!r} "
                                         f"({f.metadata.get('doc', '')})")
        self._validate()

    def _validate(self) -> None:
        pass


COMPRESSION_TYPES = ("none", "lz4", "zstd")
FLUSH_DEFAULT = 2**63 - 1  # Kafka's "leave it to the OS"


@dataclass(frozen=True)
class TopicConfig(_Config):
    """Per-topic log configs (Kafka topic-level names)."""
    segment_bytes: int = _opt(256 * MiB, "roll a segment when it reaches this size", _positive,
                              kafka_default="1 GiB")
    segment_ms: int = _opt(7 * 24 * 3600 * 1000, "roll a segment older than this", _positive)
    retention_ms: int = _opt(7 * 24 * 3600 * 1000, "delete whole segments older than this; -1 keeps forever",
                             lambda v: v == -1 or v >= 0)
    retention_bytes: int = _opt(-1, "delete oldest segments while the log is larger; -1 unlimited",
                                lambda v: v == -1 or v >= 0)
    max_message_bytes: int = _opt(8 * MiB, "largest record batch accepted", _positive, kafka_default="1 MiB")
    min_insync_replicas: int = _opt(1, "acks=all needs at least this many in-sync replicas", _positive)
    compression_type: str = _opt("none", "none, lz4 or zstd (Arrow IPC buffer compression)",
                                 lambda v: v in COMPRESSION_TYPES, kafka_default="producer")
    flush_messages: int = _opt(FLUSH_DEFAULT, "fsync after this many batches; 1 = every batch", _positive)
    flush_ms: int = _opt(FLUSH_DEFAULT, "fsync when the last fsync is older than this", _positive)
    unclean_leader_election_enable: bool = _opt(False, "allow an out-of-sync replica to become leader")
    cleanup_policy: str = _opt("delete", "only 'delete' (retention) is supported", lambda v: v == "delete")


@dataclass(frozen=True)
class BrokerConfig(_Config):
    """Cluster-wide broker configs; topic defaults use the topic-level names."""
    replication_factor_max: int = _opt(5, "largest replication factor on a one-node cluster", _positive)
    default_replication_factor: int = _opt(1, "replication factor when none is given", _positive)
    num_partitions: int = _opt(1, "partitions when none are given", _positive)
    replica_lag_time_max_ms: int = _opt(10_000, "a follower not caught up for this long leaves the ISR",
                                        _positive, kafka_default="30000")
    replica_health_check_interval_ms: int = _opt(500, "how often the controller polls replica state (a replica's death is seen at once)", _positive)
    replica_session_timeout_ms: int = _opt(
        9_000, "a replica alive but answering no poll for this long counts as failed and loses its "
        "role (as Kafka's broker.session.timeout.ms); a dead one is seen at once", _positive)
    transaction_max_timeout_ms: int = _opt(900_000, "largest transaction.timeout.ms a producer may ask", _positive)
    transaction_coordinators: int = _opt(1, "number of transaction coordinator actors (fixed at creation)",
                                         _positive)
    group_coordinators: int = _opt(1, "number of group coordinator actors (fixed at creation)", _positive)
    coordinator_session_timeout_ms: int = _opt(
        9_000, "a coordinator answering no heartbeat for this long is killed and replaced (as Kafka's "
        "broker.session.timeout.ms fences a silent broker)", _positive)
    producer_id_expiration_ms: int = _opt(86_400_000, "forget idle producer ids after this", _positive)
    transactional_id_expiration_ms: int = _opt(604_800_000, "forget idle transactional ids after this", _positive)
    # topic defaults
    segment_bytes: int = _opt(256 * MiB, "default segment.bytes", _positive)
    segment_ms: int = _opt(7 * 24 * 3600 * 1000, "default segment.ms", _positive)
    retention_ms: int = _opt(7 * 24 * 3600 * 1000, "default retention.ms", lambda v: v == -1 or v >= 0)
    retention_bytes: int = _opt(-1, "default retention.bytes", lambda v: v == -1 or v >= 0)
    max_message_bytes: int = _opt(8 * MiB, "default max.message.bytes", _positive)
    min_insync_replicas: int = _opt(1, "default min.insync.replicas", _positive)
    compression_type: str = _opt("none", "default compression.type", lambda v: v in COMPRESSION_TYPES)
    flush_messages: int = _opt(FLUSH_DEFAULT, "default flush.messages", _positive)
    flush_ms: int = _opt(FLUSH_DEFAULT, "default flush.ms", _positive)
    unclean_leader_election_enable: bool = _opt(False, "default unclean.leader.election.enable")

    def topic_defaults(self) -> TopicConfig:
        names = TopicConfig.keys()
        return TopicConfig.from_dict({k: v for k, v in self.to_dict().items() if k in names})


ACKS = {"all": -1, "-1": -1, -1: -1, "1": 1, 1: 1, "0": 0, 0: 0}


@dataclass(frozen=True)
class ProducerConfig(_Config):
    acks: Any = _opt("all", "0, 1 or all", lambda v: v in ACKS)
    enable_idempotence: bool | None = _opt(None, "deduplicate retries with producer id + sequence (default: on "
                                               "when acks=all, off with a warning for acks 0/1)")
    linger_ms: int = _opt(5, "wait this long for more records before sending a batch", _non_negative)
    batch_size: int = _opt(1 * MiB, "send a partition's batch when it reaches this many bytes", _positive,
                           kafka_default="16384")
    max_in_flight_requests_per_connection: int = _opt(5, "full batches in flight per partition (a batch sent "
                                                      "for its linger waits for the call in flight)",
                                                      lambda v: 1 <= v <= 5)
    max_lingered_requests_per_node: int = _opt(
        2, "batches sent for their linger (not full) in flight per leader node, across partitions; the "
           "oldest waits its turn and grows (Kafka sends one request per broker for all its partitions, "
           "here every partition is its own call)", _positive)
    delivery_timeout_ms: int = _opt(120_000, "give up on a record after this long (retries included)", _positive)
    request_timeout_ms: int = _opt(30_000, "wait this long for one produce call", _positive)
    retry_backoff_ms: int = _opt(100, "wait between retries", _non_negative)
    buffer_memory: int = _opt(64 * MiB, "bytes of records queued or awaiting acknowledgement before send() blocks; "
                              "a send() record counts its bytes plus 144 of Python object overhead "
                              "(a record larger than this is refused)",
                              _positive, kafka_default="33554432")
    max_block_ms: int = _opt(60_000, "how long send() may block on a full buffer or missing metadata",
                             _non_negative)
    max_message_bytes: int = _opt(8 * MiB, "largest batch the producer sends (send_batch splits above it)",
                                  _positive, kafka_default="max.request.size 1 MiB")
    compression_type: str = _opt("none", "none, lz4 or zstd", lambda v: v in COMPRESSION_TYPES)
    transactional_id: str | None = _opt(None, "stable id for transactions; fences older instances")
    transaction_timeout_ms: int = _opt(60_000, "coordinator aborts a transaction open longer", _positive)
    client_id: str = _opt("", "name shown in logs and metrics")

    @property
    def acks_value(self) -> int:
        return ACKS[self.acks]

    @property
    def idempotence_enabled(self) -> bool:
        """On by default with acks=all (Kafka 3.2+); acks 0/1 turn the default off."""
        if self.enable_idempotence is None:
            return self.acks_value == -1
        return bool(self.enable_idempotence)

    def _validate(self) -> None:
        if self.enable_idempotence not in (None, True, False):
            raise InvalidConfigError(f"config 'enable.idempotence': expected a boolean, got {self.enable_idempotence!r}")
        if self.enable_idempotence is True and self.acks_value != -1:
            raise InvalidConfigError(f"enable.idempotence=true requires acks=all, got acks={self.acks!r}")
        if self.transactional_id is not None:
            if self.enable_idempotence is False:
                raise InvalidConfigError("transactional.id requires enable.idempotence=true")
            if self.acks_value != -1:
                raise InvalidConfigError(f"transactional.id requires acks=all, got acks={self.acks!r}")
            if not self.transactional_id:
                raise InvalidConfigError("transactional.id must be a non-empty string")


ISOLATION_LEVELS = ("read_committed", "read_uncommitted")


@dataclass(frozen=True)
class ConsumerConfig(_Config):
    group_id: str | None = _opt(None, "consumer group (subscribe/commit)")
    isolation_level: str = _opt("read_committed", "read_committed or read_uncommitted",
                                lambda v: v in ISOLATION_LEVELS, kafka_default="read_uncommitted")
    auto_offset_reset: str = _opt("latest", "earliest, latest or none", lambda v: v in ("earliest", "latest", "none"))
    max_poll_records: int | None = _opt(None, "records per poll; None = bounded by fetch sizes only",
                                        lambda v: v > 0, kafka_default="500")
    fetch_max_bytes: int = _opt(50 * MiB, "bytes per poll over all partitions", _positive)
    max_partition_fetch_bytes: int = _opt(8 * MiB, "bytes per partition per poll", _positive,
                                          kafka_default="1048576")
    fetch_max_wait_ms: int = _opt(500, "long-poll wait when there is no data", _non_negative)
    request_timeout_ms: int = _opt(30_000, "wait this long for one fetch call", _positive)
    session_timeout_ms: int = _opt(45_000, "group member removed after this long without heartbeat", _positive)
    heartbeat_interval_ms: int = _opt(3_000, "group heartbeat interval", _positive)
    max_poll_interval_ms: int = _opt(300_000, "member leaves the group if poll() is not called for this long",
                                     _positive)
    partition_assignment_strategy: str = _opt(
        "range", "assignor for subscribe(): range, roundrobin or cooperative-sticky",
        lambda v: v in ("range", "roundrobin", "cooperative-sticky"), kafka_default="range,cooperative-sticky")
    enable_auto_commit: bool = _opt(False, "commit positions periodically (at-least-once)",
                                    kafka_default="true")
    auto_commit_interval_ms: int = _opt(5_000, "auto-commit period", _positive)
    client_id: str = _opt("", "name shown in logs and metrics")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) file of configs into a flat dict."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise InvalidConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise InvalidConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidConfigError(f"config file {path} must hold a mapping of keys to values")
    return data

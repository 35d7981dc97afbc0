"""One error vocabulary for broker and client.

Codes follow Apache Kafka's protocol error codes where the meaning is the same; codes of our own
start at 1000. Every exception raised across an actor boundary is a `BrokerError` carrying its code,
so a client can decide retry / abort / fail from the code alone (`ERROR_POLICY`).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ErrorCode(IntEnum):
    UNKNOWN_SERVER_ERROR = -1
    NONE = 0
    OFFSET_OUT_OF_RANGE = 1
    CORRUPT_MESSAGE = 2
    UNKNOWN_TOPIC_OR_PARTITION = 3
    LEADER_NOT_AVAILABLE = 5
    NOT_LEADER_OR_FOLLOWER = 6
    REQUEST_TIMED_OUT = 7
    REPLICA_NOT_AVAILABLE = 9
    MESSAGE_TOO_LARGE = 10
    STALE_CONTROLLER_EPOCH = 11
    NETWORK_EXCEPTION = 13
    COORDINATOR_LOAD_IN_PROGRESS = 14
    COORDINATOR_NOT_AVAILABLE = 15
    NOT_COORDINATOR = 16
    INVALID_TOPIC_EXCEPTION = 17
    NOT_ENOUGH_REPLICAS = 19
    NOT_ENOUGH_REPLICAS_AFTER_APPEND = 20
    INVALID_REQUIRED_ACKS = 21
    ILLEGAL_GENERATION = 22
    INCONSISTENT_GROUP_PROTOCOL = 23
    UNKNOWN_MEMBER_ID = 25
    REBALANCE_IN_PROGRESS = 27
    TOPIC_ALREADY_EXISTS = 36
    INVALID_PARTITIONS = 37
    INVALID_REPLICATION_FACTOR = 38
    INVALID_CONFIG = 40
    INVALID_REQUEST = 42
    OUT_OF_ORDER_SEQUENCE_NUMBER = 45
    DUPLICATE_SEQUENCE_NUMBER = 46
    INVALID_PRODUCER_EPOCH = 47
    INVALID_TXN_STATE = 48
    INVALID_TRANSACTION_TIMEOUT = 50
    CONCURRENT_TRANSACTIONS = 51
    TRANSACTION_COORDINATOR_FENCED = 52
    KAFKA_STORAGE_ERROR = 56
    NON_EMPTY_GROUP = 68
    GROUP_ID_NOT_FOUND = 69
    UNKNOWN_PRODUCER_ID = 59
    FENCED_LEADER_EPOCH = 74
    UNKNOWN_LEADER_EPOCH = 75
    OFFSET_NOT_AVAILABLE = 78
    INVALID_RECORD = 87
    UNSTABLE_OFFSET_COMMIT = 88
    PRODUCER_FENCED = 90
    TRANSACTION_ABORTABLE = 120
    # ray_broker's own codes
    SCHEMA_MISMATCH = 1001
    BROKER_NOT_FOUND = 1002
    UNKNOWN_OUTCOME = 1003
    REPLICA_OFFLINE = 1004


@dataclass(frozen=True)
class ErrorPolicy:
    retriable: bool
    description: str
    # abortable: the current transaction must be aborted, the producer stays usable.
    abortable: bool = False
    # fatal: the client object can no longer be used (e.g. fenced by a newer instance).
    fatal: bool = False


_P = ErrorPolicy
ERROR_POLICY: dict[ErrorCode, ErrorPolicy] = {
    ErrorCode.UNKNOWN_SERVER_ERROR: _P(False, "unexpected server error"),
    ErrorCode.NONE: _P(False, "no error"),
    ErrorCode.OFFSET_OUT_OF_RANGE: _P(False, "offset outside the log's range"),
    ErrorCode.CORRUPT_MESSAGE: _P(False, "corrupt record batch (CRC mismatch or torn write)"),
    ErrorCode.UNKNOWN_TOPIC_OR_PARTITION: _P(False, "unknown topic or partition"),
    ErrorCode.LEADER_NOT_AVAILABLE: _P(True, "partition has no leader right now"),
    ErrorCode.NOT_LEADER_OR_FOLLOWER: _P(True, "replica is not the leader"),
    ErrorCode.REQUEST_TIMED_OUT: _P(True, "request timed out"),
    ErrorCode.REPLICA_NOT_AVAILABLE: _P(True, "replica not available"),
    ErrorCode.MESSAGE_TOO_LARGE: _P(False, "record or batch larger than max.message.bytes"),
    ErrorCode.STALE_CONTROLLER_EPOCH: _P(False, "request from a stale controller"),
    ErrorCode.NETWORK_EXCEPTION: _P(True, "actor call failed; outcome unknown"),
    ErrorCode.COORDINATOR_LOAD_IN_PROGRESS: _P(True, "coordinator is loading its state"),
    ErrorCode.COORDINATOR_NOT_AVAILABLE: _P(True, "coordinator not available"),
    ErrorCode.NOT_COORDINATOR: _P(True, "not the coordinator for this key"),
    ErrorCode.INVALID_TOPIC_EXCEPTION: _P(False, "invalid topic name"),
    ErrorCode.NOT_ENOUGH_REPLICAS: _P(True, "in-sync replicas fewer than min.insync.replicas"),
    ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND: _P(True, "ISR shrank below min.insync.replicas after append"),
    ErrorCode.INVALID_REQUIRED_ACKS: _P(False, "acks must be 0, 1 or all"),
    ErrorCode.ILLEGAL_GENERATION: _P(False, "stale group generation"),
    ErrorCode.INCONSISTENT_GROUP_PROTOCOL: _P(False, "member's assignor differs from the group's"),
    ErrorCode.UNKNOWN_MEMBER_ID: _P(False, "unknown group member"),
    ErrorCode.REBALANCE_IN_PROGRESS: _P(False, "group is rebalancing"),
    ErrorCode.TOPIC_ALREADY_EXISTS: _P(False, "topic already exists"),
    ErrorCode.INVALID_PARTITIONS: _P(False, "invalid number of partitions"),
    ErrorCode.INVALID_REPLICATION_FACTOR: _P(False, "invalid replication factor"),
    ErrorCode.INVALID_CONFIG: _P(False, "invalid configuration"),
    ErrorCode.INVALID_REQUEST: _P(False, "invalid request"),
    ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER: _P(False, "producer sequence gap", abortable=True),
    ErrorCode.DUPLICATE_SEQUENCE_NUMBER: _P(False, "duplicate sequence number"),
    ErrorCode.INVALID_PRODUCER_EPOCH: _P(False, "producer epoch is stale (fenced)", fatal=True),
    ErrorCode.INVALID_TXN_STATE: _P(False, "call not allowed in the current transaction state"),
    ErrorCode.INVALID_TRANSACTION_TIMEOUT: _P(False, "transaction timeout above transaction.max.timeout.ms"),
    ErrorCode.CONCURRENT_TRANSACTIONS: _P(True, "previous transaction still completing"),
    ErrorCode.TRANSACTION_COORDINATOR_FENCED: _P(False, "stale transaction coordinator epoch"),
    ErrorCode.KAFKA_STORAGE_ERROR: _P(True, "replica storage offline"),
    ErrorCode.UNKNOWN_PRODUCER_ID: _P(False, "producer id unknown or expired"),
    ErrorCode.NON_EMPTY_GROUP: _P(False, "the group still has live members"),
    ErrorCode.GROUP_ID_NOT_FOUND: _P(False, "unknown consumer group"),
    ErrorCode.FENCED_LEADER_EPOCH: _P(True, "leader epoch is stale"),
    ErrorCode.UNKNOWN_LEADER_EPOCH: _P(True, "leader epoch is newer than this replica knows"),
    ErrorCode.OFFSET_NOT_AVAILABLE: _P(True, "new leader's high watermark not yet caught up (KIP-207)"),
    ErrorCode.INVALID_RECORD: _P(False, "invalid record"),
    ErrorCode.UNSTABLE_OFFSET_COMMIT: _P(True, "pending transactional offset commit"),
    ErrorCode.PRODUCER_FENCED: _P(False, "a newer producer with the same transactional.id exists", fatal=True),
    ErrorCode.TRANSACTION_ABORTABLE: _P(False, "transaction must be aborted", abortable=True),
    ErrorCode.SCHEMA_MISMATCH: _P(False, "batch schema does not match the topic schema"),
    ErrorCode.BROKER_NOT_FOUND: _P(False, "no broker deployed in this Ray namespace"),
    ErrorCode.UNKNOWN_OUTCOME: _P(False, "the write may or may not have happened"),
    ErrorCode.REPLICA_OFFLINE: _P(True, "replica is offline (corrupt log being rebuilt)"),
}


class BrokerError(Exception):
    """Base of every broker error; `.code` is an `ErrorCode`, `.retriable` follows `ERROR_POLICY`."""

    default_code: ErrorCode = ErrorCode.UNKNOWN_SERVER_ERROR

    def __init__(self, message: str = "", code: ErrorCode | None = None):
        self.code = ErrorCode(code if code is not None else self.default_code)
        self.message = message or ERROR_POLICY[self.code].description
        super().__init__(self.message)

    @property
    def retriable(self) -> bool:
        return ERROR_POLICY[self.code].retriable

    @property
    def abortable(self) -> bool:
        return ERROR_POLICY[self.code].abortable

    @property
    def fatal(self) -> bool:
        return ERROR_POLICY[self.code].fatal

    def __reduce__(self):  # survive pickling across Ray calls with code intact
        return (_rebuild_error, (type(self), self.message, int(self.code)))

    def __str__(self) -> str:
        return f"[{self.code.name}] {self.message}"


def _rebuild_error(cls, message, code):
    return cls(message, ErrorCode(code))


def _subclass(name: str, code: ErrorCode, *bases: type) -> type[BrokerError]:
    cls = type(name, (BrokerError, *bases), {"default_code": code, "__module__": __name__})
    return cls


UnknownServerError = _subclass("UnknownServerError", ErrorCode.UNKNOWN_SERVER_ERROR)
OffsetOutOfRangeError = _subclass("OffsetOutOfRangeError", ErrorCode.OFFSET_OUT_OF_RANGE)
CorruptRecordError = _subclass("CorruptRecordError", ErrorCode.CORRUPT_MESSAGE)
UnknownTopicOrPartitionError = _subclass("UnknownTopicOrPartitionError", ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)
LeaderNotAvailableError = _subclass("LeaderNotAvailableError", ErrorCode.LEADER_NOT_AVAILABLE)
NotLeaderOrFollowerError = _subclass("NotLeaderOrFollowerError", ErrorCode.NOT_LEADER_OR_FOLLOWER)
BrokerTimeoutError = _subclass("BrokerTimeoutError", ErrorCode.REQUEST_TIMED_OUT, TimeoutError)
ReplicaNotAvailableError = _subclass("ReplicaNotAvailableError", ErrorCode.REPLICA_NOT_AVAILABLE)
RecordTooLargeError = _subclass("RecordTooLargeError", ErrorCode.MESSAGE_TOO_LARGE)
StaleControllerEpochError = _subclass("StaleControllerEpochError", ErrorCode.STALE_CONTROLLER_EPOCH)
NetworkError = _subclass("NetworkError", ErrorCode.NETWORK_EXCEPTION)
InvalidTopicError = _subclass("InvalidTopicError", ErrorCode.INVALID_TOPIC_EXCEPTION)
NotEnoughReplicasError = _subclass("NotEnoughReplicasError", ErrorCode.NOT_ENOUGH_REPLICAS)
NotEnoughReplicasAfterAppendError = _subclass(
    "NotEnoughReplicasAfterAppendError", ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND)
InvalidRequiredAcksError = _subclass("InvalidRequiredAcksError", ErrorCode.INVALID_REQUIRED_ACKS)
TopicAlreadyExistsError = _subclass("TopicAlreadyExistsError", ErrorCode.TOPIC_ALREADY_EXISTS)
InvalidPartitionsError = _subclass("InvalidPartitionsError", ErrorCode.INVALID_PARTITIONS)
InvalidReplicationFactorError = _subclass("InvalidReplicationFactorError", ErrorCode.INVALID_REPLICATION_FACTOR)
InvalidConfigError = _subclass("InvalidConfigError", ErrorCode.INVALID_CONFIG, ValueError)
InvalidRequestError = _subclass("InvalidRequestError", ErrorCode.INVALID_REQUEST)
OutOfOrderSequenceError = _subclass("OutOfOrderSequenceError", ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
InvalidProducerEpochError = _subclass("InvalidProducerEpochError", ErrorCode.INVALID_PRODUCER_EPOCH)
InvalidTxnStateError = _subclass("InvalidTxnStateError", ErrorCode.INVALID_TXN_STATE)
UnknownProducerIdError = _subclass("UnknownProducerIdError", ErrorCode.UNKNOWN_PRODUCER_ID)
KafkaStorageError = _subclass("KafkaStorageError", ErrorCode.KAFKA_STORAGE_ERROR)
FencedLeaderEpochError = _subclass("FencedLeaderEpochError", ErrorCode.FENCED_LEADER_EPOCH)
UnknownLeaderEpochError = _subclass("UnknownLeaderEpochError", ErrorCode.UNKNOWN_LEADER_EPOCH)
OffsetNotAvailableError = _subclass("OffsetNotAvailableError", ErrorCode.OFFSET_NOT_AVAILABLE)
ProducerFencedError = _subclass("ProducerFencedError", ErrorCode.PRODUCER_FENCED)
TransactionAbortableError = _subclass("TransactionAbortableError", ErrorCode.TRANSACTION_ABORTABLE)
IllegalGenerationError = _subclass("IllegalGenerationError", ErrorCode.ILLEGAL_GENERATION)
InconsistentGroupProtocolError = _subclass("InconsistentGroupProtocolError", ErrorCode.INCONSISTENT_GROUP_PROTOCOL)
UnknownMemberIdError = _subclass("UnknownMemberIdError", ErrorCode.UNKNOWN_MEMBER_ID)
RebalanceInProgressError = _subclass("RebalanceInProgressError", ErrorCode.REBALANCE_IN_PROGRESS)
UnstableOffsetCommitError = _subclass("UnstableOffsetCommitError", ErrorCode.UNSTABLE_OFFSET_COMMIT)
CoordinatorNotAvailableError = _subclass("CoordinatorNotAvailableError", ErrorCode.COORDINATOR_NOT_AVAILABLE)
CoordinatorLoadInProgressError = _subclass("CoordinatorLoadInProgressError", ErrorCode.COORDINATOR_LOAD_IN_PROGRESS)
NotCoordinatorError = _subclass("NotCoordinatorError", ErrorCode.NOT_COORDINATOR)
ConcurrentTransactionsError = _subclass("ConcurrentTransactionsError", ErrorCode.CONCURRENT_TRANSACTIONS)
InvalidTransactionTimeoutError = _subclass("InvalidTransactionTimeoutError", ErrorCode.INVALID_TRANSACTION_TIMEOUT)
TransactionCoordinatorFencedError = _subclass("TransactionCoordinatorFencedError",
                                              ErrorCode.TRANSACTION_COORDINATOR_FENCED)
NonEmptyGroupError = _subclass("NonEmptyGroupError", ErrorCode.NON_EMPTY_GROUP)
GroupIdNotFoundError = _subclass("GroupIdNotFoundError", ErrorCode.GROUP_ID_NOT_FOUND)
SchemaMismatchError = _subclass("SchemaMismatchError", ErrorCode.SCHEMA_MISMATCH)
BrokerNotFoundError = _subclass("BrokerNotFoundError", ErrorCode.BROKER_NOT_FOUND)
UnknownOutcomeError = _subclass("UnknownOutcomeError", ErrorCode.UNKNOWN_OUTCOME)
ReplicaOfflineError = _subclass("ReplicaOfflineError", ErrorCode.REPLICA_OFFLINE)

_BY_CODE: dict[ErrorCode, type[BrokerError]] = {}
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, BrokerError) and _cls is not BrokerError:
        _BY_CODE.setdefault(_cls.default_code, _cls)


def error_for(code: ErrorCode, message: str = "") -> BrokerError:
    """The named exception for `code`."""
    return _BY_CODE.get(ErrorCode(code), BrokerError)(message, ErrorCode(code))

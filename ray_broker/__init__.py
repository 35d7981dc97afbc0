"""ray_broker: an exactly-once event-streaming broker built as Ray actors, with Arrow log segments.

    import ray_broker as rb
    cluster = rb.connect()                       # embedded local broker, or attach to a Ray cluster
    cluster.admin().create_topic("payments", partitions=3, replication_factor=3)
    producer = cluster.producer()
    producer.send("payments", value=b"...", key=b"acct-1").result()
"""
from .cluster import Admin, Cluster, connect, deploy
from .config import BrokerConfig, ConsumerConfig, ProducerConfig, TopicConfig
from .errors import *  # noqa: F401,F403 - the error vocabulary is public
from .errors import BrokerError, ErrorCode, error_for
from .protocol import PartitionDescription, TopicDescription
from .records import BatchMetadata, RecordMetadata, TopicPartition

__version__ = "0.1.0"

__all__ = [
    "connect", "deploy", "Cluster", "Admin", "BrokerConfig", "ConsumerConfig", "ProducerConfig", "TopicConfig",
    "BrokerError", "ErrorCode", "error_for", "PartitionDescription", "TopicDescription", "BatchMetadata",
    "RecordMetadata", "TopicPartition",
    "BrokerNotFoundError", "BrokerTimeoutError", "CorruptRecordError", "InvalidConfigError",
    "InvalidPartitionsError", "InvalidReplicationFactorError", "InvalidTopicError", "InvalidRequestError",
    "NotEnoughReplicasError", "NotLeaderOrFollowerError", "OffsetOutOfRangeError", "RecordTooLargeError",
    "SchemaMismatchError", "TopicAlreadyExistsError", "UnknownTopicOrPartitionError", "OutOfOrderSequenceError",
    "InvalidProducerEpochError", "UnknownOutcomeError", "ProducerFencedError", "InvalidTxnStateError",
    "TransactionAbortableError", "StaleControllerEpochError", "LeaderNotAvailableError",
    "IllegalGenerationError", "UnknownMemberIdError", "RebalanceInProgressError", "UnstableOffsetCommitError",
    "ConcurrentTransactionsError", "InvalidTransactionTimeoutError", "TransactionCoordinatorFencedError",
    "CoordinatorNotAvailableError", "NonEmptyGroupError", "GroupIdNotFoundError",
]

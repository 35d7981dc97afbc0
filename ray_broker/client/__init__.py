"""Python client of ray_broker: producer, consumer, futures, partitioner, metadata cache."""
from .consumer import Consumer
from .futures import BatchFuture, BatchState, FutureBase, RecordFuture
from .metadata_cache import ClientContext
from .partitioner import StickyPartitioner, murmur2, murmur2_many, partition_for_key, partitions_for_keys
from .producer import IdempotenceState, Producer

__all__ = ["ClientContext", "Producer", "Consumer", "RecordFuture", "BatchFuture", "BatchState", "FutureBase",
           "IdempotenceState", "StickyPartitioner", "murmur2", "murmur2_many", "partition_for_key",
           "partitions_for_keys"]

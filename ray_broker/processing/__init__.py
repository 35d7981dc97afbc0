"""Exactly-once read-process-write pipelines over ray_broker topics (Kafka Streams' exactly_once_v2).

    from ray_broker.processing import ExactlyOncePipeline, run_pipeline

    def enrich(batch):                      # one pyarrow.RecordBatch in (one input partition), records out
        return batch.select(["key", "value"])

    run_pipeline(cluster, ["payments"], "enriched", enrich, group_id="enricher", workers=2)

See `pipeline.ExactlyOncePipeline` for the API, `worker` for the loop and `core` for the pure parts.
"""
from .core import (CommitPolicy, IdentitySerde, IntSerde, JsonSerde, KeyValueState, Output, ProcessContext,
                   TxnTracker, transactional_id_for)
from .pipeline import ExactlyOncePipeline, PipelineError, copy_records, run_pipeline

__all__ = ["ExactlyOncePipeline", "run_pipeline", "PipelineError", "copy_records", "CommitPolicy", "TxnTracker",
           "KeyValueState", "Output", "ProcessContext", "IdentitySerde", "IntSerde", "JsonSerde",
           "transactional_id_for"]

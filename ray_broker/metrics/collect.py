"""Reads a `ClusterSnapshot` from a running broker, and a Prometheus collector doing so per scrape."""
from __future__ import annotations

import logging
import time

import ray

from .exposition import ClusterSnapshot, metric_families

log = logging.getLogger(__name__)


def snapshot(cluster, include_groups: bool = True, timeout: float = 30.0) -> ClusterSnapshot:
    """Controller status, every replica's report (`replica_reports`: replicas that do not answer
    within 2 s are left out), all topics, every transactional id and, with `include_groups`, every
    group with its lag."""
    st = ray.get(cluster.controller.status.remote(), timeout=timeout)
    reports = ray.get(cluster.controller.replica_reports.remote(), timeout=timeout)
    admin = cluster.admin()
    topics = [admin.describe_topic(t) for t in admin.list_topics(include_internal=True)]
    groups = []
    if include_groups:
        for listing in admin.list_groups():
            try:
                groups.append(admin.describe_group(listing.group_id))
            except Exception as exc:  # noqa: BLE001 - a group deleted or moving between scrapes
                log.warning("metrics: group %s not described: %r", listing.group_id, exc)
    transactions = admin.list_transactions()
    return ClusterSnapshot(st["controller_epoch"], list(st["nodes"]), topics, reports, groups, transactions,
                           time.time_ns() // 1_000_000)


class BrokerCollector:
    """For `prometheus_client`'s registry: one snapshot per scrape."""

    def __init__(self, cluster, include_groups: bool = True):
        self._cluster = cluster
        self._include_groups = include_groups

    def collect(self):
        return iter(metric_families(snapshot(self._cluster, self._include_groups)))

"""Reads a `ClusterSnapshot` from a running broker, and a Prometheus collector doing so per scrape."""
from __future__ import annotations

import logging
import time

import ray

from .exposition import ClusterSnapshot, metric_families

log = logging.getLogger(__name__)


# A coordinator that is restarting is waited for this long per call, not the admin's 60 s: a
# Prometheus scrape times out after 10 s by default, and a partial scrape beats none.
COORDINATOR_TIMEOUT_S = 3.0


def snapshot(cluster, include_groups: bool = True, timeout: float = 30.0,
             coordinator_timeout: float = COORDINATOR_TIMEOUT_S) -> ClusterSnapshot:
    """Controller status, every replica's report (`replica_reports`: replicas that do not answer
    within 2 s are left out), all topics, every transactional id and, with `include_groups`, every
    group with its lag. Groups and transactions come from the coordinators: one that fails (a
    coordinator restarting, a group deleted meanwhile) is left out and counted in `errors`, so a
    scrape still shows the partitions."""
    st = ray.get(cluster.controller.status.remote(), timeout=timeout)
    reports = ray.get(cluster.controller.replica_reports.remote(), timeout=timeout)
    admin = cluster.admin()
    topics = [admin.describe_topic(t) for t in admin.list_topics(include_internal=True)]
    errors: list[str] = []

    def attempt(what: str, fn, default):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported in the scrape, not raised
            log.warning("metrics: %s failed: %r", what, exc)
            errors.append(f"{what}: {exc!r}"[:300])
            return default

    groups = []
    if include_groups:
        lso = {(t.name, p.partition): p.last_stable_offset for t in topics for p in t.partitions}
        for listing in attempt("list_groups", lambda: admin.list_groups(timeout=coordinator_timeout), []):
            desc = attempt(f"describe_group {listing.group_id}",
                           lambda gid=listing.group_id: admin.describe_group(gid, timeout=coordinator_timeout,
                                                                             last_stable_offsets=lso),
                           None)
            if desc is not None:
                groups.append(desc)
    transactions = attempt("list_transactions", lambda: admin.list_transactions(timeout=coordinator_timeout), [])
    return ClusterSnapshot(st["controller_epoch"], list(st["nodes"]), topics, reports, groups, transactions,
                           time.time_ns() // 1_000_000, errors)


class BrokerCollector:
    """For `prometheus_client`'s registry: one snapshot per scrape."""

    def __init__(self, cluster, include_groups: bool = True):
        self._cluster = cluster
        self._include_groups = include_groups

    def collect(self):
        return iter(metric_families(snapshot(self._cluster, self._include_groups)))

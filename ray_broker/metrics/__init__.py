"""Metrics: what the broker counts and how it is exported.

- `counters`: plain counters the actors bump on their request paths (no Ray, no I/O).
- `exposition`: a cluster snapshot (controller status, replica reports, topics, groups) turned into
  Prometheus metric families, named after Kafka's broker metrics where the meaning is the same.
- `collect`: takes that snapshot from a running broker (Ray calls); `ray-broker metrics` prints it
  or serves it over HTTP for Prometheus to scrape.

Pull, not push: nothing is exported from the hot paths; a scrape asks every replica for its
status once. Submodules are imported where used: a replica needs only `counters`, not the
Prometheus client.
"""

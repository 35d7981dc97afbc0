"""Request counters of one partition replica. Reset when the actor restarts, as Prometheus
counters may be (rate() handles resets)."""
from __future__ import annotations


class ReplicaCounters:
    __slots__ = ("produce_requests", "records_in", "bytes_in", "fetch_requests", "records_out", "bytes_out",
                 "replication_requests", "replication_bytes_in")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def on_append(self, records: int, nbytes: int) -> None:
        self.records_in += records
        self.bytes_in += nbytes

    def on_fetch(self, batches) -> None:
        self.fetch_requests += 1
        for b in batches:
            self.records_out += b.num_rows
            self.bytes_out += b.nbytes

    def on_replicate(self, nbytes: int) -> None:
        self.replication_requests += 1
        self.replication_bytes_in += nbytes

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

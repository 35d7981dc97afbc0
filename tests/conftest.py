"""Shared fixtures: one local Ray + broker per test session; helpers for waiting on cluster state."""
from __future__ import annotations

import itertools
import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """The one local Ray of this test session (restart and multi-node tests start their own in a subprocess)."""
    import ray

    from ray_broker.protocol import RAY_SYSTEM_CONFIG   # as the broker's own embedded Ray

    ray.init(address="local", num_cpus=2, namespace="ray_broker", include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, configure_logging=False, _system_config=dict(RAY_SYSTEM_CONFIG))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def broker(ray_local, tmp_path_factory):
    """A broker deployed on the session's local Ray, shared by the integration tests."""
    import ray_broker as rb

    data_dir = tmp_path_factory.mktemp("broker-data")
    rb.deploy(data_dir=str(data_dir), config={"replica.health.check.interval.ms": 250,
                                              "replica.session.timeout.ms": 4000,
                                              "coordinator.session.timeout.ms": 5000,
                                              "replica.lag.time.max.ms": 5000})
    cluster = rb.connect()
    cluster.data_dir = str(data_dir)
    yield cluster
    cluster.shutdown()


_names = itertools.count()


@pytest.fixture
def topic_name(request):
    """A fresh topic name per test (the session's broker is shared). Topics the test created under
    this name are deleted afterwards: every replica is a process, and a session that keeps them all
    grows into hundreds of actors the controller keeps pinging."""
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:60]
    name = f"{base}-{next(_names)}"
    yield name
    if "broker" not in request.fixturenames:
        return
    admin = request.getfixturevalue("broker").admin()
    try:
        for topic in admin.list_topics():
            if topic == name or topic.startswith(name + "-") or topic.startswith(name + "."):
                admin.delete_topic(topic)
    except Exception:  # noqa: BLE001 - cleanup is best effort; a test that broke the broker reports itself
        pass

"""Error vocabulary and typed configs."""
from __future__ import annotations

import pickle

import pytest

import ray_broker as rb
from ray_broker.config import BrokerConfig, ConsumerConfig, ProducerConfig, TopicConfig
from ray_broker.errors import ERROR_POLICY, ErrorCode, error_for
from ray_broker.testing import failpoints


def test_every_code_has_a_policy_and_a_class():
    assert set(ErrorCode) == set(ERROR_POLICY)
    for code in ErrorCode:
        err = error_for(code, "m")
        assert err.code == code and isinstance(err, rb.BrokerError)


def test_errors_pickle_with_code_and_are_retriable_as_documented():
    err = pickle.loads(pickle.dumps(rb.NotEnoughReplicasError("isr small")))
    assert type(err) is rb.NotEnoughReplicasError and err.retriable and "isr small" in str(err)
    assert isinstance(rb.BrokerTimeoutError("x"), TimeoutError)
    assert not rb.SchemaMismatchError().retriable
    assert rb.ProducerFencedError().fatal


def test_dotted_and_snake_keys_are_equivalent():
    a = ProducerConfig.from_dict({"linger.ms": 7, "batch.size": "100"})
    b = ProducerConfig.from_dict(linger_ms=7, batch_size=100)
    assert a == b


@pytest.mark.parametrize("cls,key,value", [
    (ProducerConfig, "acks", "2"), (ProducerConfig, "max.in.flight.requests.per.connection", 6),
    (ConsumerConfig, "auto.offset.reset", "middle"), (TopicConfig, "retention.bytes", -5),
    (BrokerConfig, "replication.factor.max", 0), (ProducerConfig, "linger.ms", "soon"),
])
def test_bad_values_name_the_key(cls, key, value):
    with pytest.raises(rb.InvalidConfigError, match=key.split(".")[0]):
        cls.from_dict({key: value})


def test_unknown_keys_are_refused():
    with pytest.raises(rb.InvalidConfigError, match="no_such"):
        TopicConfig.from_dict({"no.such": 1})


def test_failpoints_raise_delay_and_count():
    failpoints.arm("unit.point", "raise", "NotEnoughReplicasError", count=1)
    with pytest.raises(rb.NotEnoughReplicasError):
        failpoints.hit("unit.point")
    failpoints.hit("unit.point")             # count exhausted: no effect
    assert failpoints.hit_count("unit.point") == 2
    failpoints.arm("unit.armed", "raise", skip=1)
    assert not failpoints.armed("unit.armed")    # the next hit is skipped
    failpoints.hit("unit.armed")
    assert failpoints.armed("unit.armed")
    with pytest.raises(failpoints.FailpointError):
        failpoints.hit("unit.armed")
    assert not failpoints.armed("unit.armed") and not failpoints.armed("never.armed")
    failpoints.arm_from_env("unit.other=raise*2")
    for _ in range(2):
        with pytest.raises(failpoints.FailpointError):
            failpoints.hit("unit.other")
    failpoints.disarm()


def test_stop_failpoint_freezes_the_caller_before_it_goes_on(tmp_path):
    """The 'stop' action must freeze the hitting thread at the failpoint: a fault test relies on
    nothing after it (a commit) having started while the process is stopped."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "after"
    code = (
        "import threading, time, sys\n"
        "from ray_broker.testing import failpoints\n"
        "threading.Thread(target=lambda: [time.sleep(0.0001) for _ in iter(int, 1)], daemon=True).start()\n"
        "failpoints.arm('t.point', 'stop')\n"
        "failpoints.hit('t.point')\n"
        f"open({str(marker)!r}, 'w').write('x')\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state == "T" or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert state == "T", state
        time.sleep(0.3)
        assert not marker.exists(), "the caller went past the failpoint while the process was stopping"
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=30) == 0
        assert marker.exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()

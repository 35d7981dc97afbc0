"""HeartbeatClock: when the controller replaces a coordinator that does not answer."""
import pytest

from ray_broker.controller.heartbeats import HeartbeatClock


def test_a_started_process_is_hung_after_the_session_timeout():
    c = HeartbeatClock(session_timeout_s=4, startup_timeout_s=60)
    c.seen("txn/0", 0.0)
    c.answered("txn/0", 1.0)
    assert not c.hung("txn/0", 5.0)
    assert c.hung("txn/0", 5.1) and c.silent_for("txn/0", 5.1) == pytest.approx(4.1)
    c.answered("txn/0", 5.1)
    assert not c.hung("txn/0", 9.0)


def test_a_starting_process_gets_the_startup_time_not_the_session_timeout():
    # the CI failure: a coordinator that took > 4 s to start was replaced, and so was each successor
    c = HeartbeatClock(session_timeout_s=4, startup_timeout_s=60)
    c.seen("txn/0", 0.0)
    c.seen("txn/0", 30.0)                      # seen again each round: the clock does not restart
    assert not c.started("txn/0") and not c.hung("txn/0", 30.0)
    assert c.hung("txn/0", 60.5)
    c.answered("txn/0", 40.0)
    assert c.started("txn/0") and not c.hung("txn/0", 44.0) and c.hung("txn/0", 44.5)


def test_a_process_that_died_restarts_with_the_startup_time_and_a_forgotten_one_starts_fresh():
    c = HeartbeatClock(session_timeout_s=4, startup_timeout_s=60)
    c.answered("g/0", 0.0)
    c.died("g/0", 10.0)
    assert not c.started("g/0") and not c.hung("g/0", 50.0) and c.hung("g/0", 70.5)
    c.forget("g/0")
    assert not c.hung("g/0", 1000.0)           # unknown: nothing to judge until seen again
    c.seen("g/0", 1000.0)
    assert not c.hung("g/0", 1059.0)


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError):
        HeartbeatClock(0, 60)

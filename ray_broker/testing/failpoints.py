"""Named failpoints: places in broker code where a test can make a step fail, crash or stall.

Broker code calls `failpoints.hit("replica.after_append")` at interesting steps; it does nothing
unless a test armed that name in this process (each actor is its own process, so arming happens
through an actor method such as `PartitionReplicaActor.arm_failpoint`, or the RB_FAILPOINTS env
var: "name=action[:arg][*count],..."). Actions:
  raise  -> raise FailpointError (or the BrokerError subclass named by arg)
  crash  -> os._exit(arg or 1): the process dies mid-step, as a SIGKILL would leave it
  delay  -> sleep arg milliseconds
  stop   -> SIGSTOP this process (every thread freezes at this step, as an operator's `kill -STOP`
            would; a test resumes it with SIGCONT and it continues as a zombie)
Pure Python, no Ray import, so the pure cores can use it too.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

ACTIONS = ("raise", "crash", "delay", "stop")


class FailpointError(RuntimeError):
    """Raised by an armed 'raise' failpoint."""


@dataclass
class _Armed:
    action: str
    arg: str | None
    remaining: int  # -1 = every time
    skip: int = 0   # pass this many hits before acting
    hits: int = 0


_lock = threading.Lock()
_armed: dict[str, _Armed] = {}
_counts: dict[str, int] = {}


def arm(name: str, action: str, arg: str | int | None = None, count: int = 1, skip: int = 0) -> None:
    """Act on the next `count` hits (-1: every hit) after letting `skip` hits pass."""
    if action not in ACTIONS:
        raise ValueError(f"unknown failpoint action {action!r}; use one of {ACTIONS}")
    with _lock:
        _armed[name] = _Armed(action, None if arg is None else str(arg), count, skip)


def disarm(name: str | None = None) -> None:
    with _lock:
        if name is None:
            _armed.clear()
        else:
            _armed.pop(name, None)


def armed(name: str) -> bool:
    """Whether the next hit of `name` would act (lets a caller set the scene for it first)."""
    with _lock:
        a = _armed.get(name)
        return a is not None and a.remaining != 0 and a.skip == 0


def hit_count(name: str) -> int:
    """How many times the point was reached (armed or not)."""
    with _lock:
        return _counts.get(name, 0)


def hit(name: str) -> None:
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        armed = _armed.get(name)
        if armed is None or armed.remaining == 0:
            return
        if armed.skip > 0:
            armed.skip -= 1
            return
        if armed.remaining > 0:
            armed.remaining -= 1
        armed.hits += 1
        action, arg = armed.action, armed.arg
    if action == "crash":
        os._exit(int(arg) if arg else 1)
    if action == "delay":
        time.sleep(float(arg or 0) / 1000.0)
        return
    if action == "stop":
        import signal

        # sent to this thread, so it is the one that takes the stop (a process-wide kill lets
        # another thread take it while this one runs on for a moment: seen in tests, a worker
        # frozen "before its commit" had the commit already sent); the sleep covers any lag
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        time.sleep(0.05)
        return
    if arg:
        from .. import errors

        cls = getattr(errors, arg, None)
        if isinstance(cls, type) and issubclass(cls, errors.BrokerError):
            raise cls(f"failpoint {name}")
    raise FailpointError(f"failpoint {name}")


def arm_from_env(value: str | None = None) -> None:
    spec = value if value is not None else os.environ.get("RB_FAILPOINTS", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition("=")
        count = 1
        if "*" in rest:
            rest, _, c = rest.partition("*")
            count = int(c)
        action, _, arg = rest.partition(":")
        arm(name, action, arg or None, count)


arm_from_env()

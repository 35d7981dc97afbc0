"""When a heartbeat-watched process (a coordinator) counts as hung and is replaced.

The session timeout runs from the last answer. A process that has never answered is still
starting: a Ray actor's start-up (a new Python process importing Ray and Arrow) takes seconds on
a loaded machine, longer than a session timeout of a few seconds. Counting that as a hang replaced
the new process, and its replacement, over and over: on a busy CI box the transaction
coordinator never came up. A starting process gets `startup_timeout_s` from when it was first
seen instead.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Watch:
    first_seen: float
    last_answer: float | None = None


class HeartbeatClock:
    def __init__(self, session_timeout_s: float, startup_timeout_s: float):
        if session_timeout_s <= 0 or startup_timeout_s <= 0:
            raise ValueError("heartbeat timeouts must be positive")
        self.session_timeout_s = session_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._watches: dict[str, _Watch] = {}

    def seen(self, name: str, now: float) -> None:
        """The process exists (just created, or found); its clock starts now if it was unknown."""
        self._watches.setdefault(name, _Watch(now))

    def answered(self, name: str, now: float) -> None:
        self._watches.setdefault(name, _Watch(now)).last_answer = now

    def died(self, name: str, now: float) -> None:
        """Its process died (a heartbeat failed): Ray restarts it, and that start gets the startup time."""
        self._watches[name] = _Watch(now)

    def started(self, name: str) -> bool:
        w = self._watches.get(name)
        return w is not None and w.last_answer is not None

    def silent_for(self, name: str, now: float) -> float:
        w = self._watches.get(name)
        if w is None:
            return 0.0
        return now - (w.first_seen if w.last_answer is None else w.last_answer)

    def hung(self, name: str, now: float) -> bool:
        w = self._watches.get(name)
        if w is None:
            return False
        limit = self.session_timeout_s if w.last_answer is not None else self.startup_timeout_s
        return self.silent_for(name, now) > limit

    def forget(self, name: str) -> None:
        """The process was replaced (killed, or its name freed): its successor starts a fresh clock."""
        self._watches.pop(name, None)

"""Run-wide flags every component obeys: an operator's pause, a stop request, the learner's done.

``stop`` (with ``stop_reason``) is set by the orchestrator on exit or by a component that hit a
fatal error, so the others wind down instead of waiting out their timeouts. ``done`` is set by
the learner once it trained the last step.
"""

from __future__ import annotations

import redis

from services.transport.keys import RunKeys


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RunControl:
    """The control hash of one run."""

    def __init__(self, client: redis.Redis, keys: RunKeys) -> None:
        self.client = client
        self.key = keys.control

    def paused(self) -> bool:
        """Whether an operator paused the run."""
        return self.client.hget(self.key, "paused") in (b"1", "1")

    def set_paused(self, paused: bool) -> None:
        self.client.hset(self.key, "paused", "1" if paused else "0")

    def request_stop(self, reason: str) -> None:
        """Ask every component of the run to stop; the first reason given is kept."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key, "stop", "1")
        pipe.hsetnx(self.key, "stop_reason", reason)
        pipe.execute()

    def stop_reason(self) -> str | None:
        """Why the run was asked to stop, or None while it was not."""
        stop, reason = self.client.hmget(self.key, ["stop", "stop_reason"])
        if stop not in (b"1", "1"):
            return None
        return _text(reason) if reason is not None else "stop requested"

    def mark_done(self) -> None:
        """The learner trained every step of the run."""
        self.client.hset(self.key, "done", "1")

    def is_done(self) -> bool:
        return self.client.hget(self.key, "done") in (b"1", "1")

    def clear_run_flags(self) -> None:
        """Forget ``stop``/``done`` of an earlier session (a resumed run decides them anew)."""
        self.client.hdel(self.key, "stop", "stop_reason", "done")

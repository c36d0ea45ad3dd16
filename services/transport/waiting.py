"""How every component loop waits: for data, for room downstream, for weights.

One policy for all of them. A wait ends when its condition holds, or when the run is told to
stop (the operator, the orchestrator, or another component's failure), or it fails with
:class:`Stalled` after ``timeout_s`` without progress. An operator's pause is not a stall: it
restarts the clock. Loops that read with a blocking call mark progress themselves
(:meth:`WaitPolicy.progressed`) and ask :meth:`WaitPolicy.check_stall` between reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.transport.control import RunControl


class Stalled(TimeoutError):
    """A wait made no progress within the run's ``service.wait_timeout_s``; says what it awaited."""


class WaitPolicy:
    """Pause, stop, timeout and reclaim cadence of one component's loop.

    Args:
        control: the run's flags.
        timeout_s: how long a wait may go without progress before :class:`Stalled`.
        poll_s: sleep between polls of a condition.
        reclaim_every_s: how often :meth:`reclaim_due` says to look for a dead consumer's work.
        should_stop: an extra in-process stop signal (a thread's event, a test's counter).
        finished: a run-level "nothing left to do" check (e.g. the learner is done); its reason
            ends waits like a stop request.
        error: the :class:`Stalled` subclass this component raises.
    """

    def __init__(
        self,
        control: RunControl,
        timeout_s: float,
        *,
        poll_s: float = 0.05,
        reclaim_every_s: float = 5.0,
        should_stop: Callable[[], bool] | None = None,
        finished: Callable[[], str | None] | None = None,
        error: type[Stalled] = Stalled,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        self.control = control
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.reclaim_every_s = reclaim_every_s
        self.should_stop = should_stop
        self.finished = finished
        self.error = error
        self._last_progress = time.monotonic()
        self._last_reclaim = float("-inf")

    def stop_reason(self) -> str | None:
        """Why this loop should end now, or None."""
        if self.should_stop is not None and self.should_stop():
            return "told to stop"
        reason = self.control.stop_reason()
        if reason is not None:
            return f"run stop: {reason}"
        return self.finished() if self.finished is not None else None

    def until(self, ready: Callable[[], bool], what: str) -> bool:
        """Poll ``ready`` until it holds (True) or the loop must end (False).

        Raises :class:`Stalled` naming ``what`` after ``timeout_s`` of waiting (paused time
        does not count).
        """
        deadline = time.monotonic() + self.timeout_s
        while not ready():
            if self.stop_reason() is not None:
                return False
            if self.control.paused():
                deadline = time.monotonic() + self.timeout_s
            elif time.monotonic() > deadline:
                raise self.error(f"waited {self.timeout_s:.0f}s for {what}")
            time.sleep(self.poll_s)
        return True

    def progressed(self) -> None:
        """The loop got input or produced output: restart the stall clock."""
        self._last_progress = time.monotonic()

    def check_stall(self, describe: Callable[[], str]) -> None:
        """Raise :class:`Stalled` with ``describe()`` if nothing progressed for ``timeout_s``."""
        if self.control.paused():
            self.progressed()
        elif time.monotonic() - self._last_progress > self.timeout_s:
            raise self.error(describe())

    def reclaim_due(self) -> bool:
        """True once every ``reclaim_every_s`` (and on the first call)."""
        now = time.monotonic()
        if now - self._last_reclaim < self.reclaim_every_s:
            return False
        self._last_reclaim = now
        return True

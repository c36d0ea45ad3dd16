"""Supervision of a local run: restart what died, wait out a lost Redis, stop with one line.

The orchestrator hands the started components to :class:`Supervisor`, which waits for the
learner to finish and, meanwhile:

* **A component whose process died** (kill -9, out of memory: Ray reports the actor dead) is
  re-created after a back-off (``service.restart_backoff_s``, doubled per restart, at most
  60 s) and its loop re-entered, up to ``service.max_restarts`` times per component. That is
  safe because every component starts from what Redis and its checkpoint hold: the selector
  and the learner re-read their pending entries under the same consumer name, the learner
  loads its checkpoint and retrains the replay log, a rollout actor continues at its recorded
  round, and every write is an idempotent, fenced commit. A component that *raised* (a bug, a
  stall, a bad checkpoint) is not restarted: it asked the run to stop and would fail again.
* **Redis going away** (:class:`RedisWatch`): the embedded server is restarted from its AOF on
  the same port with the same password, while every component's client retries with back-off
  (``services.transport.queue.connect(outage_s=...)``). Past ``service.redis_outage_s`` the
  run stops with one line (:class:`RedisLost`); the data stays in the AOF (or the external
  Redis), so ``d3s run`` again resumes where it was.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.secrets import mask_url
from services.run.config import RunConfig
from services.run.progress import StepProgress
from services.transport.bundle import Transport
from services.transport.redis_server import EmbeddedRedis, RedisStartError

log = logging.getLogger(__name__)

__all__ = ["RedisLost", "RedisWatch", "RestartPolicy", "ServiceError", "Supervisor", "is_death"]

MAX_BACKOFF_S = 60.0
_REDIS_DOWN = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)


class ServiceError(RuntimeError):
    """A component of the run failed; the message names it and says why.

    Attributes:
        components: The components whose logs may hold the root cause, the failed one first.
        detail: Text that may hold it where no log does (a failed call's whole error message).
        causes: ``(source, error lines)`` for each source that had any, filled in by the
            orchestrator before the error leaves it (see :func:`failure_causes`).
    """

    def __init__(
        self, message: str, *, components: tuple[str, ...] = (), detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.components, self.detail = components, detail
        self.causes: list[tuple[str, list[str]]] = []


class RedisLost(ServiceError):
    """Redis stayed unreachable for longer than ``service.redis_outage_s``."""


@dataclass(frozen=True)
class RestartPolicy:
    """How often and how soon a dead component is re-created.

    ``max_restarts``: restarts allowed per component in one run; ``backoff_s``: the wait before
    the first, doubled for each further one, capped at ``max_backoff_s``.
    """

    max_restarts: int
    backoff_s: float
    max_backoff_s: float = MAX_BACKOFF_S

    def delay(self, restarts_so_far: int) -> float:
        """Seconds to wait before restart number ``restarts_so_far + 1``."""
        return min(self.max_backoff_s, self.backoff_s * (2.0**restarts_so_far))


def is_death(exc: BaseException) -> bool:
    """True when a component's *process* died (the actor is gone: kill -9, OOM, a lost node),
    False when its code raised (Ray wraps that in ``RayTaskError``)."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        return False
    died = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError)
    return isinstance(exc, died)


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    # One line: Ray's messages carry a multi-line context (actor id, pid, node) after the first.
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first}"[:300]


class RedisWatch:
    """Notices a lost Redis, restarts the embedded one (the caller owns it), and gives up after
    ``outage_s``.

    Args:
        url: the run's Redis URL (with its password; never logged unmasked).
        embedded: the server this run started, or None for one it was given (waited for only).
        outage_s: how long an outage may last before :meth:`check` raises :class:`RedisLost`.
        restart_every_s: the least time between two restart attempts of the embedded server.
    """

    def __init__(
        self,
        url: str,
        embedded: EmbeddedRedis | None,
        outage_s: float,
        *,
        restart_every_s: float = 1.0,
    ) -> None:
        self.url, self.embedded, self.outage_s = url, embedded, outage_s
        self.restart_every_s = restart_every_s
        # No retries: the watch must see an outage at once, not sit in a client's back-off.
        self._probe = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        self.down_since: float | None = None
        self._next_restart = 0.0
        self.outages = 0
        self.server_restarts = 0
        self.recovery_s: list[float] = []

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def check(self) -> bool:
        """True when Redis answers. Otherwise restart the embedded server if it died (at most
        every ``restart_every_s``) and return False; raise :class:`RedisLost` once the outage
        has lasted ``outage_s``."""
        now = time.monotonic()
        if self.embedded is not None and not self.embedded.is_running():
            self._went_down(now, "redis-server exited")
            if now >= self._next_restart:
                self._next_restart = now + self.restart_every_s
                try:
                    self.embedded.restart()
                    self.server_restarts += 1
                    log.warning(
                        "restarted the embedded redis-server from its AOF (%s)",
                        mask_url(self.embedded.url),
                    )
                except (RedisStartError, OSError) as exc:
                    log.warning("restarting redis-server failed: %s", str(exc).splitlines()[0])
        try:
            self._probe.ping()
        except _REDIS_DOWN as exc:
            self._went_down(now, f"{type(exc).__name__}")
            assert self.down_since is not None
            if now - self.down_since > self.outage_s:
                raise RedisLost(
                    f"Redis at {mask_url(self.url)} unreachable for {now - self.down_since:.0f}s "
                    f"(service.redis_outage_s={self.outage_s:g}); stopped. Its data is kept: "
                    "bring Redis back and `d3s run` again resumes where the run was"
                ) from None
            return False
        if self.down_since is not None:
            took = now - self.down_since
            self.recovery_s.append(took)
            log.warning("Redis is back after %.1fs; the run goes on", took)
            self.down_since = None
        return True

    def _went_down(self, now: float, why: str) -> None:
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            log.warning(
                "Redis lost (%s); waiting up to %.0fs for it to come back", why, self.outage_s
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._probe.close()


@dataclass
class _Restarts:
    """What the supervisor did, for the run's summary."""

    counts: dict[str, int] = field(default_factory=dict)
    recovery_s: list[float] = field(default_factory=list)
    due: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (at, died_at)


class Supervisor:
    """Runs the components' loops to the end of the run, restarting the ones that die.

    Args:
        cfg: the run config (``service.max_restarts``, ``restart_backoff_s``; the progress bar).
        transport: the orchestrator's own view of the run's Redis.
        hosts: component name -> Ray actor handle (started, prepared).
        spawn: creates a fresh actor for a component name (the dead one's replacement).
        redis_watch: the Redis watch; None: Redis is not watched (its errors propagate).
        progress_row: reads (steps, metrics, accuracy, extra text) for the progress bar.
    """

    def __init__(
        self,
        cfg: RunConfig,
        transport: Transport,
        hosts: dict[str, Any],
        spawn: Callable[[str], Any] | None = None,
        redis_watch: RedisWatch | None = None,
        progress_row: Callable[[Transport], tuple[int, dict[str, float], float | None, str]]
        | None = None,
    ) -> None:
        self.cfg, self.t, self.hosts = cfg, transport, hosts
        self.spawn, self.redis, self.progress_row = spawn, redis_watch, progress_row
        svc = cfg.service
        self.policy = RestartPolicy(svc.max_restarts, svc.restart_backoff_s)
        self.restarts = _Restarts()
        self._pending: dict[Any, str] = {}

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Until the learner returns: watch Redis, collect results, restart the dead. Then ask
        the rest to stop and collect their reports (30 s). Raises :class:`ServiceError`."""
        import ray

        self._pending = {self.hosts[name].run.remote(): name for name in self.hosts}
        results: dict[str, Any] = {}
        bar = StepProgress(
            self.cfg.train.total_steps,
            0,
            enabled=self.cfg.train.progress_bar,
            description=f"{self.cfg.name} ({self.cfg.service.mode})",
        )
        try:
            while "learner" not in results:
                redis_up = self.redis.check() if self.redis is not None else True
                if self._pending:
                    ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=0.5)
                else:
                    ready = []
                    time.sleep(0.5)
                for ref in ready:
                    self._collect(ref, results)
                self._restart_due()
                if redis_up:
                    self._show(bar)
            if not self._is_done():
                reason = self._safe(self.t.control.stop_reason) or "unknown reason"
                # "rollout-0 failed: ..." when a component stopped the run on its way out
                first = reason.split(":", 1)[0].split(" ", 1)[0]
                raise ServiceError(
                    f"the learner stopped before the run was done: {reason}",
                    components=tuple(dict.fromkeys((first, "learner")))
                    if first in self.hosts
                    else ("learner",),
                )
            self._show(bar)
        finally:
            bar.close()
        self._wind_down(results)
        return results

    def summary(self) -> dict[str, Any]:
        """Restarts per component, the time from each death to its replacement's start, and
        Redis outages (count, server restarts, time to come back)."""
        out: dict[str, Any] = {
            "restarts": dict(self.restarts.counts),
            "restart_seconds": [round(s, 2) for s in self.restarts.recovery_s],
        }
        if self.redis is not None:
            out.update(
                redis_outages=self.redis.outages,
                redis_restarts=self.redis.server_restarts,
                redis_recovery_seconds=[round(s, 2) for s in self.redis.recovery_s],
            )
        return out

    # ---- deaths and restarts -------------------------------------------------------------------

    def _collect(self, ref: Any, results: dict[str, Any]) -> None:
        import ray

        name = self._pending.pop(ref)
        try:
            results[name] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            if not is_death(exc) or self.spawn is None:
                self._safe(self.t.control.request_stop, f"{name} failed")
                raise ServiceError(f"{name} failed: {_cause(exc)}", components=(name,)) from None
            self._schedule_restart(name, exc)
            return
        log.info("%s finished: %s", name, _short(results[name]))

    def _schedule_restart(self, name: str, exc: BaseException) -> None:
        done = self.restarts.counts.get(name, 0)
        if done >= self.policy.max_restarts:
            self._safe(self.t.control.request_stop, f"{name} died too often")
            raise ServiceError(
                f"{name} died {done + 1} times ({_cause(exc)}); its restart budget "
                f"service.max_restarts={self.policy.max_restarts} is spent, so the run stopped; "
                "`d3s run` again resumes it",
                components=(name,),
            )
        delay = self.policy.delay(done)
        now = time.monotonic()
        self.restarts.due[name] = (now + delay, now)
        log.warning(
            "%s died (%s); restart %d of %d in %.1fs",
            name,
            _cause(exc),
            done + 1,
            self.policy.max_restarts,
            delay,
        )

    def _restart_due(self) -> None:
        import ray

        assert self.spawn is not None or not self.restarts.due
        now = time.monotonic()
        for name, (at, died_at) in list(self.restarts.due.items()):
            if now < at:
                continue
            old = self.hosts.get(name)
            if old is not None:
                with contextlib.suppress(Exception):  # dead already; this frees its name at once
                    ray.kill(old, no_restart=True)
            try:
                handle = self.spawn(name)  # type: ignore[misc]
            except ValueError as exc:  # the dead actor's name is not released yet
                log.debug("re-creating %s: %s; trying again", name, exc)
                self.restarts.due[name] = (now + 0.5, died_at)
                continue
            del self.restarts.due[name]
            self.hosts[name] = handle
            self._pending[handle.run.remote()] = name
            self.restarts.counts[name] = self.restarts.counts.get(name, 0) + 1
            self.restarts.recovery_s.append(now - died_at)
            log.warning(
                "%s restarted (%d of %d)",
                name,
                self.restarts.counts[name],
                self.policy.max_restarts,
            )

    # ---- the end -------------------------------------------------------------------------------

    def _wind_down(self, results: dict[str, Any]) -> None:
        """The learner is done: rollouts and the selector see it and return their reports."""
        import ray

        self._safe(self.t.control.request_stop, "run complete")
        deadline = time.monotonic() + 30.0
        while self._pending and time.monotonic() < deadline:
            left = max(0.1, deadline - time.monotonic())
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=left)
            for ref in ready:
                name = self._pending.pop(ref)
                try:
                    results[name] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    log.warning("%s failed while stopping: %s", name, _cause(exc))
        for name in self._pending.values():
            log.warning("%s did not stop within 30s; it will be killed", name)

    def _is_done(self) -> bool:
        done = self._safe(self.t.control.is_done)
        return bool(done)

    def _show(self, bar: StepProgress) -> None:
        if self.progress_row is None:
            return
        with contextlib.suppress(redis.exceptions.RedisError):  # the next tick tries again
            bar.update(*self.progress_row(self.t))

    @staticmethod
    def _safe(fn: Callable[..., Any], *args: Any) -> Any:
        """A call on the run's Redis that must not hide the real error (Redis may be gone)."""
        try:
            return fn(*args)
        except redis.exceptions.RedisError as exc:
            log.warning("%s: %s", getattr(fn, "__name__", "redis"), str(exc).splitlines()[0])
            return None


def _short(result: Any) -> str:
    if isinstance(result, dict):
        keys = ("steps", "step", "batches_written", "groups_published", "versions_loaded")
        return ", ".join(f"{k}={_brief(result[k])}" for k in keys if k in result) or "ok"
    return str(result)


def _brief(value: Any) -> str:
    """A list as its length and ends (one terminal line for a run of any length)."""
    if isinstance(value, list) and len(value) > 3:
        return f"{len(value)} ({value[0]}..{value[-1]})"
    return str(value)

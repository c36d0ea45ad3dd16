"""The HTTP API: a FastAPI app that reports a run's schedule, metrics and queues, and pauses it.

Stateless: every request reads Redis through :class:`~services.transport.streams.Transport`, so
any number of replicas (Ray Serve) or a plain uvicorn process can serve the same run, and a
restarted API shows exactly what the run wrote. Endpoints:

* ``GET /healthz`` — 200 when Redis answers PING, else 503 with the reason.
* ``GET /schedule`` — the selector's schedule (step, progress, rho_s, K, preset); 404 before a run
  has written one.
* ``GET /metrics`` — latest metric values, integer counters, queue depths, paused flag (JSON).
* ``GET /metrics/prometheus`` — the same in the Prometheus text format (version 0.0.4).
* ``POST /control/pause``, ``POST /control/resume`` — need ``Authorization: Bearer <token>``;
  disabled (403) when the server was started without a control token.

A Redis that cannot be reached turns any endpoint into a 503, never a 500.
"""

# No `from __future__ import annotations`: FastAPI must evaluate the route signatures, and some
# of their types (TransportDep) are local to create_app.

import hmac
import logging
import math
import re
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import redis
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from pydantic import BaseModel, Field
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services.transport.streams import Transport

__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "ControlResponse",
    "ErrorResponse",
    "HealthResponse",
    "MetricsResponse",
    "QueueDepths",
    "ScheduleResponse",
    "create_app",
    "prometheus_name",
]

log = logging.getLogger(__name__)

# The classic text format: what every Prometheus server and most scrapers parse. The library's
# CONTENT_TYPE_LATEST moved to 1.0.0 (UTF-8 names), which older scrapers reject.
PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_PREFIX = "d3s_"
_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")


# ---- response models ----------------------------------------------------------------------------


class ErrorResponse(BaseModel):
    """An error, as FastAPI reports it."""

    detail: str


class HealthResponse(BaseModel):
    """Liveness of the API and its Redis."""

    status: Literal["ok", "unavailable"]
    redis: bool = Field(description="whether Redis answered PING")
    reason: str | None = Field(None, description="why Redis is unavailable (503 only)")


class ScheduleResponse(BaseModel):
    """The selector's current schedule state (the ``{ns}:schedule`` hash).

    A field the run has not written (yet) is null.
    """

    step: int | None = Field(None, description="learner step the schedule was computed for")
    total_steps: int | None = Field(None, description="steps planned for the run")
    progress: float | None = Field(None, description="step / total_steps, in [0, 1]")
    sample_ratio: float | None = Field(None, description="rho_s: share of samples kept")
    token_ratio: float | None = Field(None, description="K: share of tokens kept")
    preset: str | None = Field(None, description="selection preset, e.g. 'd3s' or 'grpo'")


class QueueDepths(BaseModel):
    """Records waiting in each stream (delivered but unacknowledged ones included)."""

    groups: int = Field(description="scored groups waiting for the selector")
    batches: int = Field(description="curated batches waiting for the learner")
    dead: int = Field(description="malformed records set aside in the dead-letter stream")


class MetricsResponse(BaseModel):
    """Everything the run reports, in one consistent-enough read."""

    metrics: dict[str, float | None] = Field(
        description="latest value of each metric; null where it is NaN or infinite"
    )
    counters: dict[str, int] = Field(description="monotonic event counters")
    queues: QueueDepths
    paused: bool = Field(description="whether an operator paused the run")


class ControlResponse(BaseModel):
    """The run's paused flag after a control request."""

    paused: bool


# ---- parsing Redis values -----------------------------------------------------------------------


class _MalformedValue(ValueError):
    """A hash field that does not parse as the type the API documents."""


def _as_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise _MalformedValue(f"{raw!r} is not a number") from None


def _as_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        pass
    # Writers that format every number as a float ("12.0") still mean an integer.
    value = _as_float(raw)
    if not value.is_integer():
        raise _MalformedValue(f"{raw!r} is not an integer")
    return int(value)


def _finite_or_none(value: float) -> float | None:
    # Strict JSON has no NaN/Infinity (Starlette refuses to encode them); null says "no value".
    return value if math.isfinite(value) else None


def _parse_numbers(raw: dict[str, str], parse: Any, what: str) -> dict[str, Any]:
    """Parse every field of a hash; one malformed field is logged and left out, not a 500."""
    out: dict[str, Any] = {}
    for name, value in sorted(raw.items()):
        try:
            out[name] = parse(value)
        except _MalformedValue as exc:
            log.warning("skipping %s %r: %s", what, name, exc)
    return out


def _parse_schedule(raw: dict[str, str]) -> ScheduleResponse:
    fields: dict[str, Any] = {}
    for name, parse in (
        ("step", _as_int),
        ("total_steps", _as_int),
        ("progress", _as_float),
        ("sample_ratio", _as_float),
        ("token_ratio", _as_float),
    ):
        if name not in raw:
            continue
        try:
            value = parse(raw[name])
        except _MalformedValue as exc:
            raise HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR, f"schedule field {name!r}: {exc}"
            ) from None
        fields[name] = _finite_or_none(value) if isinstance(value, float) else value
    if "preset" in raw:
        fields["preset"] = raw["preset"]
    return ScheduleResponse(**fields)


# ---- Prometheus ---------------------------------------------------------------------------------


def prometheus_name(name: str) -> str:
    """``d3s_`` + ``name`` with every character Prometheus does not allow replaced by ``_``.

    Colons are allowed by the format but reserved for recording rules, so they are replaced too.
    """
    return _PREFIX + _INVALID_NAME_CHARS.sub("_", name)


class _Snapshot:
    """One read of everything the metrics endpoints report."""

    def __init__(self, transport: Transport) -> None:
        self.metrics: dict[str, float] = _parse_numbers(
            transport.read_hash(transport.metrics_key), _as_float, "metric"
        )
        self.counters: dict[str, int] = _parse_numbers(
            transport.read_hash(transport.stats_key), _as_int, "counter"
        )
        self.queues = QueueDepths(
            groups=transport.backlog(transport.groups_stream),
            batches=transport.backlog(transport.batches_stream),
            dead=transport.backlog(transport.dead_stream),
        )
        self.paused = transport.paused()
        raw_schedule = transport.read_hash(transport.schedule_key)
        self.schedule = _parse_schedule(raw_schedule) if raw_schedule else None


class _SnapshotCollector:
    """A one-shot collector over a :class:`_Snapshot`, for a registry that lives one request.

    Sanitising can map two names onto one (``a.b`` and ``a/b``) or onto a fixed family
    (a metric called ``paused``); a duplicate family would make the whole exposition unparsable,
    so the first claim wins (fixed families, then counters, then metrics, each by name) and the
    rest are logged and left out.
    """

    def __init__(self, snap: _Snapshot) -> None:
        self.snap = snap
        self._taken: set[str] = set()

    def _claim(self, *names: str) -> bool:
        if self._taken.intersection(names):
            log.warning("Prometheus name %s is taken; leaving that series out", names[0])
            return False
        self._taken.update(names)
        return True

    def collect(self) -> Iterable[Metric]:
        self._taken.clear()
        yield from self._fixed()
        for name, value in self.snap.counters.items():
            family = prometheus_name(name)
            family = family.removesuffix("_total")  # the library appends it again
            # A counter's samples are named <family>_total: both names are spoken for.
            if self._claim(family, family + "_total"):
                yield CounterMetricFamily(family, f"D3S counter {name!r}", value=value)
        for name, value in self.snap.metrics.items():
            family = prometheus_name(name)
            if self._claim(family):
                yield GaugeMetricFamily(family, f"D3S metric {name!r} (latest value)", value=value)

    def _fixed(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "d3s_queue_depth", "records waiting in each stream", labels=["queue"]
        )
        for label, depth in self.snap.queues.model_dump().items():
            queue.add_metric([label], depth)
        self._claim("d3s_queue_depth")
        yield queue
        self._claim("d3s_paused")
        yield GaugeMetricFamily(
            "d3s_paused", "1 while an operator paused the run", value=int(self.snap.paused)
        )
        schedule = self.snap.schedule
        if schedule is None:
            return
        for field in ("step", "total_steps", "progress", "sample_ratio", "token_ratio"):
            value = getattr(schedule, field)
            if value is not None and self._claim(f"d3s_schedule_{field}"):
                yield GaugeMetricFamily(
                    f"d3s_schedule_{field}", f"schedule {field}", value=float(value)
                )
        if schedule.preset is not None and self._claim("d3s_schedule_info"):
            info = GaugeMetricFamily(
                "d3s_schedule_info",
                "selection preset of the run (value always 1)",
                labels=["preset"],
            )
            info.add_metric([schedule.preset], 1)
            yield info


def _render_prometheus(snap: _Snapshot) -> bytes:
    # A fresh registry per request: nothing global to go stale or to collide across apps.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)


# ---- the app ------------------------------------------------------------------------------------


class _RedisHolder:
    """The app's Redis client, created on first use.

    Lazily, so building the app opens no connection: the app can be built before Redis is up,
    and in a process other than the one that serves it.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def get(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                self._client = redis.Redis.from_url(
                    self.url,
                    decode_responses=False,  # the Transport requires bytes
                    socket_timeout=self.timeout_s,
                    socket_connect_timeout=min(self.timeout_s, 1.0),
                    # Enough to replace a connection Redis dropped, not so much that a dead
                    # Redis keeps a health check waiting (redis-py's default backs off for
                    # seconds).
                    retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
                    health_check_interval=30,
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


_bearer = HTTPBearer(
    auto_error=False,  # missing credentials are answered here: 401, or 403 when disabled
    description="the control token the API was started with",
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorResponse, "description": "Redis is unreachable"},
}


def create_app(
    redis_url: str,
    namespace: str = "d3s",
    control_token: str | None = None,
    *,
    redis_timeout_s: float = 2.0,
) -> FastAPI:
    """Build the API for the run whose keys live under ``namespace`` in the Redis at ``redis_url``.

    Args:
        redis_url: e.g. ``redis://127.0.0.1:6379/0``.
        namespace: the run's key namespace (``{namespace}:schedule`` etc.).
        control_token: bearer token required by ``/control/*``; None or empty disables control
            (those endpoints answer 403), so a server started without one cannot be paused.
        redis_timeout_s: socket timeout for each Redis call; bounds how long a request waits on
            an unresponsive Redis before answering 503.
    """
    if not namespace:
        raise ValueError("namespace must be non-empty")
    holder = _RedisHolder(redis_url, redis_timeout_s)
    token = control_token or None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        holder.close()

    app = FastAPI(
        title="D3S-RL",
        summary="Schedule, metrics and control of a D3S-RL post-training run",
        version="1",
        lifespan=lifespan,
    )

    def transport() -> Transport:
        return Transport(holder.get(), namespace)

    TransportDep = Annotated[Transport, Depends(transport)]

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        return JSONResponse(
            {"detail": f"Redis unavailable: {exc}"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE
        )

    @app.get(
        "/healthz",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "Redis does not answer"}},
        summary="Liveness: the API runs and Redis answers PING",
    )
    def healthz() -> HealthResponse | JSONResponse:
        try:
            holder.get().ping()
        except redis.exceptions.RedisError as exc:
            body = HealthResponse(status="unavailable", redis=False, reason=str(exc) or repr(exc))
            return JSONResponse(body.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
        return HealthResponse(status="ok", redis=True)

    @app.get(
        "/schedule",
        response_model=ScheduleResponse,
        responses={
            404: {"model": ErrorResponse, "description": "no run has written a schedule yet"},
            **_ERRORS,
        },
        summary="The selector's current schedule: step, progress, rho_s, K, preset",
    )
    def schedule(t: TransportDep) -> ScheduleResponse:
        raw = t.read_hash(t.schedule_key)
        if not raw:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"no schedule yet: no run has written {t.schedule_key!r} "
                "(is the selector running with this namespace?)",
            )
        return _parse_schedule(raw)

    @app.get(
        "/metrics",
        response_model=MetricsResponse,
        responses=_ERRORS,
        summary="Latest metrics, counters, queue depths and the paused flag",
    )
    def metrics(t: TransportDep) -> MetricsResponse:
        snap = _Snapshot(t)
        return MetricsResponse(
            metrics={k: _finite_or_none(v) for k, v in snap.metrics.items()},
            counters=snap.counters,
            queues=snap.queues,
            paused=snap.paused,
        )

    @app.get(
        "/metrics/prometheus",
        response_class=Response,
        responses={
            200: {
                "content": {PROMETHEUS_CONTENT_TYPE: {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition format 0.0.4",
            },
            **_ERRORS,
        },
        summary="The same metrics for a Prometheus scraper",
    )
    def metrics_prometheus(t: TransportDep) -> Response:
        return Response(_render_prometheus(_Snapshot(t)), media_type=PROMETHEUS_CONTENT_TYPE)

    def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if token is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "control is disabled: the API was started without a control token",
            )
        # compare_digest: the time taken must not reveal how much of a guess was right.
        if credentials is None or not hmac.compare_digest(
            credentials.credentials.encode(), token.encode()
        ):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    control_errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
        403: {"model": ErrorResponse, "description": "control disabled (no token configured)"},
        **_ERRORS,
    }

    def set_paused(t: Transport, paused: bool) -> ControlResponse:
        t.set_paused(paused)
        log.info("run %s %s via the API", namespace, "paused" if paused else "resumed")
        return ControlResponse(paused=t.paused())

    @app.post(
        "/control/pause",
        response_model=ControlResponse,
        responses=control_errors,
        dependencies=[Depends(authorize)],
        summary="Pause the run (rollouts and selector stop taking new work)",
    )
    def pause(t: TransportDep) -> ControlResponse:
        return set_paused(t, True)

    @app.post(
        "/control/resume",
        response_model=ControlResponse,
        responses=control_errors,
        dependencies=[Depends(authorize)],
        summary="Resume a paused run",
    )
    def resume(t: TransportDep) -> ControlResponse:
        return set_paused(t, False)

    return app

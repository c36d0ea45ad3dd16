"""The API's routes: each reads the run's state through the request's :class:`Transport` and
hands it to :mod:`services.api.views`; :func:`services.api.app.create_app` mounts them.

Reading:

* ``GET|HEAD /healthz`` — 200 when Redis answers PING, else 503 with the reason.
* ``GET /schedule`` — the selector's schedule (step, progress, rho_s, K, preset); 404 before one.
* ``GET /metrics`` — latest metric values, counters, queue depths, run flags (JSON).
* ``GET /metrics/prometheus`` — the same in the Prometheus text format (version 0.0.4).
* ``GET /metrics/history`` — per-step metric rows, paged by ``since_step`` / ``limit``.
* ``GET /metrics/throughput`` — samples/s, tokens/s, learner busy fraction over recent steps.
* ``GET /actors`` — each rollout actor's weight version, groups published, last heartbeat.
* ``GET /dead-letters`` — the newest dead letters and their counts by reason.
* ``GET /checkpoints`` — the learner's checkpoints.
* ``GET /config`` — the run's config, secrets redacted.
* ``GET /`` — a live dashboard page (static files under ``/static``).

Control (``Authorization: Bearer <token>``; 403 when the server was started without a token):
``POST /control/pause``, ``POST /control/resume``, ``POST /control/stop``.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.connection import RunConnection
from services.api.models import (
    ActorsResponse,
    CheckpointsResponse,
    ConfigResponse,
    ControlResponse,
    DeadLettersResponse,
    ErrorResponse,
    HealthResponse,
    HistoryResponse,
    MetricsResponse,
    ScheduleResponse,
    StopRequest,
    StopResponse,
    ThroughputResponse,
)
from services.api.prometheus import PROMETHEUS_CONTENT_TYPE, render_prometheus
from services.api.views import (
    MAX_NAMES,
    NAMES_MAX_LENGTH,
    NAMES_PATTERN,
    MalformedValue,
    actors_view,
    checkpoints_view,
    dead_letters_view,
    history_page,
    latest_history,
    metrics_response,
    parse_names,
    parse_schedule,
    read_snapshot,
    throughput,
)
from services.common.secrets import redact_config
from services.transport.bundle import Transport

__all__ = ["MAX_DEAD_LETTERS", "MAX_HISTORY_PAGE", "MAX_THROUGHPUT_WINDOW", "STATIC_DIR", "router"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_HISTORY_PAGE = 1000
MAX_THROUGHPUT_WINDOW = 1000
MAX_DEAD_LETTERS = 500
# Steps are ints Redis and JSON both carry exactly; larger ones are a client's mistake.
_MAX_STEP = 2**31 - 1


# ---- dependencies ----------------------------------------------------------------------------


def _transport(request: Request) -> Transport:
    connection: RunConnection = request.app.state.run  # set by create_app
    return connection.transport()


TransportDep = Annotated[Transport, Depends(_transport)]

_bearer = HTTPBearer(
    auto_error=False,  # missing credentials are answered here: 401, or 403 when disabled
    description="the control token the API was started with",
)


def _authorize(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token: str | None = request.app.state.control_token
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


_ERRORS: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorResponse, "description": "Redis is unreachable"},
}
_CONTROL_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "a request body that is not valid JSON"},
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    403: {"model": ErrorResponse, "description": "control disabled (no token configured)"},
    **_ERRORS,
}

router = APIRouter()


# ---- health, dashboard --------------------------------------------------------------------------


def _ping(t: Transport) -> HealthResponse:
    try:
        t.client.ping()
    except redis.exceptions.RedisError as exc:
        return HealthResponse(status="unavailable", redis=False, reason=str(exc) or repr(exc))
    return HealthResponse(status="ok", redis=True)


@router.get(
    "/healthz",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "Redis does not answer"}},
    summary="Liveness: the API runs and Redis answers PING",
)
def healthz(request: Request) -> HealthResponse | JSONResponse:
    body = _ping(_transport(request))
    if not body.redis:
        return JSONResponse(body.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return body


@router.head(
    "/healthz",
    response_class=Response,
    responses={200: {"description": "Redis answers PING"}, 503: {"description": "it does not"}},
    summary="Liveness for probes that send HEAD: the status code only",
)
def healthz_head(request: Request) -> Response:
    ok = _ping(_transport(request)).redis
    return Response(status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE)


@router.get(
    "/",
    response_class=FileResponse,
    responses={200: {"content": {"text/html": {}}, "description": "the dashboard page"}},
    summary="A live dashboard of the run (polls the JSON routes)",
)
def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


# ---- schedule, metrics --------------------------------------------------------------------------


@router.get(
    "/schedule",
    response_model=ScheduleResponse,
    responses={
        404: {"model": ErrorResponse, "description": "no run has written a schedule yet"},
        **_ERRORS,
    },
    summary="The selector's current schedule: step, progress, rho_s, K, preset",
)
def schedule(t: TransportDep) -> ScheduleResponse:
    raw = t.state.schedule()
    if not raw:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"no schedule yet: no run has written {t.keys.schedule!r} "
            "(is the selector running with this namespace?)",
        )
    return parse_schedule(raw)


@router.get(
    "/metrics",
    response_model=MetricsResponse,
    responses=_ERRORS,
    summary="Latest metrics, counters, queue depths and the run's flags",
)
def metrics(t: TransportDep) -> MetricsResponse:
    return metrics_response(read_snapshot(t))


@router.get(
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
    return Response(render_prometheus(read_snapshot(t)), media_type=PROMETHEUS_CONTENT_TYPE)


@router.get(
    "/metrics/history",
    response_model=HistoryResponse,
    responses=_ERRORS,
    summary="Per-step metric series, one page at a time",
)
def metrics_history(
    t: TransportDep,
    names: Annotated[
        str | None,
        Query(
            max_length=NAMES_MAX_LENGTH,
            pattern=NAMES_PATTERN,
            description=f"comma-separated metric names (at most {MAX_NAMES}); every field of the "
            "returned rows if absent",
            examples=["reward_mean,heldout_accuracy"],
        ),
    ] = None,
    since_step: Annotated[int, Query(ge=0, le=_MAX_STEP, description="first step to return")] = 0,
    limit: Annotated[
        int, Query(ge=1, le=MAX_HISTORY_PAGE, description="most rows in one page")
    ] = 200,
) -> HistoryResponse:
    try:
        wanted = parse_names(names)
    except ValueError as exc:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "names"), "msg": str(exc), "input": names}]
        ) from None
    rows = t.state.history(since_step, limit + 1)
    return history_page(rows, wanted, since_step, limit)


@router.get(
    "/metrics/throughput",
    response_model=ThroughputResponse,
    responses=_ERRORS,
    summary="Samples/s, kept tokens/s and learner busy fraction over the latest steps",
)
def metrics_throughput(
    t: TransportDep,
    window: Annotated[
        int,
        Query(ge=2, le=MAX_THROUGHPUT_WINDOW, description="how many latest step rows to use"),
    ] = 20,
) -> ThroughputResponse:
    return throughput(latest_history(t.state, window), window)


# ---- actors, dead letters, checkpoints, config --------------------------------------------------


@router.get(
    "/actors",
    response_model=ActorsResponse,
    responses=_ERRORS,
    summary="Each rollout actor's weight version, groups published and last heartbeat",
)
def actors(t: TransportDep) -> ActorsResponse:
    learner_version = t.state.numeric_metrics().get("learner_version")
    return actors_view(t.state.heartbeats(), learner_version, time.time())


@router.get(
    "/dead-letters",
    response_model=DeadLettersResponse,
    responses=_ERRORS,
    summary="The newest dead-lettered records (reason, source) and counts by reason",
)
def dead_letters(
    t: TransportDep,
    count: Annotated[
        int, Query(ge=1, le=MAX_DEAD_LETTERS, description="how many of the newest to return")
    ] = 50,
) -> DeadLettersResponse:
    total = t.state.counter("dead")
    return dead_letters_view(t.state.dead_letters(count), total, t.queue.backlog(t.keys.dead))


@router.get(
    "/checkpoints",
    response_model=CheckpointsResponse,
    responses=_ERRORS,
    summary="The learner's checkpoints, oldest first",
)
def checkpoints(t: TransportDep) -> CheckpointsResponse:
    return checkpoints_view(t.state.checkpoints())


@router.get(
    "/config",
    response_model=ConfigResponse,
    responses={
        404: {"model": ErrorResponse, "description": "no run has written its config yet"},
        **_ERRORS,
    },
    summary="The run's configuration, secrets redacted",
)
def config(request: Request, t: TransportDep) -> ConfigResponse:
    raw = t.state.config()
    if raw is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no config yet: no run has written {t.keys.config!r}"
        )
    if not isinstance(raw, dict):
        raise MalformedValue(f"config: {t.keys.config!r} holds {type(raw).__name__}, not an object")
    known = [request.app.state.control_token] if request.app.state.control_token else []
    body, paths = redact_config(raw, known)
    return ConfigResponse(config=body, redacted=paths)


# ---- control ------------------------------------------------------------------------------------


def _set_paused(t: Transport, paused: bool) -> ControlResponse:
    t.control.set_paused(paused)
    log.info("run %s %s via the API", t.namespace, "paused" if paused else "resumed")
    return ControlResponse(paused=t.control.paused())


@router.post(
    "/control/pause",
    response_model=ControlResponse,
    responses=_CONTROL_ERRORS,
    dependencies=[Depends(_authorize)],
    summary="Pause the run (rollouts and selector stop taking new work)",
)
def pause(t: TransportDep) -> ControlResponse:
    return _set_paused(t, True)


@router.post(
    "/control/resume",
    response_model=ControlResponse,
    responses=_CONTROL_ERRORS,
    dependencies=[Depends(_authorize)],
    summary="Resume a paused run",
)
def resume(t: TransportDep) -> ControlResponse:
    return _set_paused(t, False)


@router.post(
    "/control/stop",
    response_model=StopResponse,
    responses=_CONTROL_ERRORS,
    dependencies=[Depends(_authorize)],
    summary="Stop the run gracefully: every component winds down at its next step",
)
def stop(t: TransportDep, body: Annotated[StopRequest | None, Body()] = None) -> StopResponse:
    reason = (body or StopRequest()).reason
    t.control.request_stop(reason)
    kept = t.control.stop_reason() or reason
    log.info("run %s: stop requested via the API (%s)", t.namespace, kept)
    return StopResponse(stop_requested=True, reason=kept)

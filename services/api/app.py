"""The HTTP API: a FastAPI app that reports a run's progress and state, and pauses or stops it.

Stateless: every request reads the run's Redis through :class:`~services.transport.bundle.Transport`,
so any number of replicas (Ray Serve) or a plain uvicorn process can serve the same run, and a
restarted API shows exactly what the run wrote. The app's connection, namespace and control token
live on ``app.state``; the routes (:mod:`services.api.routes`, which lists them) are plain
module-level functions.

A Redis that cannot be reached turns any endpoint into a 503, never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from services.api.connection import RunConnection
from services.api.routes import (
    MAX_DEAD_LETTERS,
    MAX_HISTORY_PAGE,
    MAX_THROUGHPUT_WINDOW,
    STATIC_DIR,
    router,
)
from services.api.views import MalformedValue
from services.transport.keys import RunKeys

__all__ = [
    "MAX_DEAD_LETTERS",
    "MAX_HISTORY_PAGE",
    "MAX_THROUGHPUT_WINDOW",
    "STATIC_DIR",
    "RunConnection",
    "create_app",
]

log = logging.getLogger(__name__)


# ---- error handlers -----------------------------------------------------------------------------


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis unavailable: %s", exc)
    return JSONResponse(
        {"detail": f"Redis unavailable: {exc}"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE
    )


async def _malformed(_: Request, exc: Exception) -> JSONResponse:
    # The run wrote something the API cannot read: a defect worth a 500, named precisely.
    log.error("malformed run state: %s", exc)
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)


# ---- the app ------------------------------------------------------------------------------------


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.run.close()


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
    RunKeys(namespace)  # a bad namespace fails here, naming it, not at the first request
    if redis_timeout_s <= 0:
        raise ValueError(f"redis_timeout_s: must be > 0, got {redis_timeout_s}")
    app = FastAPI(
        title="D3S-RL",
        summary="Progress, metrics and control of a D3S-RL post-training run",
        version="1",
        lifespan=_lifespan,
    )
    app.state.run = RunConnection(redis_url, namespace, redis_timeout_s)
    app.state.control_token = control_token or None
    app.add_exception_handler(redis.exceptions.ConnectionError, _redis_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, _redis_down)
    app.add_exception_handler(MalformedValue, _malformed)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app

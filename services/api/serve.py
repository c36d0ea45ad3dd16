"""Serving the HTTP API: as a Ray Serve deployment, or with plain uvicorn.

* :func:`start_api` / :func:`stop_api` — Ray Serve (what ``d3s run`` uses next to its Ray
  actors): one replica of :func:`build_deployment`'s FastAPI-ingress deployment behind Serve's
  HTTP proxy.
* :func:`run_standalone` — the same app under uvicorn, blocking, without Ray (``d3s api``,
  docker-compose).
* :func:`serve_in_thread` — the app under uvicorn in a background thread of this process, for as
  long as a ``with`` block runs (tests, notebooks).

Both bind 127.0.0.1 unless told otherwise: control needs a token, but the read endpoints have none.
Ray is imported lazily, so the uvicorn path does not pay for it.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from services.api.app import create_app
from services.common.net import free_port

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve.deployment import Deployment

__all__ = [
    "APP_NAME",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "build_deployment",
    "run_standalone",
    "serve_in_thread",
    "start_api",
    "stop_api",
]

log = logging.getLogger(__name__)

APP_NAME = "d3s-api"
DEFAULT_HOST = "127.0.0.1"
# Not 8265 (Ray's dashboard) and not 6379 (Redis); Serve's own default too.
DEFAULT_PORT = 8000


def _url_host(host: str) -> str:
    """The host a client on this machine uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _loopback_replica_grpc() -> None:
    """In the replica, before Serve starts it: bind the replica's inter-deployment gRPC server
    to loopback instead of ``[::]`` when this node's address is loopback (a local run), like
    every other listener of a local run. A private Serve hook: if it moves, nothing breaks."""
    import contextlib

    with contextlib.suppress(ImportError, AttributeError):
        import ray
        from ray.serve._private import replica

        original = replica.add_port_to_grpc_server
        if (
            getattr(original, "d3s_loopback", False)
            or ray.util.get_node_ip_address() != "127.0.0.1"
        ):
            return

        def add_port(server: Any, address: str) -> Any:
            if address.startswith("[::]:"):
                address = "127.0.0.1:" + address.rsplit(":", 1)[1]
            return original(server, address)

        add_port.d3s_loopback = True  # type: ignore[attr-defined]
        replica.add_port_to_grpc_server = add_port


def build_deployment(
    redis_url: str, namespace: str = "d3s", control_token: str | None = None
) -> Deployment:
    """The Ray Serve deployment of :func:`~services.api.app.create_app` for one run.

    The FastAPI app is built by the replica (a builder function given to ``serve.ingress``), not
    pickled from here: its Redis client then belongs to the replica's process. One replica using
    no CPU reservation: the API only reads Redis, and a CPU reserved for it would be one the
    rollout or learner actors cannot get.
    """
    from ray import serve

    def build_app() -> Any:
        _loopback_replica_grpc()
        return create_app(redis_url, namespace, control_token)

    @serve.deployment(
        name="D3SApi",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        # Requests are short Redis reads; many may wait on one replica.
        max_ongoing_requests=64,
    )
    @serve.ingress(build_app)
    class D3SApi:
        """FastAPI ingress of the D3S-RL HTTP API (routes come from ``create_app``)."""

    return D3SApi


def _wait_for_route(base_url: str, timeout_s: float) -> None:
    """Wait until Serve's proxy at ``base_url`` routes ``/`` to :data:`APP_NAME`.

    ``serve.run`` returns once the replica runs, but the proxy learns the route a moment later;
    until then requests get 404/503 from the proxy, not the app.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/-/routes", timeout=2.0) as resp:
                routes = json.loads(resp.read().decode())
            if routes.get("/") == APP_NAME:
                return
            last = f"routes {routes}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Ray Serve at {base_url} did not route '/' to {APP_NAME!r} within "
                f"{timeout_s:.0f}s (last: {last}); if Serve was already running, it keeps the "
                "host/port it was first started with"
            )
        time.sleep(0.2)


def start_api(
    redis_url: str,
    namespace: str = "d3s",
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    control_token: str | None = None,
    *,
    ready_timeout_s: float = 60.0,
) -> str:
    """Serve the API with Ray Serve on ``host:port``; returns its base URL (no trailing slash).

    Uses the Ray the caller connected to (``ray.init``); starts a local one without the dashboard
    if there is none. ``port=0`` picks a free port (Serve itself cannot bind port 0 and report
    it). Returns once the proxy routes requests to the app.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        log.info("no Ray connection: starting a local Ray for the API")
        ray.init(include_dashboard=False)
    if port == 0:
        port = free_port(host or "0.0.0.0")
    # One proxy, on the head node: the URL returned is the one that works.
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    deployment = build_deployment(redis_url, namespace, control_token)
    serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")
    base_url = f"http://{_url_host(host)}:{port}"
    _wait_for_route(base_url, ready_timeout_s)
    log.info("D3S API (Ray Serve) at %s, namespace %s", base_url, namespace)
    return base_url


def stop_api() -> None:
    """Shut Ray Serve down (the API app, its proxy and controller); Ray itself keeps running."""
    from ray import serve

    serve.shutdown()


def run_standalone(
    redis_url: str,
    namespace: str = "d3s",
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    control_token: str | None = None,
) -> None:
    """Serve the API with uvicorn in this process until interrupted (no Ray needed)."""
    import uvicorn

    app = create_app(redis_url, namespace, control_token)
    log.info("D3S API (uvicorn) on %s:%d, namespace %s", host, port, namespace)
    uvicorn.run(app, host=host, port=port, log_level="info")


@contextmanager
def serve_in_thread(
    app: FastAPI, host: str = DEFAULT_HOST, port: int = 0, *, startup_timeout_s: float = 10.0
) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread while the block runs; yields its base URL.

    The socket is bound here and handed to uvicorn, so with ``port=0`` no other process can take
    the port between choosing and binding it. The server is shut down (lifespan included) on exit.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="d3s-api", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see its log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {startup_timeout_s:.0f}s")
            time.sleep(0.01)
        yield f"http://{_url_host(host)}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

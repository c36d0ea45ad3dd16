"""The HTTP API over a real HTTP server (uvicorn on a loopback port) and a real Redis.

Run state is written the way the services write it (through the Transport's keys and methods);
every endpoint is then read with httpx. One test runs the same app under real Ray Serve.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from services.api.app import create_app, prometheus_name
from services.common.net import free_port
from services.transport.redis_server import EmbeddedRedis
from services.transport.streams import Transport

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
SCHEDULE = {
    "step": "7",
    "total_steps": "100",
    "progress": repr(0.07),
    "sample_ratio": "0.5",
    "token_ratio": "0.25",
    "preset": "d3s",
}


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread on a free loopback port; yield its URL.

    The socket is bound here and handed to uvicorn, so no other process can take the port
    between choosing and binding it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def api(redis_server: EmbeddedRedis, transport: Transport) -> Iterator[httpx.Client]:
    """An httpx client for the API of ``transport``'s namespace, with control enabled."""
    app = create_app(redis_server.url, transport.namespace, control_token=TOKEN)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def write_run_state(t: Transport) -> None:
    """What a running selector/learner leaves in Redis: schedule, metrics, counters, queues."""
    t.client.hset(t.schedule_key, mapping=SCHEDULE)
    t.client.hset(
        t.metrics_key,
        mapping={
            "reward_mean": "0.75",
            "heldout_accuracy": "0.5",
            "loss": "nan",  # a diverged step: must not break the JSON
            "kept_samples": "48.0",
        },
    )
    pipe = t.client.pipeline()
    pipe.hincrby(t.stats_key, "groups_written", 12)
    pipe.hincrby(t.stats_key, "groups_stale", 2)
    pipe.hincrby(t.stats_key, "dead", 1)
    for stream, n in ((t.groups_stream, 3), (t.batches_stream, 1), (t.dead_stream, 2)):
        for i in range(n):
            pipe.xadd(stream, {"i": i})
    pipe.execute()
    t.set_paused(True)


# ---- health -------------------------------------------------------------------------------------


def test_healthz_ok(api: httpx.Client) -> None:
    r = api.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "redis": True, "reason": None}


def test_redis_down_gives_503_not_500(transport: Transport) -> None:
    dead_port = free_port()  # nothing listens there
    app = create_app(f"redis://127.0.0.1:{dead_port}/0", transport.namespace, control_token=TOKEN)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        start = time.monotonic()
        r = client.get("/healthz")
        elapsed = time.monotonic() - start
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unavailable" and body["redis"] is False
        assert str(dead_port) in body["reason"]
        assert elapsed < 3, f"a refused connection should fail fast, took {elapsed:.1f}s"

        for method, path in (
            ("GET", "/schedule"),
            ("GET", "/metrics"),
            ("GET", "/metrics/prometheus"),
            ("POST", "/control/pause"),
        ):
            r = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 503, (path, r.text)
            assert "Redis unavailable" in r.json()["detail"]


# ---- schedule -----------------------------------------------------------------------------------


def test_schedule_404_until_written_then_typed(api: httpx.Client, transport: Transport) -> None:
    r = api.get("/schedule")
    assert r.status_code == 404
    assert "no schedule yet" in r.json()["detail"]
    assert transport.schedule_key in r.json()["detail"]

    transport.client.hset(transport.schedule_key, mapping=SCHEDULE)
    r = api.get("/schedule")
    assert r.status_code == 200
    body = r.json()
    assert body == {
        "step": 7,
        "total_steps": 100,
        "progress": 0.07,
        "sample_ratio": 0.5,
        "token_ratio": 0.25,
        "preset": "d3s",
    }
    assert type(body["step"]) is int and type(body["total_steps"]) is int
    assert all(type(body[k]) is float for k in ("progress", "sample_ratio", "token_ratio"))

    # The API is stateless: a later write shows at once.
    transport.client.hset(transport.schedule_key, "step", "8")
    assert api.get("/schedule").json()["step"] == 8


def test_schedule_partial_and_float_formatted_ints(api: httpx.Client, transport: Transport) -> None:
    transport.client.hset(transport.schedule_key, mapping={"step": "12.0", "preset": "grpo"})
    body = api.get("/schedule").json()
    assert body["step"] == 12 and type(body["step"]) is int
    assert body["preset"] == "grpo"
    assert body["total_steps"] is None and body["sample_ratio"] is None


def test_schedule_malformed_field_is_named(api: httpx.Client, transport: Transport) -> None:
    transport.client.hset(transport.schedule_key, mapping={"step": "1.5", "preset": "d3s"})
    r = api.get("/schedule")
    assert r.status_code == 500
    assert "'step'" in r.json()["detail"] and "integer" in r.json()["detail"]


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_json(api: httpx.Client, transport: Transport) -> None:
    empty = api.get("/metrics")
    assert empty.status_code == 200
    assert empty.json() == {
        "metrics": {},
        "counters": {},
        "queues": {"groups": 0, "batches": 0, "dead": 0},
        "paused": False,
    }

    write_run_state(transport)
    body = api.get("/metrics").json()
    assert body == {
        "metrics": {
            "heldout_accuracy": 0.5,
            "kept_samples": 48.0,
            "loss": None,  # NaN has no JSON spelling
            "reward_mean": 0.75,
        },
        "counters": {"dead": 1, "groups_stale": 2, "groups_written": 12},
        "queues": {"groups": 3, "batches": 1, "dead": 2},
        "paused": True,
    }
    assert all(type(v) is int for v in body["counters"].values())


def test_metrics_skip_a_malformed_value(api: httpx.Client, transport: Transport) -> None:
    transport.client.hset(transport.metrics_key, mapping={"reward_mean": "0.25", "bad": "n/a"})
    body = api.get("/metrics").json()
    assert body["metrics"] == {"reward_mean": 0.25}


def test_prometheus_exposition(api: httpx.Client, transport: Transport) -> None:
    write_run_state(transport)
    transport.client.hset(transport.metrics_key, "eval/acc@1", "0.125")
    r = api.get("/metrics/prometheus")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")

    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }

    assert families["d3s_reward_mean"].type == "gauge"
    assert samples[("d3s_reward_mean", ())] == 0.75
    assert samples[("d3s_heldout_accuracy", ())] == 0.5
    assert math.isnan(samples[("d3s_loss", ())])  # Prometheus has NaN, unlike JSON
    assert samples[("d3s_eval_acc_1", ())] == 0.125  # sanitised name

    assert families["d3s_groups_written"].type == "counter"
    assert samples[("d3s_groups_written_total", ())] == 12
    assert samples[("d3s_dead_total", ())] == 1

    for queue, depth in (("groups", 3), ("batches", 1), ("dead", 2)):
        assert samples[("d3s_queue_depth", (("queue", queue),))] == depth
    assert samples[("d3s_paused", ())] == 1

    assert samples[("d3s_schedule_step", ())] == 7
    assert samples[("d3s_schedule_total_steps", ())] == 100
    assert samples[("d3s_schedule_progress", ())] == pytest.approx(0.07)
    assert samples[("d3s_schedule_sample_ratio", ())] == 0.5
    assert samples[("d3s_schedule_token_ratio", ())] == 0.25
    assert samples[("d3s_schedule_info", (("preset", "d3s"),))] == 1


def test_prometheus_names_that_collide_after_sanitising(
    api: httpx.Client, transport: Transport
) -> None:
    transport.client.hset(
        transport.metrics_key,
        mapping={"a.b": "1", "a/b": "2", "paused": "5", "queue_depth": "9"},
    )
    text = api.get("/metrics/prometheus").text
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"duplicate families in:\n{text}"
    # The first name in sorted order wins; fixed families are never shadowed by a metric.
    values = {s.name: s.value for f in families for s in f.samples if not s.labels}
    assert values["d3s_a_b"] == 1
    assert values["d3s_paused"] == 0
    assert "d3s_schedule_step" not in values  # no schedule written: no schedule gauges


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("reward_mean", "d3s_reward_mean"),
        ("eval/acc@1", "d3s_eval_acc_1"),
        ("rate:5m", "d3s_rate_5m"),
        ("1st-token", "d3s_1st_token"),
    ],
)
def test_prometheus_name(raw: str, expected: str) -> None:
    assert prometheus_name(raw) == expected


# ---- control ------------------------------------------------------------------------------------


def test_control_needs_the_token(api: httpx.Client, transport: Transport) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        r = api.post("/control/pause", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    assert transport.client.hget(transport.control_key, "paused") is None

    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = api.post("/control/pause", headers=auth)
    assert r.status_code == 200 and r.json() == {"paused": True}
    assert transport.paused() is True
    assert api.get("/metrics").json()["paused"] is True

    assert api.post("/control/resume", headers={"Authorization": "Bearer x"}).status_code == 401
    assert transport.paused() is True

    r = api.post("/control/resume", headers=auth)
    assert r.status_code == 200 and r.json() == {"paused": False}
    assert transport.client.hget(transport.control_key, "paused") == b"0"


@pytest.mark.parametrize("token", [None, ""])
def test_control_disabled_without_a_token(
    redis_server: EmbeddedRedis, transport: Transport, token: str | None
) -> None:
    app = create_app(redis_server.url, transport.namespace, control_token=token)
    with serve_in_thread(app) as url:
        for auth in ({}, {"Authorization": "Bearer x"}, {"Authorization": f"Bearer {TOKEN}"}):
            r = httpx.post(f"{url}/control/pause", headers=auth, timeout=10)
            assert r.status_code == 403, r.text
            assert "disabled" in r.json()["detail"]
    assert transport.client.hget(transport.control_key, "paused") is None


# ---- HTTP surface -------------------------------------------------------------------------------


def test_unknown_paths_and_wrong_methods(api: httpx.Client) -> None:
    assert api.get("/nope").status_code == 404
    assert api.get("/control/pause").status_code == 405
    assert api.post("/schedule").status_code == 405
    assert api.delete("/metrics").status_code == 405


def test_openapi_documents_the_api(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/healthz",
        "/schedule",
        "/metrics",
        "/metrics/prometheus",
        "/control/pause",
        "/control/resume",
    }
    schemas = spec["components"]["schemas"]
    assert set(schemas["ScheduleResponse"]["properties"]) == set(SCHEDULE)
    assert set(schemas["MetricsResponse"]["properties"]) == {
        "metrics",
        "counters",
        "queues",
        "paused",
    }
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    pause = spec["paths"]["/control/pause"]["post"]
    assert pause["security"] == [{"HTTPBearer": []}]
    assert {"401", "403"} <= set(pause["responses"])
    assert "404" in spec["paths"]["/schedule"]["get"]["responses"]


# ---- Ray Serve ----------------------------------------------------------------------------------


def test_under_ray_serve(redis_server: EmbeddedRedis, transport: Transport) -> None:
    ray = pytest.importorskip("ray")
    from services.api.serve import start_api, stop_api

    transport.client.hset(transport.schedule_key, mapping=SCHEDULE)
    started_ray = not ray.is_initialized()
    t0 = time.monotonic()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = start_api(redis_server.url, transport.namespace, port=0, control_token=TOKEN)
        t_up = time.monotonic() - t0
        try:
            assert url.startswith("http://127.0.0.1:")
            with httpx.Client(base_url=url, timeout=10) as client:
                assert client.get("/healthz").json() == {
                    "status": "ok",
                    "redis": True,
                    "reason": None,
                }
                assert client.get("/schedule").json()["step"] == 7
                r = client.post("/control/pause", headers={"Authorization": f"Bearer {TOKEN}"})
                assert r.json() == {"paused": True}
                assert transport.paused() is True
                assert client.post("/control/resume").status_code == 401
        finally:
            stop_api()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)  # Serve's proxy is gone with it
    finally:
        if started_ray:
            ray.shutdown()
    print(f"\nRay Serve: up in {t_up:.1f}s, whole test {time.monotonic() - t0:.1f}s")

"""The HTTP API over a real HTTP server (uvicorn on a loopback port) and a real Redis.

Run state is written the way the services write it (through the Transport's queue, control and
state objects); every endpoint is then read with httpx. One test runs the same app under real
Ray Serve.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.api.app import MAX_HISTORY_PAGE, create_app
from services.api.prometheus import prometheus_name
from services.api.serve import serve_in_thread
from services.common.net import free_port
from services.common.secrets import REDACTED
from services.transport.bundle import Transport
from services.transport.records import ScoredGroup
from services.transport.redis_server import EmbeddedRedis

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
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api(redis_server: EmbeddedRedis, transport: Transport) -> Iterator[httpx.Client]:
    """An httpx client for the API of ``transport``'s namespace, with control enabled."""
    app = create_app(redis_server.url, transport.namespace, control_token=TOKEN)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def group(i: int, size: int = 2) -> ScoredGroup:
    """A tiny valid scored group (what a rollout actor publishes)."""
    return ScoredGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        policy_version=0,
        prompt=np.array([1, 2], dtype=np.int32),
        responses=np.ones((size, 3), dtype=np.int32),
        response_lengths=np.full(size, 3, dtype=np.int32),
        behav_logp=np.zeros((size, 3), dtype=np.float32),
        rewards=np.arange(size, dtype=np.float32),
        created_at=1.0,
        actor="a0",
        task="test",
    )


def write_run_state(t: Transport) -> None:
    """What a running selector/learner leaves in Redis: schedule, metrics, counters, queues."""
    t.state.write_schedule(SCHEDULE)
    t.state.set_metrics(
        {
            "reward_mean": 0.75,
            "heldout_accuracy": 0.5,
            "loss": math.nan,  # a diverged step: must not break the JSON
            "kept_samples": 48.0,
        }
    )
    incr = {"groups_written": 12, "groups_stale": 2}
    for stream, n in ((t.keys.groups, 3), (t.keys.batches, 1)):
        for i in range(n):
            t.queue.publish(stream, group(i), incr=incr)
            incr = {}
    dead_letter(t, ["group size 2 != 4", "group size 2 != 4"])
    t.control.set_paused(True)


def dead_letter(t: Transport, reasons: list[str]) -> None:
    """Publish one group per reason and dead-letter it the way a consumer does."""
    stream = t.keys.groups
    t.queue.ensure_consumer_group(stream, "selector")
    ids = [t.queue.publish(stream, group(100 + i)) for i in range(len(reasons))]
    delivered = t.queue.read(stream, "selector", "c0", count=len(reasons) + 10)
    by_id = {d.entry_id: d for d in delivered}
    for entry_id, reason in zip(ids, reasons, strict=True):
        assert entry_id in by_id
        assert t.queue.dead_letter(stream, "selector", "c0", entry_id, reason)


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
            ("GET", "/metrics/history"),
            ("GET", "/metrics/throughput"),
            ("GET", "/actors"),
            ("GET", "/dead-letters"),
            ("GET", "/checkpoints"),
            ("GET", "/config"),
            ("POST", "/control/pause"),
            ("POST", "/control/stop"),
        ):
            r = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 503, (path, r.text)
            assert "Redis unavailable" in r.json()["detail"]


# ---- schedule -----------------------------------------------------------------------------------


def test_schedule_404_until_written_then_typed(api: httpx.Client, transport: Transport) -> None:
    r = api.get("/schedule")
    assert r.status_code == 404
    assert "no schedule yet" in r.json()["detail"]
    assert transport.keys.schedule in r.json()["detail"]

    transport.state.write_schedule(SCHEDULE)
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
    transport.state.write_schedule({"step": 8})
    assert api.get("/schedule").json()["step"] == 8


def test_schedule_partial_and_float_formatted_ints(api: httpx.Client, transport: Transport) -> None:
    transport.state.write_schedule({"step": "12.0", "preset": "grpo"})
    body = api.get("/schedule").json()
    assert body["step"] == 12 and type(body["step"]) is int
    assert body["preset"] == "grpo"
    assert body["total_steps"] is None and body["sample_ratio"] is None


def test_schedule_malformed_field_is_named(api: httpx.Client, transport: Transport) -> None:
    transport.state.write_schedule({"step": "1.5", "preset": "d3s"})
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
        "stop_reason": None,
        "done": False,
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
        "counters": {"dead": 2, "groups_stale": 2, "groups_written": 12},
        "queues": {"groups": 3, "batches": 1, "dead": 2},
        "paused": True,
        "stop_reason": None,
        "done": False,
    }
    assert all(type(v) is int for v in body["counters"].values())


def test_metrics_skip_a_malformed_value(api: httpx.Client, transport: Transport) -> None:
    transport.state.set_metrics({"reward_mean": "0.25", "bad": "n/a"})
    body = api.get("/metrics").json()
    assert body["metrics"] == {"reward_mean": 0.25}


def test_prometheus_exposition(api: httpx.Client, transport: Transport) -> None:
    write_run_state(transport)
    transport.state.set_metrics({"eval/acc@1": 0.125})
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
    assert samples[("d3s_dead_total", ())] == 2

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
    transport.state.set_metrics({"a.b": 1, "a/b": 2, "paused": 5, "queue_depth": 9})
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
    assert transport.control.paused() is False

    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = api.post("/control/pause", headers=auth)
    assert r.status_code == 200 and r.json() == {"paused": True}
    assert transport.control.paused() is True
    assert api.get("/metrics").json()["paused"] is True

    assert api.post("/control/resume", headers={"Authorization": "Bearer x"}).status_code == 401
    assert transport.control.paused() is True

    r = api.post("/control/resume", headers=auth)
    assert r.status_code == 200 and r.json() == {"paused": False}
    assert transport.control.paused() is False


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
    assert transport.control.paused() is False


# ---- HTTP surface -------------------------------------------------------------------------------


def test_unknown_paths_and_wrong_methods(api: httpx.Client) -> None:
    assert api.get("/nope").status_code == 404
    assert api.get("/control/pause").status_code == 405
    assert api.post("/schedule").status_code == 405
    assert api.delete("/metrics").status_code == 405


def test_openapi_documents_the_api(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/",
        "/healthz",
        "/schedule",
        "/metrics",
        "/metrics/prometheus",
        "/metrics/history",
        "/metrics/throughput",
        "/actors",
        "/dead-letters",
        "/checkpoints",
        "/config",
        "/control/pause",
        "/control/resume",
        "/control/stop",
    }
    assert set(spec["paths"]["/healthz"]) == {"get", "head"}
    schemas = spec["components"]["schemas"]
    assert set(schemas["ScheduleResponse"]["properties"]) == set(SCHEDULE)
    assert set(schemas["MetricsResponse"]["properties"]) == {
        "metrics",
        "counters",
        "queues",
        "paused",
        "stop_reason",
        "done",
    }
    # Every JSON route names its response model, and every model field is described.
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            ok = op["responses"]["200"]
            if path not in ("/", "/metrics/prometheus") and method != "head":
                ref = ok["content"]["application/json"]["schema"]["$ref"]
                assert ref.startswith("#/components/schemas/"), (path, ref)
            assert op.get("summary"), (path, method)
    for name in ("HistoryResponse", "ThroughputResponse", "ActorInfo", "DeadLetter", "Rate"):
        for field, prop in schemas[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for action in ("pause", "resume", "stop"):
        op = spec["paths"][f"/control/{action}"]["post"]
        assert op["security"] == [{"HTTPBearer": []}]
        assert {"401", "403", "503"} <= set(op["responses"])
    assert "404" in spec["paths"]["/schedule"]["get"]["responses"]
    assert "404" in spec["paths"]["/config"]["get"]["responses"]
    history = {p["name"]: p for p in spec["paths"]["/metrics/history"]["get"]["parameters"]}
    assert history["limit"]["schema"]["maximum"] == MAX_HISTORY_PAGE
    assert history["since_step"]["schema"]["minimum"] == 0


def test_healthz_head(api: httpx.Client) -> None:
    r = api.head("/healthz")
    assert r.status_code == 200
    assert r.content == b""


# ---- history and throughput ---------------------------------------------------------------------


def step_row(step: int, t0: float = 1000.0) -> dict[str, float]:
    """A learner step row: 8 samples, 100 kept tokens and 0.5 s of compute per 2 s step."""
    return {
        "reward_mean": step / 10,
        "loss": 1.0 / step,
        "samples_total": 8.0 * step,
        "learner_tokens_total": 100.0 * step,
        "learner_seconds_total": 0.5 * step,
        "wall_time": t0 + 2.0 * step,
    }


def test_history_pages_and_columns(api: httpx.Client, transport: Transport) -> None:
    empty = api.get("/metrics/history").json()
    assert empty == {"steps": [], "series": {}, "next_since_step": 0, "more": False}

    for step in range(1, 8):
        transport.state.record_step(step, step_row(step))
    transport.state.record_step(8, {"reward_mean": math.nan, "heldout_accuracy": 0.25})

    r = api.get("/metrics/history", params={"names": "reward_mean,heldout_accuracy", "limit": 3})
    assert r.status_code == 200
    body = r.json()
    assert body == {
        "steps": [1, 2, 3],
        "series": {"reward_mean": [0.1, 0.2, 0.3], "heldout_accuracy": [None, None, None]},
        "next_since_step": 4,
        "more": True,
    }
    # Following next_since_step walks the rest; a NaN comes back as null.
    body = api.get(
        "/metrics/history",
        params={"names": "reward_mean,heldout_accuracy", "since_step": 4, "limit": 10},
    ).json()
    assert body["steps"] == [4, 5, 6, 7, 8]
    assert body["series"]["reward_mean"] == [0.4, 0.5, 0.6, 0.7, None]
    assert body["series"]["heldout_accuracy"] == [None, None, None, None, 0.25]
    assert body["next_since_step"] == 9 and body["more"] is False

    # Without names: every field of the page's rows; a page past the end is empty.
    every = api.get("/metrics/history", params={"since_step": 7}).json()
    assert set(every["series"]) == set(step_row(1)) | {"heldout_accuracy"}
    assert every["series"]["samples_total"] == [56.0, None]
    nothing = api.get("/metrics/history", params={"since_step": 50}).json()
    assert nothing["steps"] == [] and nothing["next_since_step"] == 50


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": MAX_HISTORY_PAGE + 1}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"since_step": -1}, "since_step"),
        ({"since_step": 2**40}, "since_step"),
        ({"names": "reward_mean,,loss"}, "names"),
        ({"names": "bad name"}, "names"),
        ({"names": ",".join(f"m{i}" for i in range(65))}, "names"),
    ],
)
def test_history_rejects_bad_parameters(
    api: httpx.Client, params: dict[str, object], field: str
) -> None:
    r = api.get("/metrics/history", params=params)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["query", field]]


def test_throughput_from_history(api: httpx.Client, transport: Transport) -> None:
    none = api.get("/metrics/throughput").json()
    assert none["rows"] == 0 and none["samples_per_s"]["value"] is None

    for step in range(1, 31):
        transport.state.record_step(step, step_row(step))
    transport.state.set_metrics({"learner_version": 30})
    body = api.get("/metrics/throughput", params={"window": 10}).json()
    assert body["window"] == 10 and body["rows"] == 10
    # Steps 21..30: 9 steps of 2 s, each with 8 samples, 100 tokens and 0.5 s of compute.
    assert body["samples_per_s"] == {
        "value": pytest.approx(4.0),
        "total_field": "samples_total",
        "from_step": 21,
        "to_step": 30,
    }
    assert body["tokens_per_s"]["value"] == pytest.approx(50.0)
    assert body["learner_busy_fraction"]["value"] == pytest.approx(0.25)

    # The rate of a field is taken between the rows that have it: step 31 lacks the totals.
    transport.state.record_step(31, {"reward_mean": 1.0, "wall_time": 1100.0})
    transport.state.set_metrics({"learner_version": 31})
    body = api.get("/metrics/throughput", params={"window": 5}).json()
    assert body["samples_per_s"]["to_step"] == 30 and body["samples_per_s"]["from_step"] == 27
    # Without wall_time no rate can be taken, and the reason is visible as null.
    transport.state.record_step(40, {"samples_total": 1.0})
    transport.state.record_step(41, {"samples_total": 2.0})
    transport.state.set_metrics({"learner_version": 41})
    body = api.get("/metrics/throughput", params={"window": 2}).json()
    assert body["samples_per_s"]["value"] is None and body["rows"] == 2

    # A stale or missing learner_version still finds the tail.
    transport.state.set_metrics({"learner_version": 3})
    assert api.get("/metrics/throughput", params={"window": 2}).json()["rows"] == 2

    assert api.get("/metrics/throughput", params={"window": 1}).status_code == 422


# ---- actors, dead letters, checkpoints, config --------------------------------------------------


def test_actors(api: httpx.Client, transport: Transport) -> None:
    assert api.get("/actors").json() == {"learner_version": None, "actors": []}
    transport.state.record_heartbeat("rollout-1", {"weight_version": 3, "groups_published": 40})
    transport.state.record_heartbeat(
        "rollout-0", {"weight_version": 5, "groups_published": 52, "engine": "hf"}
    )
    transport.state.record_published_version(5)
    before = time.time()
    body = api.get("/actors").json()
    assert body["learner_version"] == 5
    assert [a["name"] for a in body["actors"]] == ["rollout-0", "rollout-1"]
    first, second = body["actors"]
    assert first["weight_version"] == 5 and first["versions_behind"] == 0
    assert first["groups_published"] == 52 and first["extra"] == {"engine": "hf"}
    assert second["weight_version"] == 3 and second["versions_behind"] == 2
    assert second["groups_published"] == 40 and second["extra"] == {}
    assert before - 5 < second["last_heartbeat"] <= time.time()
    assert 0 <= second["seconds_since_heartbeat"] < 5


def test_dead_letters(api: httpx.Client, transport: Transport) -> None:
    assert api.get("/dead-letters").json() == {
        "total": 0,
        "in_stream": 0,
        "recent": [],
        "by_reason": {},
    }
    reasons = ["group size 2 != 4", "DecodeError: rewards not finite", "group size 2 != 4"]
    before = time.time()
    dead_letter(transport, reasons)
    body = api.get("/dead-letters").json()
    assert body["total"] == 3 and body["in_stream"] == 3
    assert body["by_reason"] == {"group size 2 != 4": 2, "DecodeError: rewards not finite": 1}
    assert [d["reason"] for d in body["recent"]] == reasons[::-1]  # newest first
    newest = body["recent"][0]
    assert newest["source"] == transport.keys.groups and newest["group"] == "selector"
    assert newest["consumer"] == "c0" and newest["entry_id"]
    assert before - 1 <= newest["time"] <= time.time() + 1
    # count bounds the window that reasons are counted over, not the total.
    one = api.get("/dead-letters", params={"count": 1}).json()
    assert len(one["recent"]) == 1 and one["by_reason"] == {"group size 2 != 4": 1}
    assert one["total"] == 3
    assert api.get("/dead-letters", params={"count": 0}).status_code == 422


def test_checkpoints(api: httpx.Client, transport: Transport) -> None:
    assert api.get("/checkpoints").json() == {"checkpoints": [], "latest": None}
    transport.state.record_checkpoint(20, "/runs/x/ckpt/step_20")
    transport.state.record_checkpoint(10, "/runs/x/ckpt/step_10")
    body = api.get("/checkpoints").json()
    assert [c["step"] for c in body["checkpoints"]] == [10, 20]
    assert body["latest"]["path"] == "/runs/x/ckpt/step_20"
    assert all(isinstance(c["time"], float) for c in body["checkpoints"])


def test_config_never_shows_a_secret(api: httpx.Client, transport: Transport) -> None:
    r = api.get("/config")
    assert r.status_code == 404 and transport.keys.config in r.json()["detail"]
    config = {
        "service": {
            "control_token": "abc123-plain",
            "control_token_env": "D3S_CONTROL_TOKEN",
            "redis_url": "redis://:hunter2@db:6379/0",
            "redis_password": 987654,  # a YAML password that parsed as a number
        },
        "logging": {"wandb": {"project": "p", "mode": "offline", "api_key": "wk-1"}},
        "hub": {"HF_TOKEN": "hf_xyz", "headers": {"Authorization": "Bearer abc"}},
        "secrets": ["one", "two"],
        "selector": {"token_init": 0.2, "token_final": 0.5, "max_new_tokens": 16},
        "notes": ["carry", TOKEN],  # the API's own token, where no key names it
        "train": {"total_steps": 100},
    }
    transport.state.set_config(json.dumps(config))
    body = api.get("/config").json()
    served = json.dumps(body)
    for secret in (
        "abc123-plain",
        "987654",
        "wk-1",
        "hf_xyz",
        "one",
        "two",
        TOKEN,
        "hunter2",
        "abc",
    ):
        assert secret not in served, secret
    cfg = body["config"]
    assert cfg["service"]["control_token"] == REDACTED
    assert cfg["service"]["redis_password"] == REDACTED
    assert cfg["service"]["redis_url"] == f"redis://:{REDACTED}@db:6379/0"
    assert cfg["hub"]["headers"] == {"Authorization": REDACTED}
    assert cfg["logging"]["wandb"] == {"project": "p", "mode": "offline", "api_key": REDACTED}
    assert cfg["secrets"] == [REDACTED, REDACTED]
    # Numbers under "token" keys are settings, not secrets.
    assert cfg["selector"] == config["selector"]
    assert cfg["train"] == {"total_steps": 100}
    assert set(body["redacted"]) >= {
        "service.control_token",
        "service.redis_password",
        "logging.wandb.api_key",
        "hub.HF_TOKEN",
        "secrets",
        "notes[1]",
        "service.redis_url",
        "hub.headers.Authorization",
    }


# ---- control: stop --------------------------------------------------------------------------------


def test_stop_is_token_guarded_and_keeps_the_first_reason(
    api: httpx.Client, transport: Transport
) -> None:
    assert api.post("/control/stop").status_code == 401
    assert api.post("/control/stop", headers={"Authorization": "Bearer no"}).status_code == 401
    assert transport.control.stop_reason() is None

    r = api.post("/control/stop", headers=AUTH, json={"reason": "enough for today"})
    assert r.status_code == 200
    assert r.json() == {"stop_requested": True, "reason": "enough for today"}
    assert transport.control.stop_reason() == "enough for today"
    assert api.get("/metrics").json()["stop_reason"] == "enough for today"

    again = api.post("/control/stop", headers=AUTH).json()
    assert again == {"stop_requested": True, "reason": "enough for today"}
    assert api.post("/control/stop", headers=AUTH, json={"reason": ""}).status_code == 422
    assert api.post("/control/stop", headers=AUTH, json={"reason": "x" * 201}).status_code == 422


def test_stop_without_a_body_uses_the_default_reason(
    api: httpx.Client, transport: Transport
) -> None:
    r = api.post("/control/stop", headers=AUTH)
    assert r.status_code == 200 and r.json()["reason"] == "stopped via the API"
    assert transport.control.stop_reason() == "stopped via the API"


# ---- dashboard ----------------------------------------------------------------------------------


def test_dashboard_and_its_files_are_served(api: httpx.Client) -> None:
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "static/vendor/uPlot.iife.min.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside
    for path, kind in (
        ("/static/vendor/uPlot.iife.min.js", "javascript"),
        ("/static/vendor/uPlot.min.css", "css"),
        ("/static/dashboard.js", "javascript"),
        ("/static/dashboard.css", "css"),
    ):
        r = api.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    assert "MIT" in api.get("/static/vendor/uPlot.LICENSE").text


# ---- Ray Serve ----------------------------------------------------------------------------------


def test_under_ray_serve(redis_server: EmbeddedRedis, transport: Transport) -> None:
    ray = pytest.importorskip("ray")
    from services.api.serve import start_api, stop_api

    transport.state.write_schedule(SCHEDULE)
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
                assert transport.control.paused() is True
                assert client.post("/control/resume").status_code == 401
                assert client.head("/healthz").status_code == 200
                assert client.get("/actors").json() == {"learner_version": None, "actors": []}
                assert "uPlot" in client.get("/").text
        finally:
            stop_api()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)  # Serve's proxy is gone with it
    finally:
        if started_ray:
            ray.shutdown()
    print(f"\nRay Serve: up in {t_up:.1f}s, whole test {time.monotonic() - t0:.1f}s")


# ---- d3s status ---------------------------------------------------------------------------------


def test_status_prints_the_run(api: httpx.Client, transport: Transport) -> None:
    from rich.console import Console

    from services.api.status import print_status

    write_run_state(transport)
    for step in range(1, 6):
        transport.state.record_step(step, step_row(step))
    transport.state.set_metrics({"learner_version": 5, "staleness_mean": 0.5})
    transport.state.record_heartbeat("rollout-0", {"weight_version": 4, "groups_published": 9})
    transport.state.record_checkpoint(5, "runs/x/checkpoints/step_5")
    console = Console(record=True, width=120)
    assert print_status(str(api.base_url), console=console) == 0
    out = console.export_text()
    for expected in (
        "paused",
        "7 / 100",
        "d3s  rho_s 0.50  K 0.25",
        "0.500",  # held-out accuracy
        "4.0 samples/s",
        "50 kept tokens/s",
        "learner busy 25%",
        "groups 3  batches 1  dead 2",
        "step 5: runs/x/checkpoints/step_5",
        "rollout-0",
        "group size 2 != 4",
        "Dead letters: 2 in all",
    ):
        assert expected in out, (expected, out)


def test_status_names_an_unreachable_api() -> None:
    from rich.console import Console

    from services.api.status import print_status

    console = Console(record=True, width=120)
    url = f"http://127.0.0.1:{free_port()}"
    assert print_status(url, console=console, timeout_s=2) == 1
    assert f"cannot reach the D3S API at {url}" in console.export_text()

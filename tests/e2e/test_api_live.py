"""The HTTP API's routes during a short real run: ``run_service`` with Ray, DeepSpeed, Ray Serve and
a Redis that needs a password, while a thread polls the routes the way a user (or the dashboard)
would and, once, writes a malformed record into the run's groups stream.

One run serves every test of the module (it is started by the first test that asks for it). The
snapshots taken during the run are then checked against what the run left in Redis and on disk.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common.net import free_port
from services.run.config import parse_config
from services.run.orchestrator import run_service
from services.transport.bundle import Transport
from services.transport.redis_server import EmbeddedRedis

pytestmark = pytest.mark.integration

STEPS = 24
CHECKPOINT_EVERY = 8
ACTORS = 2
USER, PASSWORD = "d3s", "pw-" + uuid.uuid4().hex
TOKEN_ENV, TOKEN = "D3S_TEST_CONTROL_TOKEN", "tok-" + uuid.uuid4().hex
ROUTES = ("/metrics/history?limit=1000", "/actors", "/checkpoints", "/dead-letters", "/config")
MALFORMED = {b"meta": b"{not json", b"junk": b"\x00\x01"}


@dataclass
class Snapshot:
    """One route's answer while the run went: when, at which learner step, and the body."""

    at: float
    step: int
    body: Any


@dataclass
class LiveRun:
    namespace: str
    redis_url: str
    run_dir: Path
    summary: dict[str, Any]
    # route -> every successful answer, oldest first
    snapshots: dict[str, list[Snapshot]] = field(default_factory=dict)
    malformed_id: str | None = None
    poll_errors: list[str] = field(default_factory=list)

    def last(self, route: str) -> Snapshot:
        got = self.snapshots.get(route)
        assert got, f"{route} never answered during the run ({self.poll_errors[-3:]})"
        return got[-1]


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


class Poller(threading.Thread):
    """Polls every route until the run ends; XADDs one malformed record into the groups stream
    once the selector's consumer group exists."""

    def __init__(self, run: LiveRun, api_url: str, client: redis.Redis) -> None:
        super().__init__(name="api-poller", daemon=True)
        self.run_, self.api_url, self.client = run, api_url, client
        self.t = Transport.open(client, run.namespace)
        self.stop_event = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self.stop_event.is_set():
            self._maybe_write_malformed()
            step = int(self.t.state.numeric_metrics().get("learner_version", 0))
            # /actors every 0.1 s (weight versions move fast on a quiet box), the rest every 0.4 s.
            routes = ROUTES if tick % 4 == 0 else ("/actors",)
            tick += 1
            for route in routes:
                try:
                    body = _get(self.api_url + route)
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    self.run_.poll_errors.append(f"{route}: {exc!r}")
                    continue
                self.run_.snapshots.setdefault(route, []).append(Snapshot(time.time(), step, body))
            self.stop_event.wait(0.1)

    def _maybe_write_malformed(self) -> None:
        if self.run_.malformed_id is not None:
            return
        try:
            groups = self.client.xinfo_groups(self.t.keys.groups)
        except redis.ResponseError:
            return  # the stream does not exist yet
        if any(g["name"] in (b"selector", "selector") for g in groups):
            entry = self.client.xadd(self.t.keys.groups, MALFORMED)
            self.run_.malformed_id = entry.decode() if isinstance(entry, bytes) else entry


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis whose run user needs a password; yields the URL with it (the default user stays
    open only so the fixture can stop the server)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser(
        USER,
        enabled=True,
        passwords=[f"+{PASSWORD}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    admin.close()
    try:
        yield f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"
    finally:
        server.stop()


_RUN: dict[str, Any] = {}


@pytest.fixture
def live_run(tiny_config, tmp_path_factory: pytest.TempPathFactory, password_redis: str) -> LiveRun:
    """The module's one run (the first test to ask starts it; a failure is re-raised to every
    test that asks)."""
    if "run" not in _RUN:
        if "error" in _RUN:
            raise _RUN["error"]
        try:
            _RUN["run"] = _start_run(tiny_config, tmp_path_factory, password_redis)
        except BaseException as exc:
            _RUN["error"] = exc
            raise
    return _RUN["run"]


def _start_run(tiny_config, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> LiveRun:
    root = tmp_path_factory.mktemp("live")
    namespace = f"live{uuid.uuid4().hex[:8]}"
    port = free_port()
    cfg = parse_config(
        tiny_config(
            root / "run",
            tmp_path_factory.getbasetemp() / "warmstart",
            name="live",
            rollout={"num_actors": ACTORS},
            train={"total_steps": STEPS, "eval_every": 8, "checkpoint_every": CHECKPOINT_EVERY},
            service={
                "namespace": namespace,
                "redis_url": redis_url,
                "max_group_backlog": 8,
                "wait_timeout_s": 300,  # components start slowly on a loaded box
            },
            api={"enabled": True, "port": port, "control_token_env": TOKEN_ENV},
        )
    )
    run = LiveRun(namespace, redis_url, root / "run", summary={})
    client = redis.Redis.from_url(redis_url)
    poller = Poller(run, f"http://127.0.0.1:{port}", client)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        poller.start()
        try:
            # The main thread runs the service (Ray wants it); the poller watches.
            run.summary = run_service(cfg)
        finally:
            poller.stop_event.set()
            poller.join(timeout=30)
            client.close()
    return run


def _final_state(run: LiveRun) -> Transport:
    return Transport.open(redis.Redis.from_url(run.redis_url), run.namespace)


def test_history_has_every_trained_step(live_run: LiveRun) -> None:
    final = _final_state(live_run).state.history(0, 1000)
    final_by_step = {int(r["step"]): r for r in final}
    assert sorted(final_by_step) == list(range(STEPS + 1))
    # A late page taken during the run: contiguous steps from 0, each with the value the
    # learner recorded for it.
    snap = max(
        live_run.snapshots["/metrics/history?limit=1000"], key=lambda s: len(s.body["steps"])
    )
    steps = snap.body["steps"]
    assert len(steps) >= STEPS // 2, steps
    assert steps == list(range(len(steps)))
    rewards = snap.body["series"]["reward_mean"]
    for step, value in zip(steps[1:], rewards[1:], strict=True):
        assert value == pytest.approx(final_by_step[step]["reward_mean"])
    assert snap.body["series"]["learner_version"][1:] == [float(s) for s in steps[1:]]


def test_actors_report_recent_heartbeats_and_weight_versions(live_run: LiveRun) -> None:
    # Half-way through the run every actor has reported; its version is one the learner published.
    mid = [s for s in live_run.snapshots["/actors"] if s.step >= STEPS // 2]
    assert mid, "no /actors answer in the second half of the run"
    for snap in mid:
        body = snap.body
        assert sorted(a["name"] for a in body["actors"]) == [f"rollout-{i}" for i in range(ACTORS)]
        for actor in body["actors"]:
            assert isinstance(actor["weight_version"], int)
            assert 0 <= actor["weight_version"] <= body["learner_version"] <= STEPS
            assert actor["versions_behind"] == body["learner_version"] - actor["weight_version"]
            assert actor["groups_published"] > 0
            assert 0 <= actor["seconds_since_heartbeat"] < 60
            assert abs(actor["last_heartbeat"] - snap.at) < 60
    # The weights moved on while the run went.
    versions = {
        a["weight_version"] for s in live_run.snapshots["/actors"] for a in s.body["actors"]
    }
    assert len(versions) >= 3, versions


def test_checkpoints_list_the_checkpointed_steps(live_run: LiveRun) -> None:
    final = _final_state(live_run).state.checkpoints()
    assert [c["step"] for c in final] == list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
    seen = [s.body for s in live_run.snapshots["/checkpoints"]]
    # During the run the list only grows, by checkpoint steps, with the learner's paths.
    for body in seen:
        steps = [c["step"] for c in body["checkpoints"]]
        assert steps == list(
            range(CHECKPOINT_EVERY, CHECKPOINT_EVERY * (len(steps) + 1), CHECKPOINT_EVERY)
        )
        assert body["latest"] == (body["checkpoints"][-1] if steps else None)
        for c in body["checkpoints"]:
            assert Path(c["path"]).exists(), c
    assert max(len(b["checkpoints"]) for b in seen) >= 2


def test_dead_letters_count_a_malformed_record(live_run: LiveRun) -> None:
    assert live_run.malformed_id is not None, "the groups stream never got its consumer group"
    after = [s.body for s in live_run.snapshots["/dead-letters"] if s.body["total"] >= 1]
    assert after, "/dead-letters never counted the malformed record during the run"
    body = after[-1]
    assert body["total"] == 1 and body["in_stream"] == 1
    (letter,) = body["recent"]
    assert letter["entry_id"] == live_run.malformed_id
    assert letter["source"].endswith(":groups") and letter["group"] == "selector"
    assert letter["reason"] and body["by_reason"] == {letter["reason"]: 1}


def test_config_shows_no_token_or_password(live_run: LiveRun) -> None:
    snaps = live_run.snapshots["/config"]
    assert snaps
    for snap in snaps:
        text = json.dumps(snap.body)
        assert PASSWORD not in text and TOKEN not in text
    config = snaps[-1].body["config"]
    # The rest is served as configured; the URL keeps its shape.
    assert (
        config["service"]["redis_url"]
        == f"redis://{USER}:<redacted>@127.0.0.1:" + live_run.redis_url.rsplit(":", 1)[1]
    )
    assert config["api"]["port"] > 0 and config["api"]["enabled"] is True
    assert config["train"]["total_steps"] == STEPS
    # Nor does the run store them: the config key in Redis is already redacted.
    t = _final_state(live_run)
    stored = t.state.client.get(t.keys.config)
    assert stored and PASSWORD.encode() not in stored and TOKEN.encode() not in stored

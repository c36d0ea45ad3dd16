"""End to end: `d3s run`'s orchestrator with real Redis, Ray and DeepSpeed, then an audit.

Each run is tiny (a 1-layer policy on 1-digit sums, 4 prompts x 4 samples, 6 steps) and ends
with the books balanced exactly: every group a rollout actor wrote is used in exactly one batch,
dropped as stale, skipped, dead-lettered or still queued; every batch is trained by exactly one
learner step; weight versions rise by one per step and reach the rollout actors.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from fault_books import audit

from services.run.config import RunConfig, parse_config
from services.run.orchestrator import run_service
from services.telemetry.run_log import read_metrics
from services.transport.redis_server import EmbeddedRedis

pytestmark = pytest.mark.integration

STEPS = 6
PROMPTS = 4
ACTORS = 2


@pytest.fixture(scope="module")
def warmstart_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One warm start for the module (it is cached by its spec)."""
    return tmp_path_factory.mktemp("warmstart")


@pytest.fixture(scope="module")
def external_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Redis the run is pointed at (service.redis_url), so it outlives the run for the audit."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def run_config(tiny_config):
    """The e2e run: the shared tiny config, ACTORS rollout actors, STEPS steps, a namespace of
    its own. 1-digit sums: a 1-layer model warm-started for 200 steps (~2 s) solves about a
    quarter of them, so most groups carry signal and the run finishes in seconds."""

    def build(run_dir: Path, cache: Path, service: dict, api: dict | None = None) -> RunConfig:
        return parse_config(
            tiny_config(
                run_dir,
                cache,
                name="e2e",
                rollout={"prompts_per_step": PROMPTS, "num_actors": ACTORS},
                train={"total_steps": STEPS, "eval_every": 100, "checkpoint_every": 4},
                service={
                    "namespace": f"e2e{uuid.uuid4().hex[:8]}",
                    "max_group_backlog": 8,
                    # Generous: components start slowly on a loaded 2-core box.
                    "wait_timeout_s": 300,
                    **service,
                },
                api=api or {"enabled": False},
            )
        )

    return build


def check_run_dir(run_dir: Path, max_staleness: int) -> list[dict]:
    assert (run_dir / "final_policy" / "config.json").is_file()
    assert (run_dir / "learning_curve.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:07d}"
    assert any((run_dir / "tensorboard").iterdir())
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert "heldout_accuracy" in rows[0] and "heldout_accuracy" in rows[-1]
    trained = rows[1:]
    assert all(r["staleness_max"] <= max_staleness for r in trained)
    assert all(r["learner_version"] == r["step"] for r in trained)
    assert all(r["weight_sync_seconds"] >= 0 for r in trained)
    return trained


def _port_open(url: str) -> bool:
    u = urllib.parse.urlparse(url)
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((u.hostname, u.port)) == 0


def _run_components_alive(run_dir: Path, grace_s: float = 15.0) -> list[int]:
    """Pids of this run's component and evaluator processes (each logs "ready in ... (pid N"
    in its log under ``run_dir/logs``) still alive after ``grace_s``. Scoped to the run, not to
    every ``ComponentHost`` on the machine: another run on the same box is not a leak."""
    pids = {
        int(m)
        for log in (run_dir / "logs").glob("*.log")
        for m in re.findall(r"ready in [0-9.]+s \(pid (\d+)", log.read_text(errors="replace"))
    }
    assert pids, f"no component logged its pid under {run_dir / 'logs'}"
    deadline = time.monotonic() + grace_s
    while True:
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _processes_mentioning(text: str, grace_s: float = 15.0) -> list[psutil.Process]:
    """Processes whose command line mentions ``text``, after giving killed ones ``grace_s`` to
    exit (Ray reaps killed actor processes asynchronously)."""
    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(text in part for part in p.info["cmdline"] or []):
                    found.append(p)
            except psutil.Error:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_async_run_completes_and_the_books_balance(
    tmp_path: Path, warmstart_cache: Path, external_redis: EmbeddedRedis, run_config
) -> None:
    import ray

    cfg = run_config(
        tmp_path / "run",
        warmstart_cache,
        {"mode": "async", "max_staleness": 1, "redis_url": external_redis.url},
        api={"enabled": True, "port": 0},
    )

    summary = run_service(cfg)

    assert summary["steps"] == STEPS
    client = redis.Redis.from_url(external_redis.url)
    books = audit(client, cfg)
    trained = check_run_dir(tmp_path / "run", max_staleness=1)
    # Asynchronous: rollouts run ahead of the learner, so some groups are a step old.
    assert any(r["staleness_max"] == 1 for r in trained) or books["stale"] > 0
    assert max(len(seen) for seen in books["loaded"].values()) >= 2  # weights flowed mid-run
    for name, seen in books["loaded"].items():
        assert summary["components"][name]["versions_loaded"] == seen
    # Everything started for the run is gone: API, Ray, the actors' processes.
    assert summary["api_url"] and not _port_open(summary["api_url"])
    assert not ray.is_initialized()
    assert not _run_components_alive(tmp_path / "run")


def test_sync_run_is_lock_step_and_strictly_on_policy(
    tmp_path: Path, warmstart_cache: Path, run_config
) -> None:
    run_dir = tmp_path / "run"
    # No redis_url: the orchestrator starts (and stops) its own Redis, with its AOF in run_dir.
    cfg = run_config(run_dir, warmstart_cache, {"mode": "sync", "max_staleness": 0})

    summary = run_service(cfg)

    assert summary["steps"] == STEPS
    assert not _processes_mentioning(str(run_dir / "redis")), "embedded Redis left running"
    trained = check_run_dir(run_dir, max_staleness=0)
    assert all(r["policy_version_mean"] == r["step"] - 1 for r in trained)
    # The books survive in the AOF: reopen it to audit.
    with EmbeddedRedis(run_dir / "redis") as server:
        client = redis.Redis.from_url(server.url)
        books = audit(client, cfg)
        client.close()
    assert books["stale"] == 0
    assert books["queued"] == 0  # lock-step: nothing generated that a step did not use
    # One round per version: each actor loaded exactly the versions of steps 0..STEPS-1, and
    # then the final one (rollouts follow the learner to its end) without generating from it.
    for seen in books["loaded"].values():
        assert seen == list(range(STEPS + 1))


@pytest.mark.parametrize(
    "weights",
    # The ZeRO-3 variant is slow-marked to keep the default run under 15 minutes; the per-bucket
    # gather itself is in the default suite (tests/integration/test_weight_sync.py).
    ["object_store", pytest.param("collective-zero3", marks=pytest.mark.slow)],
)
def test_sync_run_with_a_two_rank_learner(
    tmp_path: Path, warmstart_cache: Path, run_config, weights: str
) -> None:
    """learner.world_size 2: rank 0 serves, rank 1 follows every collective; same books. With
    ZeRO-3 and the collective transport rank 0 gathers each bucket as it broadcasts it, and
    rank 1 enters every one of those gathers."""
    run_dir = tmp_path / "run"
    base = run_config(run_dir, warmstart_cache, {"mode": "sync", "max_staleness": 0})
    data = base.model_dump(mode="json")
    data["learner"]["world_size"] = 2
    if weights == "collective-zero3":
        data["learner"]["zero_stage"] = 3
        data["weight_sync"] = {
            "transport": "collective",
            "path": str(tmp_path / "weights"),
            "bucket_mb": 0.02,
            "timeout_s": 60,
        }
    cfg = parse_config(data)

    summary = run_service(cfg)

    assert summary["steps"] == STEPS
    trained = check_run_dir(run_dir, max_staleness=0)
    assert [r["step"] for r in trained] == list(range(1, STEPS + 1))
    assert all(r["policy_version_mean"] == r["step"] - 1 for r in trained)
    with EmbeddedRedis(run_dir / "redis") as server:
        client = redis.Redis.from_url(server.url)
        books = audit(client, cfg)
        client.close()
    assert books["stale"] == 0
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert "rank 0 of 2 leads" in learner_log
    # Rank 1 is a Ray actor in the learner's placement group, logging beside the others.
    assert "followers 1..1 started as Ray actors" in learner_log
    assert (
        "follower rank 1 done after 6 steps" in (run_dir / "logs" / "learner-rank1.log").read_text()
    )
    assert not _run_components_alive(run_dir)


@pytest.mark.parametrize("transport", ["files", "collective"])
def test_async_run_with_each_weight_sync_transport(
    tmp_path: Path, warmstart_cache: Path, external_redis: EmbeddedRedis, run_config, transport: str
) -> None:
    """The async run with weights through safetensors files, or a bucketed gloo broadcast from
    the learner into both rollout engines (catch-up files for late joiners): same books."""
    run_dir = tmp_path / "run"
    base = run_config(
        run_dir,
        warmstart_cache,
        {"mode": "async", "max_staleness": 1, "redis_url": external_redis.url},
    )
    data = base.model_dump(mode="json")
    # A tiny bucket, so the broadcast really is several buckets per version.
    data["weight_sync"] = {
        "transport": transport,
        "path": str(tmp_path / "weights"),
        "bucket_mb": 0.02,
        "timeout_s": 60,
    }
    if transport == "collective":
        # A catch-up file after every publish (the default, every 10th, is past this run's
        # end), so the newest file on disk is the run's last version and older ones rotate out.
        data["weight_sync"]["catchup_every"] = 1
    cfg = parse_config(data)

    summary = run_service(cfg)

    assert summary["steps"] == STEPS
    client = redis.Redis.from_url(external_redis.url)
    books = audit(client, cfg)
    check_run_dir(run_dir, max_staleness=1)
    for name, seen in books["loaded"].items():
        assert summary["components"][name]["versions_loaded"] == seen
    # Every engine ends on the last version (rollouts keep receiving until the learner is done).
    assert {s["version"] for n, s in summary["components"].items() if n.startswith("rollout")} == {
        STEPS
    }
    on_disk = sorted(p.name for p in (tmp_path / "weights").glob("weights-v*.safetensors"))
    assert on_disk[-1] == f"weights-v{STEPS:010d}.safetensors" and len(on_disk) <= 2
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    if transport == "collective":
        assert "with 2 engines (gloo)" in learner_log
        assert "broadcast of version" not in learner_log  # no failed broadcast
        for i in range(ACTORS):
            assert "is rank" in (run_dir / "logs" / f"rollout-{i}.log").read_text()

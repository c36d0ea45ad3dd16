"""Locked-down defaults of a local run, measured on a live one: every listening socket of every
process it started (Redis, Ray's GCS, raylet, agents and workers, the API) is on loopback; the
embedded Redis wants its password and refuses CONFIG; the password is in no log; hostile records
injected mid-run are dead-lettered, the run finishes, and Redis memory stays bounded."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis
from fault_books import audit
from test_faults import trained_step

from services.run.config import parse_config
from services.run.orchestrator import run_service
from services.transport.records import ScoredGroup
from services.transport.redis_server import EmbeddedRedis, is_loopback

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def warmstart_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("warmstart")


def listeners(root: psutil.Process) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``root`` and its
    descendants."""
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue  # exited meanwhile
        found += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_a_local_run_listens_on_loopback_only(
    tmp_path: Path, warmstart_cache: Path, tiny_config
) -> None:
    run_dir = tmp_path / "run"
    cfg = parse_config(
        tiny_config(
            run_dir,
            warmstart_cache,
            name="lockdown",
            train={"total_steps": 30, "eval_every": 100, "checkpoint_every": 10},
            rollout={"prompts_per_step": 4, "num_actors": 2},
            service={"namespace": f"l{uuid.uuid4().hex[:8]}", "wait_timeout_s": 120},
            api={"enabled": True, "port": 0},
        )
    )
    seen: list[tuple[str, int, str]] = []
    redis_checks: dict[str, object] = {}

    def watch() -> None:  # mid-run, once every component is up and training
        deadline = time.monotonic() + 300
        while trained_step(run_dir) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        seen.extend(listeners(psutil.Process()))
        conf = (run_dir / "redis" / "redis.conf").read_text()
        port = int(next(ln.split()[1] for ln in conf.splitlines() if ln.startswith("port ")))
        anonymous = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            anonymous.ping()
        except redis.exceptions.AuthenticationError as exc:
            redis_checks["anonymous"] = type(exc).__name__
        password = next(
            ln.split('"')[1] for ln in conf.splitlines() if ln.startswith("requirepass")
        )
        redis_checks["password"] = password
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5)
        try:
            client.execute_command("CONFIG", "GET", "bind")
        except redis.exceptions.ResponseError as exc:
            redis_checks["config"] = str(exc)
        redis_checks["policy"] = client.info("memory")["maxmemory_policy"]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = run_service(cfg, run_dir)
    watcher.join(timeout=30)

    assert summary["steps"] == 30
    names = {name for _, _, name in seen}
    # Redis, Ray's own servers and the component workers were all there to be measured.
    assert "redis-server" in names and "raylet" in names and "gcs_server" in names, names
    assert any(name.startswith("ray::ComponentHost") for name in names), names
    assert summary["api_url"] and any(
        port == int(summary["api_url"].rsplit(":", 1)[1].strip("/")) for _, port, _ in seen
    )
    open_ = [s for s in seen if not is_loopback(s[0])]
    assert not open_, f"listening beyond loopback: {open_}"
    assert redis_checks.get("anonymous") == "AuthenticationError"
    assert "unknown command" in str(redis_checks.get("config"))
    assert redis_checks.get("policy") == "noeviction"
    password = str(redis_checks["password"])
    for path in (run_dir / "logs").glob("*.log"):
        assert password not in path.read_text(errors="replace"), path
    assert password not in json.dumps(summary, default=str)


# ---- hostile records mid-run ---------------------------------------------------------------------


def hostile_records(vocab_top: int) -> dict[str, dict[bytes, bytes]]:
    """Stream entries a rollout actor never writes, by what is wrong with them."""
    rng = np.random.default_rng(0)
    g, t = 4, 5

    def group(i: int, **changes) -> dict[bytes, bytes]:
        fields = {
            "group_id": f"hostile-{i}",
            "prompt_id": f"hp{i}",
            "policy_version": 0,
            "prompt": rng.integers(2, 10, size=6).astype(np.int32),
            "responses": rng.integers(2, 10, size=(g, t)).astype(np.int32),
            "response_lengths": np.full(g, t, dtype=np.int32),
            "behav_logp": -rng.random((g, t)).astype(np.float32),
            "rewards": np.array([1, 0, 1, 0], dtype=np.float32),
            "created_at": time.time(),
            "actor": "hostile",
            "task": "arithmetic",
        }
        return ScoredGroup(**{**fields, **changes}).to_fields()

    big = b"\x00" * (8 << 20)
    records = {
        "vocabulary": group(0, prompt=np.array([3, vocab_top + 5], dtype=np.int32)),
        "context": group(1, prompt=np.full(50_000, 3, dtype=np.int32)),
        "reward": group(2, rewards=np.array([3e38, 0, 1, 0], dtype=np.float32)),
        "version": group(3, policy_version=10**9),
        "fields": {f"f{i}".encode(): b"x" for i in range(5000)},
        "garbage": {b"meta": b"\xff\xfe not json", b"responses": b"\x01"},
    }
    for i in range(12):  # 96 MiB that must not stay in Redis
        records[f"huge-{i}"] = {b"meta": b"{}", b"blob": big}
    return records


def test_hostile_records_mid_run_are_dead_lettered_and_memory_stays_bounded(
    tmp_path: Path, warmstart_cache: Path, tiny_config, capsys
) -> None:
    run_dir = tmp_path / "run"
    server = EmbeddedRedis(tmp_path / "redis", maxmemory_mb=512).start()
    try:
        cfg = parse_config(
            tiny_config(
                run_dir,
                warmstart_cache,
                name="hostile",
                train={"total_steps": 8, "eval_every": 100, "checkpoint_every": 4},
                rollout={"prompts_per_step": 4, "num_actors": 2},
                service={
                    "namespace": f"h{uuid.uuid4().hex[:8]}",
                    "wait_timeout_s": 120,
                    "redis_url": server.url,
                },
            )
        )
        client = redis.Redis.from_url(server.url)
        records = hostile_records(vocab_top=1000)
        memory: dict[str, int] = {}

        def inject() -> None:
            deadline = time.monotonic() + 300
            while trained_step(run_dir) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            memory["before"] = client.info("memory")["used_memory"]
            for fields in records.values():
                client.xadd(f"{cfg.service.namespace}:groups", fields)
            memory["injected"] = client.info("memory")["used_memory"]

        injector = threading.Thread(target=inject, daemon=True)
        injector.start()
        summary = run_service(cfg, run_dir)
        injector.join(timeout=30)
        memory["after"] = client.info("memory")["used_memory"]

        with capsys.disabled():
            mib = {k: round(v / 2**20, 1) for k, v in memory.items()}
            print(f"\nhostile records: {len(records)} injected; Redis used_memory MiB {mib}")
        assert summary["steps"] == 8
        assert memory["injected"] - memory["before"] > 64 << 20  # the huge ones were in Redis
        # ... and are gone: the dead letters keep a reason, sizes, a hash and a short prefix.
        assert memory["after"] - memory["before"] < 8 << 20, memory
        books = audit(client, cfg, hostile=len(records))
        assert books["dead"] == 0  # no group a rollout actor wrote was dead-lettered
        dead = client.xrange(f"{cfg.service.namespace}:dead", "-", "+")
        reasons = [fields[b"reason"].decode() for _, fields in dead]
        assert len(reasons) == len(records)
        assert sum(len(b"".join(f.values())) for _, f in dead) < 64 * 1024 * len(records)
        for expected in ("vocabulary", "context", "max_abs_reward", "ahead of the learner"):
            assert any(expected in r for r in reasons), (expected, reasons)
        client.close()
    finally:
        server.stop()

"""Every service of docker-compose.yml, started here with its own ``command:`` and arguments, and
they train together.

The compose file is read, ``${VAR:-default}`` interpolated as compose does (``D3S_CONFIG`` names
a tiny config), and each service's command run as a local process with the paths and addresses
that exist only inside the containers mapped to this machine: ``/cache`` to a temporary
directory, the ``redis`` and ``ray-head`` host names to loopback ports, ``0.0.0.0`` binds to
loopback. Rollout replicas get ``--index n`` as the image's entry point gives them. The
learner and rollout containers join the Ray head as nodes of their own in compose; here they
connect to the one head directly (one machine, and a per-component node would only add
raylets). Then the learner must finish, the others stop on their own, the API answers, and the
books balance.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
import yaml
from fault_books import audit
from raycluster import LocalRayCluster, ray_env

from services.common.net import free_port
from services.run.config import parse_config
from services.transport.redis_server import find_redis_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
_VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return _VAR.sub(sub, text)


def map_arg(arg: str, cache: Path, ports: dict[str, int]) -> str:
    """A container argument as it means on this machine."""
    arg = arg.replace("/cache/", f"{cache}/")
    if arg == "0.0.0.0":
        return "127.0.0.1"
    if arg.startswith("--port=") and "ray" in ports:
        return f"--port={ports['ray']}"
    if arg.startswith("--dashboard-host="):
        return "--dashboard-host=127.0.0.1"
    return arg


def test_every_compose_service_command_trains_together(tmp_path: Path, tiny_config) -> None:
    password = uuid.uuid4().hex
    cfg_data = tiny_config(
        tmp_path / "run",
        tmp_path / "unused-cache",
        name="compose",
        rollout={"prompts_per_step": 4},
        train={"total_steps": STEPS, "eval_every": 100, "checkpoint_every": 2},
        service={
            "namespace": f"c{uuid.uuid4().hex[:8]}",
            "max_group_backlog": 8,
            "wait_timeout_s": 120,
        },
    )
    config = tmp_path / "configs" / "tiny.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(cfg_data))
    compose_env = {
        "D3S_REDIS_PASSWORD": password,
        "D3S_CONFIG": str(config),
        "D3S_ROLLOUT_REPLICAS": "2",
    }
    compose = yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), compose_env))
    services = compose["services"]
    assert set(services) == {
        "redis",
        "ray-head",
        "prepare",
        "learner",
        "rollout",
        "selector",
        "api",
    }
    cache = tmp_path / "cache"
    redis_port, api_port = free_port(), None
    url = f"redis://:{password}@127.0.0.1:{redis_port}/0"
    # what the x-d3s anchor gives every d3s service, with the host names mapped
    env = {**ray_env(), **{k: str(v) for k, v in services["learner"]["environment"].items()}}
    assert env["D3S_REDIS_URL"] == f"redis://:{password}@redis:6379/0"
    env["D3S_REDIS_URL"] = url
    d3s = str(Path(sys.executable).parent / "d3s")
    procs: dict[str, subprocess.Popen] = {}
    logs = tmp_path / "proc-logs"
    logs.mkdir()
    head = LocalRayCluster()

    def start(
        name: str, argv: list[str], extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        out = (logs / f"{name}.out").open("w")
        p = subprocess.Popen(
            argv,
            env={**env, **(extra_env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        procs[name] = p
        return p

    try:
        # redis: the server's own command, its data in a temp dir
        rcmd = services["redis"]["command"]
        assert rcmd[0] == "redis-server" and "--requirepass" in rcmd and "--appendonly" in rcmd
        (tmp_path / "redis").mkdir()
        start(
            "redis",
            [
                find_redis_server(),
                *rcmd[1:],
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(tmp_path / "redis"),
            ],
        )
        client = redis.Redis.from_url(url)
        _wait(lambda: _pings(client), "redis")
        # ray-head: `ray start --head ...` with its arguments (port and hosts mapped)
        hcmd = [services["ray-head"]["entrypoint"][0], *services["ray-head"]["command"]]
        assert hcmd[:3] == ["ray", "start", "--head"] and "--block" in hcmd
        head_args = [map_arg(a, cache, {"ray": head.port}) for a in hcmd[1:] if a != "--block"]
        head._ray(
            *head_args,
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={head.temp_dir}",
            "--include-dashboard=false",
        )
        env["RAY_ADDRESS"] = head.address  # what the entry point's `ray start --address` gives
        # prepare: the one-shot warm start into the shared cache, before everything else
        prep = start(
            "prepare", [d3s, *[map_arg(a, cache, {}) for a in services["prepare"]["command"]]]
        )
        assert prep.wait(timeout=300) == 0, (logs / "prepare.out").read_text()[-3000:]
        # learner, selector, rollout replicas (--index as the entry point adds), api
        for name in ("learner", "selector"):
            start(name, [d3s, *[map_arg(a, cache, {}) for a in services[name]["command"]]])
        replicas = int(services["rollout"]["deploy"]["replicas"])
        assert replicas == 2
        for i in range(replicas):
            start(
                f"rollout-{i}",
                [
                    d3s,
                    *[map_arg(a, cache, {}) for a in services["rollout"]["command"]],
                    "--index",
                    str(i),
                ],
            )
        acmd = [map_arg(a, cache, {}) for a in services["api"]["command"]]
        api_port = free_port()
        acmd[acmd.index("--port") + 1] = str(api_port)
        start("api", [d3s, *acmd])

        t0 = time.monotonic()
        assert procs["learner"].wait(timeout=480) == 0, (logs / "learner.out").read_text()[-4000:]
        for name in ("selector", "rollout-0", "rollout-1"):
            assert procs[name].wait(timeout=90) == 0, (logs / f"{name}.out").read_text()[-4000:]
        print(f"compose services trained {STEPS} steps in {time.monotonic() - t0:.0f}s")

        run_cfg = parse_config(cfg_data, ["rollout.num_actors=2", "learner.world_size=2"])
        books = audit(client, run_cfg)
        assert set(books["loaded"]) == {"rollout-0", "rollout-1"}
        learner_log = (tmp_path / "run" / "logs" / "learner.log").read_text()
        assert "rank 0 of 2 leads" in learner_log  # learner.world_size=2 from the compose command
        for name in ("selector", "rollout-0", "rollout-1", "api"):
            assert (tmp_path / "run" / "logs" / f"{name}.log").is_file(), name
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/healthz", timeout=10) as r:
            assert r.status == 200
        # the password travelled in the URL only: in no log
        for path in [*(tmp_path / "run" / "logs").glob("*.log"), *logs.glob("*.out")]:
            assert password not in path.read_text(errors="replace"), path
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        head.stop()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _wait(cond, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.2)

"""Deployment files: the `ray up` YAML against Ray's own autoscaler schema, the compose file
through `docker-compose config`, and the promises each makes (roles, GPUs, password, AOF)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "deploy" / "cluster.yaml"
COMPOSE = ROOT / "docker-compose.yml"


def _ray_schema() -> dict[str, Any]:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


# ---- ray up ---------------------------------------------------------------------------------------


def test_cluster_yaml_validates_against_rays_autoscaler_schema() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(CLUSTER.read_text())
    jsonschema.validate(cfg, _ray_schema())
    # what `ray up` itself does: fill the provider's defaults, then validate the result
    validate_config(prepare_config(cfg))

    broken = yaml.safe_load(CLUSTER.read_text())
    broken["available_node_types"]["learner"]["resources"]["GPU"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="not of type 'integer'"):
        jsonschema.validate(broken, _ray_schema())


def test_cluster_roles_gpus_redis_and_install_order() -> None:
    cfg = yaml.safe_load(CLUSTER.read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["resources"]
    assert "GPU" not in head and head["d3s_selector"] == 1 and head["d3s_api"] == 1
    for role in ("learner", "rollout"):
        res = types[role]["resources"]
        assert res["GPU"] >= 1 and res[f"d3s_{role}"] == res["GPU"], (role, res)

    start = " ".join(cfg["head_start_ray_commands"])
    assert "redis-server" in start and "--appendonly yes" in start and "--requirepass" in start
    assert "--port 6380" in start  # not Ray's GCS port
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "pip install" in c and "torch" in c)
    project_at = next(i for i, c in enumerate(setup) if 'install -q -e ".[gpu]"' in c)
    assert torch_at < project_at, "torch must be installed before the project (README order)"
    assert (ROOT / "deploy" / "cluster_run.sh").stat().st_mode & 0o111


# ---- docker compose -------------------------------------------------------------------------------


def _compose_binary() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip(
        "docker-compose is not installed (Debian package `docker-compose`; `make system-deps` installs it)"
    )


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_compose_binary(), "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def compose_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("D3S_")}
    env["D3S_REDIS_PASSWORD"] = "test-password-123"
    return env


def test_compose_config_validates_and_keeps_its_promises(compose_env: dict[str, str]) -> None:
    done = _compose_config({**compose_env, "D3S_ROLLOUT_REPLICAS": "3"})
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {
        "redis",
        "ray-head",
        "prepare",
        "learner",
        "rollout",
        "selector",
        "api",
    }

    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "test-password-123" in redis["command"]
    mounts = [
        v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}"
        for v in redis["volumes"]
    ]
    assert any(m.startswith("redis-data:/data") for m in mounts), (
        mounts
    )  # the AOF outlives the container
    assert redis["healthcheck"]["test"]

    for name in ("learner", "rollout", "selector"):
        svc = services[name]
        assert svc["command"][0] == name, svc[
            "command"
        ]  # the real `d3s <component>` (entrypoint d3s-entrypoint)
        deps = svc["depends_on"]
        assert deps["prepare"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        assert svc["environment"]["D3S_REDIS_URL"] == "redis://:test-password-123@redis:6379/0"
        assert "warmstart.cache_dir=/cache/warmstart" in svc["command"]
    assert services["prepare"]["command"][0] == "warmstart"
    assert "warmstart.cache_dir=/cache/warmstart" in services["prepare"]["command"]

    learner_gpus = services["learner"]["deploy"]["resources"]["reservations"]["devices"][0][
        "device_ids"
    ]
    rollout_gpus = services["rollout"]["deploy"]["resources"]["reservations"]["devices"][0][
        "device_ids"
    ]
    assert learner_gpus and rollout_gpus and not set(learner_gpus) & set(rollout_gpus)
    assert services["rollout"]["deploy"]["replicas"] == 3
    assert "rollout.num_actors=3" in services["rollout"]["command"]

    ports = services["api"]["ports"]
    published = [
        p if isinstance(p, str) else f"{p.get('host_ip')}:{p.get('published')}" for p in ports
    ]
    assert all(p.startswith("127.0.0.1:") for p in published), published
    assert (
        services["ray-head"]["entrypoint"] == ["ray"]
        and "--head" in services["ray-head"]["command"]
    )


def test_compose_refuses_to_start_without_a_redis_password(compose_env: dict[str, str]) -> None:
    env = {k: v for k, v in compose_env.items() if k != "D3S_REDIS_PASSWORD"}
    done = _compose_config(env)
    assert done.returncode != 0 and "set D3S_REDIS_PASSWORD" in done.stderr, done.stderr


def test_entrypoint_derives_rollout_index_from_the_replica_name(tmp_path: Path) -> None:
    """The entrypoint's replica arithmetic with stand-ins for `hostname`, `dig` and `d3s`."""
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "hostname": "echo 172.18.0.7",
        "dig": 'echo "${FAKE_PTR}."',
        "d3s": 'echo "d3s $*"; echo "CUDA=${CUDA_VISIBLE_DEVICES:-}"',
        "nvidia-smi": 'printf "GPU 0: x\\nGPU 1: y\\n"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    script = str(ROOT / "deploy" / "entrypoint.sh")

    def run(ptr: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", script, *args],
            env={**env, "FAKE_PTR": ptr, **extra},
            capture_output=True,
            text=True,
            timeout=30,
        )

    v2 = run("d3s-rl-rollout-3.d3s-rl_default", "rollout", "cfg.yaml")
    assert v2.returncode == 0, v2.stderr
    assert (
        "d3s rollout cfg.yaml --index 2" in v2.stdout and "CUDA=0" in v2.stdout
    )  # replica 3 -> GPU (3-1) % 2
    v1 = run("d3s-rl_rollout_2.d3s-rl_default", "rollout", "cfg.yaml")
    assert "--index 1" in v1.stdout and "CUDA=1" in v1.stdout
    forced = run("whatever", "rollout", "cfg.yaml", D3S_ROLLOUT_INDEX="5")
    assert "--index 5" in forced.stdout
    bad = run("8f3a2b1c", "rollout", "cfg.yaml")
    assert bad.returncode == 2 and "set D3S_ROLLOUT_INDEX" in bad.stderr
    other = run("x", "selector", "cfg.yaml")
    assert other.stdout.startswith("d3s selector cfg.yaml") and "--index" not in other.stdout

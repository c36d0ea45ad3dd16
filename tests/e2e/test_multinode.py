"""Multi-node on one machine: a Ray cluster of a head and two worker nodes (loopback only),
each advertising the role resource of ``deploy/cluster.yaml``, an external Redis with a
password, and a ``d3s run`` submitted with ``ray job submit``. The learner, the rollout actors
and the selector must land on the nodes of their roles; the books balance; the password
appears in no log.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from fault_books import audit
from raycluster import RAY, LocalRayCluster, ray_env

from services.run.config import parse_config
from services.transport.redis_server import EmbeddedRedis

pytestmark = pytest.mark.integration  # about a minute here (the run itself ~30 s)

STEPS = 4
PASSWORD = "multinode-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    c = LocalRayCluster(dashboard=True)  # the job API lives in the dashboard
    try:
        c.start_head({"d3s_selector": 1, "d3s_api": 1})
        c.add_node({"d3s_learner": 1})
        c.add_node({"d3s_rollout": 2})
        c.wait_for_nodes(3)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def external_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), password=PASSWORD).start()
    try:
        yield server
    finally:
        server.stop()


def _node_of(log: Path) -> str:
    m = re.search(r"ready in [\d.]+s \(pid \d+, node ([0-9a-f]+)\)", log.read_text())
    assert m, f"{log.name} does not say where it ran"
    return m.group(1)


def test_a_run_submitted_as_a_ray_job_spreads_over_the_nodes_of_its_roles(
    tmp_path: Path, cluster: LocalRayCluster, external_redis: EmbeddedRedis, tiny_config
) -> None:
    from ray.util.state import list_nodes

    run_dir = tmp_path / "run"  # one path every node sees: the shared run directory
    data = tiny_config(
        run_dir,
        tmp_path / "cache",
        name="multinode",
        rollout={"prompts_per_step": 4, "num_actors": 2},
        train={"total_steps": STEPS, "eval_every": 100, "checkpoint_every": 2},
        service={
            "namespace": f"mn{uuid.uuid4().hex[:8]}",
            "max_group_backlog": 8,
            "wait_timeout_s": 120,
            "redis_url": external_redis.url,
            "ray_address": cluster.address,
        },
        weight_sync={"transport": "files", "path": str(tmp_path / "weights")},
    )
    cfg = parse_config(data)
    assert PASSWORD in external_redis.url
    config_file = (
        tmp_path / "run.yaml"
    )  # the URL (and its password) in a file, not on a command line
    config_file.write_text(yaml.safe_dump(data))
    config_file.chmod(0o600)

    t0 = time.monotonic()
    job = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            cluster.dashboard_url,
            "--",
            "d3s",
            "run",
            str(config_file),
        ],
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=540,
    )
    elapsed = time.monotonic() - t0
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output, output[-4000:]
    print(f"multi-node run: {elapsed:.0f}s")

    client = redis.Redis.from_url(external_redis.url)
    books = audit(client, cfg)
    assert set(books["loaded"]) == {"rollout-0", "rollout-1"}

    # Where each component ran, by the node id it logged, against the nodes' role resources.
    roles = {}
    for n in list_nodes(address=cluster.address, detail=True):
        total = n.resources_total if hasattr(n, "resources_total") else n["resources_total"]
        node_id = n.node_id if hasattr(n, "node_id") else n["node_id"]
        roles[node_id] = next(
            r for r in ("d3s_selector", "d3s_learner", "d3s_rollout") if r in total
        )
    logs = run_dir / "logs"
    placed = {
        name: roles[_node_of(logs / f"{name}.log")]
        for name in ("learner", "selector", "rollout-0", "rollout-1", "evaluator")
    }
    assert placed == {
        "learner": "d3s_learner",
        "evaluator": "d3s_learner",  # beside the learner, which has the policy and run dir
        "selector": "d3s_selector",
        "rollout-0": "d3s_rollout",
        "rollout-1": "d3s_rollout",
    }

    # The password is in no log: the run's, the Ray cluster's (the job driver's output too).
    scanned = [
        p
        for d in (logs, Path(cluster.temp_dir))
        for p in d.rglob("*")
        if p.is_file() and p.suffix in (".log", ".out", ".err")
    ]
    assert len(scanned) > 5
    for path in scanned:
        assert PASSWORD not in path.read_text(errors="replace"), path
    assert PASSWORD not in output

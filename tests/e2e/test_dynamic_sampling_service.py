"""End to end: ``d3s run`` in lock-step with dynamic sampling (real Redis, Ray, DeepSpeed).

The tiny policy solves about a quarter of the 1-digit sums, so some groups are all wrong: the
selector drops them (ledger ``filtered:<batch>``), the rollout actors generate again with the
same weights until each batch has ``prompts_per_step`` groups with reward variance, and the
books still balance exactly (every group written is used, stale, skipped, filtered,
dead-lettered or queued: tests/fault_books.py).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from fault_books import audit

from services.run.config import parse_config
from services.run.orchestrator import run_service
from services.telemetry.run_log import read_metrics
from services.transport.redis_server import EmbeddedRedis

pytestmark = pytest.mark.integration

STEPS = 4
PROMPTS = 4


def test_lock_step_run_fills_every_batch_with_variance_and_the_books_balance(
    tmp_path: Path, tiny_config
) -> None:
    run_dir = tmp_path / "run"
    cfg = parse_config(
        tiny_config(
            run_dir,
            tmp_path / "cache",
            name="e2e-ds",
            rollout={"prompts_per_step": PROMPTS, "num_actors": 2},
            algorithm={"dynamic_sampling": {"enabled": True, "max_draws_factor": 8}},
            train={"total_steps": STEPS, "eval_every": 100, "checkpoint_every": 4, "seed": 1},
            service={
                "mode": "sync",
                "max_staleness": 0,
                "namespace": f"e2e{uuid.uuid4().hex[:8]}",
                "max_group_backlog": 8,
                "wait_timeout_s": 300,  # components start slowly on a loaded box
            },
        )
    )

    summary = run_service(cfg)

    assert summary["steps"] == STEPS
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["groups"] == PROMPTS and r["groups_zero_var"] == 0
        assert r["groups_generated"] == PROMPTS + r["groups_zero_var_dropped"]
        assert r["policy_version_mean"] == r["step"] - 1  # still lock-step: on-policy
    with EmbeddedRedis(run_dir / "redis") as server:
        client = redis.Redis.from_url(server.url)
        books = audit(client, cfg)
        client.close()
    # Groups were dropped for lacking variance, each booked once, and the dropped count the
    # batches report is the ledger's.
    assert books["filtered"] == sum(r["groups_zero_var_dropped"] for r in rows) > 0

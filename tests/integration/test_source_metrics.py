"""Training metrics per source: the selector's curate reports the mean reward and the share of
zero-variance groups of each source when a step's groups come from two sources or more, and
``d3s train`` writes them (with the held-out accuracy per source) to metrics.jsonl."""

from __future__ import annotations

import re

import numpy as np
import pytest
from two_sources import SOURCES, run_config, save_tiny_policy, write_task

from selector.curate import curate
from selector.presets import get_preset
from services.api.views import _NAME
from services.common.metric_names import source_suffix
from services.transport.records import ScoredGroup

pytestmark = pytest.mark.integration


def _group(i: int, rewards: list[float], source: str) -> ScoredGroup:
    g = len(rewards)
    return ScoredGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        policy_version=0,
        prompt=np.array([1, 2], dtype=np.int32),
        responses=np.ones((g, 3), dtype=np.int32),
        response_lengths=np.full(g, 3, dtype=np.int32),
        behav_logp=np.zeros((g, 3), dtype=np.float32),
        rewards=np.array(rewards, dtype=np.float32),
        created_at=1.0,
        actor="rollout-0",
        task="by_answer",
        source=source,
    )


def _curate(groups: list[ScoredGroup]) -> dict[str, float]:
    return curate(groups, get_preset("grpo"), step=0, total_steps=10).stats


def test_curate_reports_reward_and_zero_variance_share_per_source() -> None:
    stats = _curate(
        [
            _group(0, [0, 1, 0, 1], "chain_sum"),
            _group(1, [1, 1, 1, 1], "chain_sum"),
            _group(2, [0, 0, 0, 0], "openai/gsm8k"),
        ]
    )
    assert stats["reward_mean/src:chain_sum"] == pytest.approx(0.75)
    assert stats["zero_var_share/src:chain_sum"] == pytest.approx(0.5)
    assert stats["reward_mean/src:openai_gsm8k"] == 0.0  # "/" cannot be in a metric name
    assert stats["zero_var_share/src:openai_gsm8k"] == 1.0
    assert stats["reward_mean"] == pytest.approx(0.5)  # the overall numbers stay
    assert stats["groups_zero_var"] == 2.0


def test_one_source_or_none_reports_nothing_per_source() -> None:
    one = _curate([_group(0, [0, 1], "a"), _group(1, [1, 1], "a")])
    none = _curate([_group(0, [0, 1], ""), _group(1, [1, 1], "")])
    assert not [k for k in (*one, *none) if "/src:" in k]


def test_per_source_names_pass_the_api_name_pattern() -> None:
    long = "data/" + "x" * 300 + ".parquet"
    stats = _curate([_group(0, [0, 1], long), _group(1, [1, 0], "b c")])
    names = [k for k in stats if "/src:" in k] + [f"eval/mean_response_length{source_suffix(long)}"]
    assert len(names) == 5
    assert all(_NAME.match(n) for n in names), names


def test_d3s_train_writes_training_and_heldout_metrics_per_source(tmp_path, monkeypatch) -> None:
    from services.run.config import parse_config
    from services.run.trainer import SyncTrainer
    from services.telemetry.run_log import read_metrics

    task = write_task(tmp_path / "data")
    monkeypatch.syspath_prepend(str(tmp_path / "data"))
    policy = save_tiny_policy(tmp_path / "policy")
    cfg = parse_config(run_config(task, policy, tmp_path / "run"))
    SyncTrainer(cfg).run()

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    trained = [r for r in rows if r["step"] >= 1]
    assert len(trained) == 2
    per_source = [r for r in trained if "reward_mean/src:add" in r]
    assert per_source, [sorted(r) for r in trained]
    for r in per_source:
        # The verifier gives the "sub" rows (larger answers) more reward: the series differ.
        assert r["reward_mean/src:sub"] > r["reward_mean/src:add"]
        for s in SOURCES:
            assert 0.0 <= r[f"zero_var_share/src:{s}"] <= 1.0
    evaluated = [r for r in rows if "heldout_accuracy" in r]
    assert [r["step"] for r in evaluated] == [0, 2]
    for r in evaluated:
        assert {f"eval/pass@1/src:{s}" for s in SOURCES} <= set(r)
        assert {f"eval/greedy_accuracy/src:{s}" for s in SOURCES} <= set(r)
    assert all(re.fullmatch(r"[A-Za-z0-9_./@:-]{1,128}", k) for r in rows for k in r)

"""The synchronous trainer end to end on CPU: tiny warm start, a few steps, resume, world size 2."""

from __future__ import annotations

import json

import pytest
import torch

from services.run.config import parse_config
from services.run.trainer import SyncTrainer
from services.telemetry.run_log import read_metrics

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny_cfg(tiny_config):
    def build(tmp_path, run: str, **over) -> dict:
        cfg = tiny_config(
            tmp_path / run,
            tmp_path.parent / "ws_cache",
            warmstart={"steps": 150, "band": None, "batch_size": 64, "lr": 3e-3},
            task={"heldout_size": 40},
            rollout={"prompts_per_step": 6},
            learner={"lr": 1e-3},
            train={"total_steps": 3, "eval_every": 2, "checkpoint_every": 1},
        )
        for k, v in over.items():
            section, field = k.split(".")
            cfg.setdefault(section, {})[field] = v
        return cfg

    return build


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_few_steps_learn_shapes_and_artifacts(tmp_path, tiny_cfg):
    cfg = parse_config(tiny_cfg(tmp_path, "a"))
    summary = SyncTrainer(cfg).run()
    run = tmp_path / "a"
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    trained = [r for r in steps if "loss" in r]
    assert trained, "every batch was skipped"
    for r in trained:
        assert torch.isfinite(torch.tensor(r["loss"]))
        assert r["samples_before"] == 24
        assert 1 <= r["samples_kept"] <= 24
        assert 0 < r["tokens_kept"] <= r["tokens_valid"]
        assert r["policy_version"] == r["step"] - 1  # rollouts used the newest weights (on-policy)
    assert "heldout_accuracy" in rows[0] and "heldout_accuracy" in steps[-1]
    assert summary["learner_tokens_total"] == sum(r["tokens_kept"] for r in trained)
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert list((run / "tensorboard").iterdir())
    final = _weights(run / "final_policy")
    from services.run.prepare import prepare_policy

    start = _weights(prepare_policy(cfg))
    assert any(not torch.equal(final[k], start[k]) for k in final)


def test_resume_gives_same_next_step_loss(tmp_path, tiny_cfg):
    straight = parse_config(tiny_cfg(tmp_path, "straight"))
    SyncTrainer(straight).run()
    ref = {r["step"]: r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")}

    cfg = parse_config(tiny_cfg(tmp_path, "resumed"))
    SyncTrainer(cfg).run(stop_at=2)  # interrupted after step 2
    assert max(r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == 2
    SyncTrainer(cfg).run()  # resumes from the step-2 checkpoint
    got = {r["step"]: r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")}
    assert got[3]["loss"] == pytest.approx(ref[3]["loss"], rel=1e-5, abs=1e-8)
    assert got[3]["reward_mean"] == ref[3]["reward_mean"]


def test_world_size_2(tmp_path, tiny_cfg):
    cfg = parse_config(
        tiny_cfg(tmp_path, "ws2", **{"learner.world_size": 2, "train.total_steps": 2})
    )
    summary = SyncTrainer(cfg).run()
    rows = [
        json.loads(line) for line in (tmp_path / "ws2" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert summary["learner_tokens_total"] > 0
    # and it matches world size 1 on the same data
    one = parse_config(tiny_cfg(tmp_path, "ws1", **{"train.total_steps": 2}))
    SyncTrainer(one).run()
    rows1 = [
        json.loads(line) for line in (tmp_path / "ws1" / "metrics.jsonl").read_text().splitlines()
    ]
    for a, b in zip(rows[1:], rows1[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)

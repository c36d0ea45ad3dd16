"""Each component's settings come from the run config's sections by field name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from learner.settings import LearnerServiceSettings
from selector.config import SelectorSettings
from services.common.settings import settings_from
from services.policy.limits import ModelLimits
from services.rollout.settings import RolloutSettings
from services.run.config import RunConfig, parse_config

# Every field of every settings type, set to a value other than its default, so a field the
# builder dropped or took from the wrong section shows as a mismatch.
_GIVEN = {
    "train": {"total_steps": 77, "schedule_steps": 50, "eval_every": 3, "checkpoint_every": 9,
              "seed": 13, "run_dir": "runs/t"},
    "rollout": {"prompts_per_step": 6, "samples_per_prompt": 5, "num_actors": 2,
                "inflight_updates": True},
    "service": {"max_staleness": 4, "max_group_backlog": 12, "max_batch_backlog": 3,
                "wait_timeout_s": 42.0, "max_abs_reward": 7.5},
    "algorithm": {"preset": "grpo", "adv_eps": 1e-3,
                  "dynamic_sampling": {"enabled": True, "max_draws_factor": 3}},
    "eval": {"seed": 99},  # another section's seed: must not leak into the components'
}  # fmt: skip


def test_every_settings_field_comes_from_its_section() -> None:
    cfg = parse_config(_GIVEN)
    selector = cfg.selector_settings(ModelLimits(vocab_size=50, max_positions=64))
    assert dataclasses.asdict(selector) | {"preset": selector.preset.name} == {
        "preset": "grpo", "total_steps": 77, "prompts_per_step": 6, "samples_per_prompt": 5,
        "seed": 13, "max_staleness": 4, "max_batch_backlog": 3, "wait_timeout_s": 42.0,
        "adv_eps": 1e-3, "max_abs_reward": 7.5, "vocab_size": 50, "max_positions": 64,
        "schedule_steps": 50, "dynamic_sampling": cfg.algorithm.dynamic_sampling,
    }  # fmt: skip
    assert selector.dynamic_sampling.enabled and selector.dynamic_sampling.max_draws(6) == 18
    assert dataclasses.asdict(cfg.rollout_settings()) == {
        "prompts_per_step": 6, "samples_per_prompt": 5, "num_actors": 2, "total_steps": 77,
        "seed": 13, "lock_step": False, "max_group_backlog": 12, "wait_timeout_s": 42.0,
        "max_staleness": 4, "inflight_updates": True,
    }  # fmt: skip
    learner = cfg.learner_settings()
    assert (learner.total_steps, learner.seed, learner.checkpoint_every, learner.eval_every) == (
        77, 13, 9, 3,
    )  # fmt: skip
    assert (learner.wait_timeout_s, learner.run_dir, learner.preset.name) == (
        42.0, Path("runs/t"), "grpo",
    )  # fmt: skip
    assert learner.title == "d3s (grpo, async)"
    assert cfg.learner_settings(Path("/elsewhere")).run_dir == Path("/elsewhere")


def test_the_schedule_horizon_defaults_to_total_steps() -> None:
    # The selector's schedule_steps is the derived horizon, not the (unset) config field.
    assert parse_config({"train": {"total_steps": 31}}).selector_settings().schedule_steps == 31


def test_a_field_in_no_section_or_in_two_is_named() -> None:
    cfg = RunConfig()
    sections = {"train": cfg.train, "eval": cfg.eval}
    with pytest.raises(TypeError, match=r"RolloutSettings\.[a-z_]+: found in no section"):
        settings_from(RolloutSettings, sections)
    given = {f.name: 0 for f in dataclasses.fields(LearnerServiceSettings) if f.name != "seed"}
    with pytest.raises(TypeError, match=r"LearnerServiceSettings\.seed: found in train and eval"):
        settings_from(LearnerServiceSettings, sections, **given)
    with pytest.raises(TypeError, match="SelectorSettings has no field horizon"):
        settings_from(SelectorSettings, sections, horizon=3)

"""The eval section (n_samples >= max(ks)) and the mixed task as a run option."""

from __future__ import annotations

import pytest

from services.run.config import ConfigError, parse_config
from services.tasks.config import MixedTaskConfig
from services.tasks.source import TaskSource, synthetic_task


def test_eval_defaults_and_overrides():
    cfg = parse_config({})
    assert cfg.eval.n_samples == 16 and cfg.eval.ks == [1, 8] and cfg.eval.greedy
    cfg = parse_config({"eval": {"n_samples": 4, "ks": [1, 4], "temperature": 0.6}})
    assert cfg.eval.ks == [1, 4] and cfg.eval.temperature == 0.6


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"n_samples": 4, "ks": [1, 8]}, "n_samples"),
        ({"n_samples": 0}, "ks"),
        ({"ks": [0, 1]}, "ks"),
        ({"n_samples": 0, "ks": [], "greedy": False}, "greedy"),
        ({"temperature": 0}, "eval.temperature"),
        ({"n_sample": 4}, "eval.n_sample"),
    ],
)
def test_bad_eval_section_names_the_field(section, field):
    with pytest.raises(ConfigError, match=field):
        parse_config({"eval": section})


def test_mixed_task_is_a_run_option_with_levels_per_prompt():
    cfg = parse_config({"task": {"type": "mixed", "levels": [1, 3], "heldout_size": 10}})
    assert isinstance(cfg.task, MixedTaskConfig)
    source = TaskSource.from_config(cfg.task)
    assert source.kind == "mixed"
    held = source.heldout()
    assert len(held) == 10 and {p.difficulty for p in held} == {1, 3}
    task, alphabet = synthetic_task(cfg.task)
    assert set("-*") <= set(alphabet) and task.levels == [1, 3]
    import numpy as np

    train = source.train_prompts(20, np.random.default_rng(0))
    assert {p.prompt_id for p in train}.isdisjoint(p.prompt_id for p in held)


def test_mixed_task_bad_levels():
    with pytest.raises(ConfigError, match="task.mixed.levels"):
        parse_config({"task": {"type": "mixed", "levels": [9]}})
    with pytest.raises(ConfigError, match="levels"):
        parse_config({"task": {"type": "mixed", "levels": []}})


def test_warmstart_cache_key_depends_on_the_task():
    from services.policy.config import PolicySpec, WarmstartConfig
    from services.policy.warmstart import task_identity

    spec, pol = WarmstartConfig(), PolicySpec()
    add = parse_config({}).task
    assert task_identity(add) == 3  # the addition key is what it always was (digits)
    assert spec.cache_key(pol, task_identity(add)) == spec.cache_key(pol, 3)
    a = spec.cache_key(pol, task_identity(MixedTaskConfig(levels=[1, 2])))
    b = spec.cache_key(pol, task_identity(MixedTaskConfig(levels=[1, 2], heldout_size=7)))
    c = spec.cache_key(pol, task_identity(MixedTaskConfig(levels=[1, 3])))
    assert a == b != c and a != spec.cache_key(pol, 3)

"""Run-config validation: every wrong field is named by its dotted path, nothing unread passes."""

from __future__ import annotations

import pytest

from services.run.config import ConfigError, load_config, parse_config
from services.tasks.config import ArithmeticTaskConfig, JsonlTaskConfig


def error_of(data: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"rollout": {"prompt_per_step": 4}}, "rollout.prompt_per_step"),  # a typo
        ({"rollout": {"samples_per_prompt": 1}}, "rollout.samples_per_prompt"),
        ({"rollout": {"engine": "sglang"}}, "rollout.engine"),
        ({"algorithm": {"preset": "d4s"}}, "algorithm"),
        ({"algorithm": {"sample_init": 1.5}}, "algorithm.sample_init"),
        ({"train": {"total_steps": 0}}, "train.total_steps"),
        ({"service": {"namespace": "has space"}}, "service.namespace"),
        ({"service": {"max_group_backlog": 2}}, "service.max_group_backlog"),
        ({"task": {"type": "jsonl"}}, "task.jsonl.train_path"),
        ({"task": {"type": "arithmetic", "train_path": "x.jsonl"}}, "task.arithmetic.train_path"),
        ({"task": {"type": "poetry"}}, "task"),
        ({"policy": {"path": "/nonexistent/model"}}, "policy.path"),
        ({"warmstart": {"steps": -1}}, "warmstart.steps"),
        ({"unknown_section": {}}, "unknown_section"),
    ],
)
def test_each_wrong_field_is_named(data: dict, field: str) -> None:
    assert field in error_of(data)


def test_learner_temperature_must_match_rollout() -> None:
    assert "learner.temperature must equal rollout.temperature" in error_of(
        {"rollout": {"temperature": 0.7}}
    )


def test_sync_mode_needs_a_share_per_actor() -> None:
    message = error_of(
        {"service": {"mode": "sync"}, "rollout": {"prompts_per_step": 2, "num_actors": 3}}
    )
    assert "rollout.num_actors" in message


def test_jsonl_task_needs_a_model_and_existing_files(tmp_path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    assert "policy.path: required" in error_of(
        {"task": {"type": "jsonl", "train_path": str(train)}}
    )
    missing = error_of(
        {
            "task": {
                "type": "jsonl",
                "train_path": str(train),
                "eval_path": str(tmp_path / "no.jsonl"),
            }
        }
    )
    assert "eval_path: no such file" in missing


def test_task_variants_and_the_default_type(tmp_path) -> None:
    cfg = parse_config({"task": {"digits": 2}})  # no type: the built-in arithmetic task
    assert isinstance(cfg.task, ArithmeticTaskConfig) and cfg.task.digits == 2
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    cfg = parse_config(
        {"task": {"type": "jsonl", "train_path": str(train)}, "policy": {"path": str(model)}}
    )
    assert isinstance(cfg.task, JsonlTaskConfig) and cfg.task.eval_path is None


def test_overrides_and_their_errors() -> None:
    cfg = parse_config({}, ["train.total_steps=7", "algorithm.preset=grpo"])
    assert cfg.train.total_steps == 7 and cfg.algorithm.preset == "grpo"
    assert "expected key=value" in error_of({}, ["train.total_steps"])
    assert "train.total_steps" in error_of({}, ["train.total_steps=-3"])
    assert "is not a section" in error_of({"name": "x"}, ["name.inner=1"])
    # A text value holding ': ' is not YAML unquoted: a clear error, not a traceback.
    err = error_of({}, ["task.instruction={question}\nAnswer: #### 7"])
    assert "task.instruction" in err and "quote" in err
    quoted = parse_config({}, ['name="a: b"'])
    assert quoted.name == "a: b"


def test_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(scalar)


def test_components_get_their_own_settings() -> None:
    cfg = parse_config(
        {
            "rollout": {"prompts_per_step": 8, "num_actors": 3},
            "service": {"mode": "sync", "max_staleness": 0},
        }
    )
    selector = cfg.selector_settings()
    assert (selector.prompts_per_step, selector.max_staleness, selector.preset.name) == (
        8,
        0,
        "d3s",
    )
    rollout = cfg.rollout_settings()
    assert rollout.lock_step and rollout.num_actors == 3
    assert cfg.learner_settings().total_steps == cfg.train.total_steps

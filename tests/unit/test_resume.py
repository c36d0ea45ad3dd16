"""Resuming a run directory: which config changes are safe, which are refused, and what the run
directory is found to hold. Pure functions over config mappings, and a few files in tmp_path."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from rich.console import Console

from learner.engine import _lr_lambda
from services.run.config import RunConfig, load_config, parse_config
from services.run.progress import StepProgress
from services.run.resume import (
    SAFE_ON_RESUME,
    STORED_CONFIG,
    RunDirState,
    check_resume,
    diff_configs,
    inspect_run_dir,
    is_safe,
    move_aside,
    write_stored_config,
)
from services.run.summary import build_summary, summary_table


def _cfg(*overrides: str) -> dict:
    return parse_config({"name": "r", "train": {"run_dir": "runs/r"}}, list(overrides)).stored()


def _check(stored: dict | None, given: dict, steps_done: int = 60):
    state = RunDirState(holds_run=True, steps_done=steps_done, stored=stored)
    return check_resume(Path("runs/r"), state, given, given["train"]["total_steps"])


def test_diff_names_every_leaf_that_differs_and_only_those() -> None:
    stored = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    given = {"a": {"b": 2, "c": [1, 2]}, "d": "x", "e": {"f": None}}
    diffs = {d.path: (d.stored, d.given) for d in diff_configs(stored, given)}
    assert diffs == {"a.b": (1, 2), "e.f": ("(unset)", None)}


def test_the_allow_list_covers_sections_and_fields_not_prefixes_of_names() -> None:
    assert is_safe("api.port") and is_safe("logging.wandb.project") and is_safe("train.eval_every")
    assert not is_safe("train.seed") and not is_safe("algorithm.preset")
    assert not is_safe("apix.port")  # a section name is matched whole


def test_more_steps_and_logging_are_allowed_and_listed_in_one_line() -> None:
    check = _check(
        _cfg("train.total_steps=60"),
        _cfg("train.total_steps=90", "api.port=8001", "logging.tensorboard=false"),
    )
    assert check.ok
    assert [d.path for d in check.allowed] == [
        "train.total_steps",
        "api.port",
        "logging.tensorboard",
    ]
    line = check.summary_line()
    assert line is not None and "\n" not in line
    assert "train.total_steps 60 -> 90" in line and "api.port 8000 -> 8001" in line


def test_what_a_step_computes_is_refused_naming_both_values() -> None:
    check = _check(
        _cfg(),
        _cfg(
            "train.seed=3",
            "algorithm.preset=grpo",
            "learner.loss.type=gspo",
            "rollout.samples_per_prompt=4",
            "policy.n_layer=2",
            "task.digits=2",
            "learner.token_pass=full",
            "algorithm.token_score=entropy",
            "api.port=9000",
        ),
    )
    assert not check.ok
    refused = {d.path: (d.stored, d.given) for d in check.refused}
    assert refused["train.seed"] == (0, 3)
    assert refused["algorithm.preset"] == ("d3s", "grpo")
    assert refused["learner.loss.type"] == ("grpo", "gspo")
    assert refused["rollout.samples_per_prompt"] == (8, 4)
    assert refused["policy.n_layer"] == (3, 2)
    assert refused["task.digits"] == (3, 2)
    # Settings whose names read like secrets to the API's redaction are compared as given.
    assert refused["learner.token_pass"] == ("compact", "full")
    assert refused["algorithm.token_score"][1] == "entropy"
    assert "api.port" not in refused and [d.path for d in check.allowed] == ["api.port"]
    text = check.refusal()
    assert "train.seed: 0 (stored) -> 3 (given)" in text
    assert 'algorithm.preset: "d3s" (stored) -> "grpo" (given)' in text
    assert "--fresh" in text and "train.run_dir" in text


def test_a_total_below_the_steps_done_is_refused_even_without_a_stored_config() -> None:
    for stored in (_cfg("train.total_steps=60"), None):
        check = _check(stored, _cfg("train.total_steps=30", "name=lock"), steps_done=60)
        assert not check.ok
        (total,) = [d for d in check.refused if d.path == "train.total_steps"]
        assert total.given == 30 and "below the 60 steps already done" in total.describe()
    # A name that differs but keeps the stored run_dir (given explicitly) is refused too.
    assert "name" in {d.path for d in _check(_cfg(), _cfg("name=lock")).refused}
    # Lowered but not below what is done: allowed (it is still ahead of the run).
    assert _check(_cfg("train.total_steps=60"), _cfg("train.total_steps=40"), steps_done=30).ok


def test_a_directory_without_a_run_needs_no_check(tmp_path) -> None:
    (tmp_path / "logs").mkdir()
    write_stored_config(tmp_path, _cfg("train.seed=5"))
    state = inspect_run_dir(tmp_path)
    assert not state.holds_run and state.stored is None
    check = check_resume(tmp_path, state, _cfg(), 200)
    assert check.ok and check.summary_line() is None
    assert not inspect_run_dir(tmp_path / "absent").holds_run


def test_inspect_reads_checkpoint_metrics_and_the_stored_config(tmp_path) -> None:
    (tmp_path / "checkpoints" / "step0000030").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step0000030")
    rows = [{"step": s} for s in range(0, 36)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3'  # a torn last line
    )
    write_stored_config(tmp_path, _cfg())
    state = inspect_run_dir(tmp_path)
    assert state.holds_run and state.steps_done == 35 and state.stored == _cfg()
    assert (tmp_path / STORED_CONFIG).is_file() and not (tmp_path / "config.json").exists()


def test_move_aside_renames_and_never_deletes(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    first = move_aside(run, now=0)
    assert first is not None and not run.exists()
    assert first.name.startswith("run.old-") and (first / "metrics.jsonl").read_text() == "{}\n"
    run.mkdir()
    second = move_aside(run, now=0)  # the same second: a suffix, the first one kept
    assert second is not None and second != first and first.exists() and second.exists()
    assert move_aside(run) is None


def test_progress_and_summary_never_show_more_done_than_the_total(tmp_path) -> None:
    buf = io.StringIO()
    bar = StepProgress(30, 60, description="lock (async)", console=Console(file=buf, width=100))
    bar.update(60, {"reward_mean": 0.5}, None)
    bar.close()
    assert buf.getvalue().startswith("lock (async): 30/30 steps")
    summary = build_summary(
        {"steps": 60}, tmp_path, total_steps=30, mode="d3s run, async", preset="d3s"
    )
    out = io.StringIO()
    Console(file=out, width=120).print(summary_table(summary, "lock: done"))
    assert summary["steps"] == 30 and "30 / 30" in out.getvalue() and "60" not in out.getvalue()


def test_the_run_directory_follows_the_name_unless_given() -> None:
    quickstart = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
    assert load_config(quickstart).train.run_dir == Path("runs/quickstart")
    # The case: a renamed quickstart run gets its own directory, not the finished one's.
    assert load_config(quickstart, ["name=lock"]).train.run_dir == Path("runs/lock")
    assert load_config(None, ["name=my run/2"]).train.run_dir == Path("runs/my-run-2")
    given = ["name=lock", "train.run_dir=elsewhere"]
    assert load_config(quickstart, given).train.run_dir == Path("elsewhere")
    # Resolved once: a dumped config validates back to the same directory.
    cfg = load_config(None, ["name=a"])
    assert RunConfig.model_validate(cfg.model_dump()).train.run_dir == Path("runs/a")


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The config models a field's annotation can hold (through Optional, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _model_classes(arg)]


def _in_schema(path: str) -> bool:
    models: list[type[BaseModel]] = [RunConfig]
    for part in path.split("."):
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            return False
        models = [m for f in fields for m in _model_classes(f.annotation)]
    return True


def test_every_safe_entry_names_a_field_or_section_of_the_schema() -> None:
    # A renamed field must not leave a dead entry behind (its new name would be refused while
    # the list still reads as if it were allowed).
    dead = [p for p in SAFE_ON_RESUME if not _in_schema(p)]
    assert dead == []
    assert len(set(SAFE_ON_RESUME)) == len(SAFE_ON_RESUME)
    # The walk itself tells a missing name from a present one.
    assert _in_schema("logging.wandb.project") and _in_schema("rollout.vllm.dtype")
    assert not _in_schema("weight_sync.wire") and not _in_schema("train.total")


def test_weight_sync_is_safe_field_by_field_but_not_the_wire_dtype() -> None:
    check = _check(
        _cfg(),
        _cfg(
            "weight_sync.bucket_mb=8",
            "weight_sync.timeout_s=60",
            "weight_sync.wire_dtype=bfloat16",
        ),
    )
    assert [d.path for d in check.allowed] == ["weight_sync.bucket_mb", "weight_sync.timeout_s"]
    assert [(d.path, d.stored, d.given) for d in check.refused] == [
        ("weight_sync.wire_dtype", "auto", "bfloat16")
    ]


def _vllm_run(**vllm: Any) -> dict:
    """A stored config of a run on vLLM (built by hand: this venv may have no vLLM to validate
    ``engine: vllm`` against); ``vllm`` None leaves the section out, as a user's config may."""
    data = _cfg()
    data["rollout"]["engine"] = "vllm"
    data["rollout"]["vllm"] = vllm or None
    return data


def test_a_section_left_out_compares_as_its_defaults() -> None:
    defaults = RunConfig.model_fields["rollout"].default.vllm_settings.model_dump(mode="json")
    # The case: the stored run spelt out the defaults, the given config leaves vllm out.
    assert _check(_vllm_run(**defaults), _vllm_run()).ok
    assert _check(_vllm_run(), _vllm_run(**defaults)).ok
    # Only what the run would really do differently is reported, once, against the default.
    check = _check(_vllm_run(**{**defaults, "dtype": "float16"}), _vllm_run())
    assert defaults["dtype"] in ("float32", "bfloat16")  # as resolved for this run (on CPU)
    assert [d.describe() for d in check.refused] == [
        f'rollout.vllm.dtype: "float16" (stored) -> "{defaults["dtype"]}" (given)'
    ]
    assert "(unset)" not in check.refusal() and "null" not in check.refusal()
    # A field the stored config lacks (written by an older d3s) takes its default too.
    older = _cfg()
    del older["train"]["schedule_steps"], older["eval"]["max_pending"]
    assert _check(older, _cfg()).ok and not _check(older, _cfg()).allowed
    # ...and a real difference beside it is still reported.
    assert [d.path for d in _check(older, _cfg("eval.max_pending=4")).allowed] == [
        "eval.max_pending"
    ]


def test_extending_a_run_keeps_its_schedule_horizon_and_the_later_steps_hold_the_end() -> None:
    stored, given = _cfg("train.total_steps=60"), _cfg("train.total_steps=120")
    check = _check(stored, given)
    assert check.ok and check.schedule_steps == 60
    line = check.summary_line()
    assert line is not None and "train.total_steps 60 -> 120" in line
    assert "horizon of 60 steps (steps after 60 train at the final keep ratios" in line
    cfg = parse_config(
        {"name": "r", "train": {"run_dir": "runs/r"}},
        ["train.total_steps=120", "learner.lr_schedule=cosine"],
    )
    check.apply_to(cfg)
    assert cfg.train.schedule_steps == 60 and cfg.train.total_steps == 120
    # What the docs say of the step after the old end: rho_s and K at their final values, the
    # LR at its final value (min_lr_ratio x lr), and so for every later step.
    schedule = cfg.algorithm.build_preset().schedule
    settings = cfg.selector_settings()
    assert settings.horizon == 60 and settings.total_steps == 120
    for step in (60, 61, 119):
        assert settings.preset.ratios(step, settings.horizon) == (
            schedule.sample_final,
            schedule.token_final,
        )
        assert _lr_lambda(cfg.learner, cfg.train.horizon)(step) == cfg.learner.min_lr_ratio
    # Before the old end nothing moved: the step-30 ratios are those of the 60-step run.
    assert settings.preset.ratios(30, settings.horizon) == schedule.at(30, 60)
    # The run goes on with the horizon stored, so the next resume keeps it again.
    assert cfg.stored()["train"]["schedule_steps"] == 60
    again = _check(
        cfg.stored(), _cfg("train.total_steps=200", "learner.lr_schedule=cosine"), steps_done=120
    )
    assert again.ok and again.schedule_steps == 60


def test_a_horizon_given_explicitly_must_match_the_stored_one() -> None:
    stored = _cfg("train.total_steps=60")
    same = _check(stored, _cfg("train.total_steps=120", "train.schedule_steps=60"))
    assert same.ok and same.schedule_steps == 60
    other = _check(stored, _cfg("train.total_steps=120", "train.schedule_steps=120"))
    assert [(d.path, d.stored, d.given) for d in other.refused] == [
        ("train.schedule_steps", 60, 120)
    ]
    assert "the schedules' horizon is kept on resume" in other.refusal()
    # An unchanged length keeps the horizon without a word about it.
    plain = _check(stored, _cfg("train.total_steps=60"))
    assert plain.ok and plain.schedule_steps == 60 and "horizon" not in plain.summary_line()
    # Without a stored config there is nothing to keep: the given horizon is used.
    assert _check(None, _cfg("train.total_steps=120")).schedule_steps is None

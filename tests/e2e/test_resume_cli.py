"""Running again in a run directory that holds a run, as a user would: ``d3s train`` in a
subprocess on a tiny config. A safe change (more steps) continues the run; any other change
exits 2 before anything starts, naming each field, and leaves the directory byte-for-byte as it
was; ``--fresh`` moves the old directory aside and starts anew. ``d3s run`` and ``d3s validate``
refuse the same way (in-process: the refusal comes before Redis or Ray)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from d3s_cli import run_d3s
from typer.testing import CliRunner

from selector.presets import get_preset
from services.run.cli import app
from services.run.resume import STORED_CONFIG
from services.telemetry.run_log import read_metrics

pytestmark = pytest.mark.integration

STEPS = 2


def _d3s(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_d3s(*args, timeout=timeout, columns=200)


def _hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path, with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _trained_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, run_dir): a tiny run trained to its end (STEPS steps) by ``d3s train``."""
    root = tmp_path_factory.mktemp("resume")
    run_dir = root / "run"
    data = {  # the tiny_config fixture's run (a function-scoped fixture; this one is per module)
        "name": "tiny",
        "task": {"type": "arithmetic", "digits": 1, "heldout_size": 20},
        "policy": {"n_layer": 1, "n_embd": 32, "n_head": 2},
        "warmstart": {
            "steps": 200,
            "band": None,
            "cache_dir": str(tmp_path_factory.getbasetemp() / "warmstart"),
        },
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4},
        "eval": {"n_samples": 4, "ks": [1, 4]},
        "train": {
            "run_dir": str(run_dir),
            "total_steps": STEPS,
            "eval_every": STEPS,
            "checkpoint_every": 1,
            "progress_bar": True,
        },
        "api": {"enabled": False},
        "logging": {"tensorboard": False},
    }
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    out = _d3s("train", str(config))
    assert out.returncode == 0, (out.stderr + out.stdout)[-3000:]
    assert _trained_steps(run_dir) == list(range(STEPS + 1))
    assert json.loads((run_dir / STORED_CONFIG).read_text())["train"]["total_steps"] == STEPS
    return config, run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the finished run for one test to change (the copy's path differs, and
    ``train.run_dir`` is one of the fields allowed to)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_more_steps_continue_the_run_and_train_only_the_extra_steps(
    finished_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, base = finished_run
    run_dir = _copy(base, tmp_path)
    before = read_metrics(run_dir / "metrics.jsonl")
    more = STEPS + 2

    out = _d3s(
        "train",
        str(config),
        "--set",
        f"train.run_dir={run_dir}",
        "--set",
        f"train.total_steps={more}",
    )

    assert out.returncode == 0, (out.stderr + out.stdout)[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("resuming the run in")]
    assert f"({STEPS} steps done)" in line and f"train.total_steps {STEPS} -> {more}" in line
    assert f"the schedules keep their horizon of {STEPS} steps" in line
    assert f"{more}/{more} steps" in out.stderr
    assert f"{more} / {more}" in out.stdout
    # The steps already done were kept, the extra ones trained once each.
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(more + 1))
    assert rows[: STEPS + 1] == before
    assert all("loss" in r or "tokens_valid" in r for r in rows[STEPS + 1 :])
    # The schedule kept the horizon of the first start (docs/architecture.md, "Resuming a
    # run"): the steps after the old end are curated at the final keep ratios (d3s: rho_s and
    # K both 0.5), not at the mid-schedule ones a horizon of `more` steps would give.
    schedule = get_preset("d3s").schedule
    final = (schedule.sample_final, schedule.token_final)
    assert [(r["sample_ratio"], r["token_ratio"]) for r in rows[STEPS + 1 :]] == [final] * 2
    assert schedule.at(STEPS, more) != final  # what a stretched schedule would have used
    assert (rows[1]["sample_ratio"], rows[1]["token_ratio"]) == schedule.at(0, STEPS)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{more:07d}"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == more
    # The next resume compares against the config the run went on with.
    stored = json.loads((run_dir / STORED_CONFIG).read_text())["train"]
    assert stored["total_steps"] == more and stored["schedule_steps"] == STEPS


def test_a_refused_change_exits_2_naming_each_field_and_touches_nothing(
    finished_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, base = finished_run
    run_dir = _copy(base, tmp_path)
    before = _hashes(run_dir)
    at = ["--set", f"train.run_dir={run_dir}"]

    out = _d3s("train", str(config), *at, "--set", "train.seed=7", "--set", "algorithm.preset=grpo")

    shown = out.stderr + out.stdout
    assert out.returncode == 2, shown[-3000:]
    assert f"{run_dir} already holds a run ({STEPS} steps done)" in shown
    assert "train.seed: 0 (stored) -> 7 (given)" in shown
    assert 'algorithm.preset: "d3s" (stored) -> "grpo" (given)' in shown
    assert "--fresh" in shown and "train.run_dir" in shown
    assert "steps |" not in shown  # nothing started: no progress line

    # The same refusal from `d3s run` (before Redis or Ray) and `d3s validate`.
    runner = CliRunner()
    for command in ("run", "validate"):
        result = runner.invoke(app, [command, str(config), *at, "--set", "train.seed=7"])
        assert result.exit_code == 2, (command, result.output)
        assert "train.seed: 0 (stored) -> 7 (given)" in result.output, command
    # validate accepts what a resume allows, and says what changed.
    result = runner.invoke(app, ["validate", str(config), *at, "--set", "train.total_steps=9"])
    assert result.exit_code == 0, result.output
    assert f"train.total_steps {STEPS} -> 9" in result.output

    assert _hashes(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing moved or added


def test_a_total_below_the_steps_done_is_refused_and_never_shown_as_done(
    finished_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, base = finished_run
    run_dir = _copy(base, tmp_path)
    before = _hashes(run_dir)

    out = _d3s(
        "train", str(config), "--set", f"train.run_dir={run_dir}", "--set", "train.total_steps=1"
    )

    shown = out.stderr + out.stdout
    assert out.returncode == 2, shown[-3000:]
    assert f"train.total_steps: {STEPS} (stored) -> 1 (given); below the {STEPS} steps" in shown
    assert f"{STEPS}/1" not in shown and f"{STEPS} / 1" not in shown
    assert _hashes(run_dir) == before


def test_fresh_keeps_the_old_directory_under_a_new_name_and_starts_anew(
    finished_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, base = finished_run
    run_dir = _copy(base, tmp_path)
    before = _hashes(run_dir)

    out = _d3s(
        "train",
        str(config),
        "--fresh",
        "--set",
        f"train.run_dir={run_dir}",
        "--set",
        "train.seed=7",
        "--set",
        "train.total_steps=1",
    )

    assert out.returncode == 0, (out.stderr + out.stdout)[-3000:]
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert f"--fresh: the old run directory is now {old}" in out.stderr
    assert _hashes(old) == before  # moved whole, not a byte changed
    # A new run of one step, from step 0, with the new seed stored.
    assert _trained_steps(run_dir) == [0, 1]
    assert "1/1 steps" in out.stderr and "resuming" not in out.stderr
    assert json.loads((run_dir / STORED_CONFIG).read_text())["train"]["seed"] == 7

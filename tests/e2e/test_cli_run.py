"""What ``d3s run`` and ``d3s train`` show on the terminal, as a user would see it: the commands in a
subprocess on a tiny config, their stdout and stderr read back.

By default a run prints a few lines, one progress line and a summary table, and nothing of Ray,
Serve, DeepSpeed or transformers (that goes to ``run_dir/logs/``); the whole summary is in
``run_dir/summary.json``. ``--verbose`` puts the libraries' output back on the terminal.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from d3s_cli import run_d3s

from services.telemetry.run_log import read_metrics

pytestmark = pytest.mark.integration

MAX_LINES = 30
# What the libraries print when their output reaches the terminal.
NOISE = (
    "ProxyActor",
    "ServeController",
    "Started Serve",
    "(raylet)",
    "Loading weights",
    "Writing model shards",
    "real_accelerator",
    "[WARNING]",
    "Token authentication",
)


def _write_config(tiny_config, tmp_path: Path, cache: Path, **sections: dict) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    data = tiny_config(run_dir, cache, **sections)
    data["train"]["progress_bar"] = True
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, run_dir


def _d3s(*args: str, timeout: float = 540) -> subprocess.CompletedProcess[str]:
    return run_d3s(*args, timeout=timeout, columns=120)


def _terminal(out: subprocess.CompletedProcess[str]) -> str:
    return out.stderr + out.stdout


def test_d3s_run_is_quiet_and_ends_with_the_summary(
    tiny_config, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps = 6
    config, run_dir = _write_config(
        tiny_config,
        tmp_path,
        tmp_path_factory.getbasetemp() / "warmstart",
        rollout={"num_actors": 2},
        train={"total_steps": steps, "eval_every": 3, "checkpoint_every": steps},
        service={
            "namespace": f"cli{uuid.uuid4().hex[:8]}",
            "max_group_backlog": 8,
            "wait_timeout_s": 300,  # components start slowly on a loaded box
        },
        api={"enabled": True, "port": 0},
        logging={"wandb": {"project": "d3s-e2e"}},  # offline: no network needed
    )

    t0 = time.monotonic()
    out = _d3s("run", str(config))
    print(f"\nd3s run (subprocess, {steps} steps): {time.monotonic() - t0:.1f}s\n{_terminal(out)}")

    shown = _terminal(out)
    assert out.returncode == 0, shown[-3000:]
    lines = shown.splitlines()
    assert len(lines) <= MAX_LINES, shown
    assert not [n for n in NOISE if n in shown], shown
    # A few lines of the run, then its progress line, on stderr; the table on stdout, last.
    assert "HTTP API and dashboard at http://127.0.0.1:" in out.stderr
    assert f"{steps}/{steps} steps" in out.stderr
    table = out.stdout
    assert table.strip().splitlines()[0].startswith("tiny: done")
    for row in (
        "steps",
        "held-out accuracy",
        "tokens kept",
        "GRPO-equivalent",
        "groups",
        "stale / dead-lettered",
        "wall time",
        "run dir",
        "plot",
        "logs",
        "summary",
    ):
        assert row in table, (row, table)
    assert "summary.json" in table.strip().splitlines()[-1]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["result"]["steps"] == steps
    rows = read_metrics(run_dir / "metrics.jsonl")
    # The token counts are the run's: kept = the learner's total; GRPO-equivalent >= kept.
    assert summary["tokens"]["kept"] == pytest.approx(rows[-1]["learner_tokens_total"])
    assert summary["tokens"]["forward"] == pytest.approx(rows[-1]["learner_forward_tokens_total"])
    assert summary["tokens"]["grpo_equivalent"] >= summary["tokens"]["kept"] > 0
    assert summary["groups"]["written"] >= summary["groups"]["used"] == steps * 4
    assert summary["heldout"]["heldout_accuracy"]["final_step"] == steps
    # Held-out evaluation ran in the evaluator actor, beside training: each evaluated step's
    # result was written after that step's row and merged into it.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(x["step"] for x in lines if x.get("row") == "eval") == [0, 3, steps]
    assert all("heldout_accuracy" in r for r in rows if r["step"] in (0, 3, steps))
    assert "evaluated in" in (run_dir / "logs" / "evaluator.log").read_text()
    # What did not reach the terminal is in the run's logs.
    logs = run_dir / "logs"
    assert "Serve" in (logs / "driver.log").read_text()
    for name in ("learner", "selector", "rollout-0", "rollout-1"):
        assert (logs / f"{name}.log").stat().st_size > 0, name
    assert "Loading weights" in (logs / "learner.log").read_text()
    # The logging section reached the service learner's logger: TensorBoard and an offline W&B run.
    assert any((run_dir / "tensorboard").iterdir())
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "wandb" in summary["paths"]


def test_d3s_train_quiet_and_verbose(
    tiny_config, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The synchronous trainer the same way; --verbose shows what the default hides."""
    cache = tmp_path_factory.getbasetemp() / "warmstart"
    config, run_dir = _write_config(
        tiny_config,
        tmp_path,
        cache,
        train={"total_steps": 3, "eval_every": 3},
        logging={"tensorboard": False, "wandb": {"project": "d3s-e2e", "name": "sync"}},
    )

    quiet = _d3s("train", str(config))
    shown = _terminal(quiet)
    assert quiet.returncode == 0, shown[-3000:]
    assert len(shown.splitlines()) <= MAX_LINES, shown
    assert not [n for n in NOISE if n in shown], shown
    assert "3/3 steps" in quiet.stderr and "lock-step" in quiet.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    assert "real_accelerator" in (run_dir / "logs" / "driver.log").read_text()
    # The logging section reached the trainer's logger: W&B offline, TensorBoard off.
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (run_dir / "tensorboard").exists()

    verbose = _d3s("train", str(config), "--verbose", "--set", f"train.run_dir={tmp_path / 'run2'}")
    assert verbose.returncode == 0, _terminal(verbose)[-3000:]
    assert "real_accelerator" in _terminal(verbose)  # DeepSpeed's own line, on the terminal


def test_d3s_run_prints_the_root_cause_of_a_component_that_cannot_start(
    tiny_config, tmp_path: Path
) -> None:
    """A policy whose config.json is not JSON: every component that loads it fails at start
    with transformers' "not a valid JSON file", whose cause (the JSON error, with its line and
    column) is only in the component's log. ``d3s run`` prints it under the log's name, and
    still only a few lines. (The vLLM suite shows the same for an engine that fails in its
    own process.)"""
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text('{"model_type": "gpt2",\n  "n_layer": 1,,\n}\n')
    config, run_dir = _write_config(
        tiny_config,
        tmp_path,
        tmp_path / "unused-warmstart",
        policy={"path": str(policy)},
        service={"namespace": f"bad{uuid.uuid4().hex[:8]}", "wait_timeout_s": 120},
    )
    out = _d3s("run", str(config), timeout=300)
    shown = _terminal(out)
    print(f"\n{shown}")
    assert out.returncode == 1, shown[-3000:]
    lines = out.stderr.splitlines()
    (failed,) = [i for i, x in enumerate(lines) if x.startswith("run failed: ")]
    # learner, selector or rollout-0: whichever reported first
    name = lines[failed].split()[2]
    assert name in ("learner", "selector", "rollout-0"), lines[failed]
    assert "is not a valid JSON file" in lines[failed] and "line 2" not in lines[failed]
    assert lines[failed + 1] == f"from {name}.log:", shown
    assert (
        "  json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes: "
        "line 2 column 16 (char 38)" in lines[failed + 2 :]
    ), shown
    assert lines[-1] == f"logs: {run_dir.resolve() / 'logs'}/", shown
    assert len(shown.splitlines()) <= MAX_LINES, shown

"""The terminal side of a run: token accounting and the summary table, which log lines reach the
terminal, the quiet redirection of a process's output, the progress line, the logging config."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest
from rich.console import Console

from services.run.config import ConfigError, parse_config
from services.run.orchestrator import failure_causes
from services.run.progress import ConsoleLines, StepProgress, quiet_terminal
from services.run.summary import build_summary, summary_table, token_totals, write_summary
from services.run.supervisor import ServiceError
from services.telemetry.logfiles import error_lines, log_sizes


def _rows() -> list[dict]:
    # Step 0 (no training), two trained steps, one step whose batch was skipped.
    return [
        {"step": 0, "heldout_accuracy": 0.25},
        {
            "step": 1,
            "samples_before": 32,
            "samples_kept": 16,
            "tokens_valid": 100,
            "tokens_kept": 30,
            "tokens_forward": 180,
            "reward_mean": 0.4,
        },
        {
            "step": 2,
            "samples_before": 32,
            "samples_kept": 32,
            "tokens_valid": 200,
            "tokens_kept": 50,
            "tokens_forward": 300,
            "reward_mean": 0.5,
            "heldout_accuracy": 0.5,
            "eval/greedy_accuracy": 0.5,
            "eval/pass@1": 0.375,
            "eval/pass@4": 0.75,
            "eval/maj@4": 0.5,
            "eval/mean_response_length": 3.0,
        },
        {"step": 3, "samples_before": 32, "samples_kept": 8, "reward_mean": 0.0},
    ]


def test_token_totals_scale_kept_samples_to_every_sample() -> None:
    tot = token_totals(_rows())
    assert tot["kept"] == 80 and tot["forward"] == 480
    # Step 1 kept half the samples: its 100 response tokens stand for 200 under GRPO.
    assert tot["grpo_equivalent"] == pytest.approx(100 * 32 / 16 + 200)
    assert tot["kept_fraction"] == pytest.approx(80 / 400)
    assert token_totals([{"step": 0}])["grpo_equivalent"] == 0


def test_summary_from_the_run_dir(tmp_path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (tmp_path / "learning_curve.png").write_bytes(b"png")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "learner.log").write_text(
        "2026-01-01 00:00:00,000 INFO learner.service: step 1\n"
        "2026-01-01 00:00:01,000 WARNING learner.service: batch x was already trained\n"
        "a WARNING inside a message is not a record\n"
    )
    (tmp_path / "logs" / "selector.log").write_text("2026-01-01 00:00:00,000 INFO selector: ok\n")
    counters = {"groups_written": 20, "groups_used": 12, "groups_stale": 3, "dead": 1}
    summary = build_summary(
        {"steps": 3, "api_url": None},
        tmp_path,
        total_steps=3,
        mode="d3s run, async",
        preset="d3s",
        counters=counters,
        wall_seconds=75.0,
    )
    assert summary["heldout"]["heldout_accuracy"] == {
        "first": 0.25,
        "first_step": 0,
        "final": 0.5,
        "final_step": 2,
    }
    assert summary["samples"] == {"generated": 96, "kept": 48}
    assert summary["groups"] == {
        "written": 20,
        "used": 12,
        "stale": 3,
        "skipped": 0,
        "zero_var_dropped": 0,
        "dead_lettered": 1,
    }
    assert "plot" in summary["paths"] and "tensorboard" not in summary["paths"]  # only what exists
    path = write_summary(summary, tmp_path)
    assert json.loads(path.read_text())["tokens"]["kept"] == 80

    buf = io.StringIO()
    Console(file=buf, width=120).print(summary_table(summary, "run: done"))
    text = buf.getvalue()
    assert "held-out accuracy       0.500 at step 2 (step 0: 0.250)" in text
    assert "held-out pass/maj@k     pass@1 0.375, pass@4 0.750, maj@4 0.500" in text
    assert "greedy" not in text and "response length" not in text  # those are in summary.json
    assert summary["heldout"]["eval/mean_response_length"]["final"] == 3.0
    assert "tokens kept             80 of ~400 GRPO-equivalent (20%)" in text
    assert "tokens forward          480 (the learner's gradient pass)" in text
    assert "groups                  20 written, 12 used, 0 skipped" in text
    assert "stale / dead-lettered   3 / 1" in text
    assert "1m15s" in text and "summary.json" in text
    assert summary["log_problems"] == {"learner.log": 1}
    assert "(1 warning/error lines in learner.log)" in " ".join(text.split())  # folded or not
    assert len(text.splitlines()) <= 20


def _record(name: str, level: int, msg: str = "m") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_quiet_console_lines_keep_the_run_lines_and_project_warnings() -> None:
    buf = io.StringIO()
    h = ConsoleLines(Console(file=buf, width=200), quiet=True)
    assert h.filter(_record("services.run.orchestrator", logging.INFO))
    assert not h.filter(_record("services.policy.warmstart", logging.INFO))
    assert h.filter(_record("selector.service", logging.WARNING))
    assert not h.filter(_record("ray.serve", logging.WARNING))
    assert not h.filter(_record("py.warnings", logging.WARNING))
    h.handle(_record("services.run.cli", logging.DEBUG, "debug"))  # below the handler's level
    h.handle(_record("learner.service", logging.WARNING, "batch [x] dropped"))
    assert buf.getvalue().strip() == "warning: batch [x] dropped"  # markup in messages stays text
    verbose = ConsoleLines(Console(file=io.StringIO()), quiet=False)
    assert verbose.filter(_record("ray.serve", logging.INFO))


def test_console_lines_print_every_level_as_written() -> None:
    buf = io.StringIO()
    h = ConsoleLines(Console(file=buf, width=200), quiet=True)
    for level in (logging.INFO, logging.WARNING, logging.ERROR):
        h.handle(_record("services.run.orchestrator", level, "pip install 'd3s-rl[gpu]' [/red]"))
    assert buf.getvalue().splitlines() == [
        "pip install 'd3s-rl[gpu]' [/red]",
        "warning: pip install 'd3s-rl[gpu]' [/red]",
        "error: pip install 'd3s-rl[gpu]' [/red]",
    ]


def test_the_summary_and_the_progress_line_show_names_and_paths_as_written(tmp_path) -> None:
    run_dir = tmp_path / "runs" / "[gpu] run"
    (run_dir / "logs").mkdir(parents=True)
    summary = build_summary(
        {"steps": 0},
        run_dir,
        total_steps=1,
        mode="d3s run, async",
        preset="d3s",
        counters={},
        wall_seconds=1.0,
    )
    buf = io.StringIO()
    Console(file=buf, width=200).print(summary_table(summary, "tiny [gpu]: done"))
    text = buf.getvalue()
    assert text.splitlines()[0].strip() == "tiny [gpu]: done"
    assert "[gpu] run" in text and "[gpu] run/logs/" in text
    for terminal in (False, True):  # the final line, and the live bar
        buf = io.StringIO()
        console = Console(file=buf, force_terminal=terminal, width=100)
        bar = StepProgress(2, description="[bold]x[/bold] (async)", console=console)
        bar.update(2, {"reward_mean": 0.5}, None)
        bar.close()
        assert "[bold]x[/bold] (async)" in buf.getvalue(), buf.getvalue()


# A rollout actor's log after its vLLM engine failed to start, as vLLM and the actor write it:
# the engine core (a child process) logs its traceback with a header on every line, then dies
# with the bare traceback; the actor's own exception only says "See root cause above".
VLLM_FAILED_START = """\
2026-01-01 12:00:00,000 INFO services.run.components: rollout-0: loading the engine
(EngineCore_DP0 pid=4242) INFO 01-01 12:00:01 [core.py:93] Initializing a V1 LLM engine
(EngineCore_DP0 pid=4242) ERROR 01-01 12:00:05 [core.py:708] EngineCore failed to start.
(EngineCore_DP0 pid=4242) ERROR 01-01 12:00:05 [core.py:708] Traceback (most recent call last):
(EngineCore_DP0 pid=4242) ERROR 01-01 12:00:05 [core.py:708]   File "core.py", line 699, in run
(EngineCore_DP0 pid=4242) ERROR 01-01 12:00:05 [core.py:708]     raise ValueError(msg)
(EngineCore_DP0 pid=4242) ERROR 01-01 12:00:05 [core.py:708] ValueError: Available memory on \
node 0 (19.1/23.54 GiB) on startup is less than desired CPU memory utilization (0.9, 21.19 GiB).
Process EngineCore_DP0:
Traceback (most recent call last):
  File "/usr/lib/python3.11/multiprocessing/process.py", line 314, in _bootstrap
ValueError: Available memory on node 0 (19.1/23.54 GiB) on startup is less than desired CPU \
memory utilization (0.9, 21.19 GiB).
2026-01-01 12:00:06,000 WARNING services.rollout.vllm_engine: not an error
2026-01-01 12:00:06,500 ERROR services.run.components: rollout-0 failed
Traceback (most recent call last):
  File "components.py", line 150, in build_component

The above exception was the direct cause of the following exception:

RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""
MEMORY = (
    "ValueError: Available memory on node 0 (19.1/23.54 GiB) on startup is less than desired "
    "CPU memory utilization (0.9, 21.19 GiB)."
)


def test_error_lines_find_a_child_processes_root_cause() -> None:
    assert error_lines(VLLM_FAILED_START) == [
        "EngineCore failed to start.",
        MEMORY,
        "rollout-0 failed",
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}",
    ]
    assert error_lines(VLLM_FAILED_START, limit=2)[0] == "rollout-0 failed"  # the last ones
    assert error_lines("x" * 50 + "Error: " + "y" * 500, width=40) == ["x" * 39 + "…"]
    assert error_lines("2026-01-01 12:00:00,000 INFO a: ValueError: fine\nok\n") == []


def test_failure_causes_read_this_sessions_lines_of_the_failed_component(tmp_path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    old = "2026-01-01 11:00:00,000 ERROR services.run.components: an earlier session's error\n"
    (logs / "rollout-0.log").write_text(old)
    (logs / "selector.log").write_text(
        "2026-01-01 12:00:00,000 ERROR selector.service: not the failed one\n"
    )
    marks = log_sizes(logs)
    with (logs / "rollout-0.log").open("a") as fh:
        fh.write(VLLM_FAILED_START)
    exc = ServiceError(
        "rollout-0 failed to start: RuntimeError: Engine core initialization failed. See root "
        "cause above. Failed core proc(s): {}",
        components=("rollout-0",),
    )
    # What the message says already (the actor's own error, "rollout-0 failed") is left out.
    assert failure_causes(exc, logs, marks) == [
        ("rollout-0.log", ["EngineCore failed to start.", MEMORY])
    ]
    assert "an earlier session's error" in failure_causes(exc, logs)[0][1]  # no marks: all
    api = ServiceError(
        "api failed to start: RuntimeError: deploying failed",
        components=("api",),
        detail="deploying failed\nTraceback (most recent call last):\n  File x\n"
        "KeyError: 'D3S_TOKEN'\n",
    )
    assert failure_causes(api, logs, marks) == [
        ("the error's full text", ["KeyError: 'D3S_TOKEN'"])
    ]


def test_quiet_terminal_sends_every_output_to_the_log(tmp_path, capfd) -> None:
    # (pytest's capture bypasses fd 1 for print(); the d3s e2e tests see print() land there too)
    log = tmp_path / "logs" / "driver.log"
    with quiet_terminal(log) as (out, err):
        os.write(1, b"stdout write\n")
        os.write(2, b"c-level write\n")
        subprocess.run(
            [sys.executable, "-c", "import sys; sys.stderr.write('child process\\n')"], check=True
        )
        out.print("table line")
        err.print("progress line")
    print("after")
    captured = capfd.readouterr()
    assert captured.out == "table line\nafter\n"
    assert captured.err == "progress line\n"
    assert log.read_text().splitlines() == ["stdout write", "c-level write", "child process"]


def test_quiet_terminal_restores_the_streams_on_an_error(tmp_path, capfd) -> None:
    with pytest.raises(RuntimeError), quiet_terminal(tmp_path / "driver.log"):
        raise RuntimeError("boom")
    os.write(2, b"back\n")
    assert capfd.readouterr().err == "back\n"


def test_progress_off_a_terminal_is_one_final_line() -> None:
    buf = io.StringIO()
    bar = StepProgress(10, description="run (async)", console=Console(file=buf, width=80))
    for step in range(1, 11):
        bar.update(
            step,
            {
                "reward_mean": 0.5,
                "samples_kept": 8,
                "samples_before": 32,
                "tokens_valid": 100,
                "tokens_kept": 25,
            },
            0.75,
            "v10",
        )
    bar.close()
    (line,) = buf.getvalue().splitlines()
    assert line.startswith(
        "run (async): 10/10 steps | reward 0.50 | acc 0.750 | kept 25% samples, 25% tokens | v10"
    )


def test_logging_section() -> None:
    cfg = parse_config(
        {
            "logging": {"tensorboard": False, "wandb": {"project": "p", "tags": ["a"]}},
            "service": {"redis_url": "redis://u:secret@host:6379/0"},
        }
    )
    kwargs = cfg.logger_kwargs()
    assert kwargs["tensorboard"] is False
    assert kwargs["wandb"] == {"project": "p", "mode": "offline", "tags": ["a"]}
    assert "secret" not in json.dumps(kwargs["config"])  # the config W&B records is redacted
    assert parse_config({}).logger_kwargs()["wandb"] is None
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        parse_config({"logging": {"wandb": {"project": "p", "mode": "cloud"}}})
    with pytest.raises(ConfigError, match="logging.wandb.project"):
        parse_config({"logging": {"wandb": {"mode": "offline"}}})

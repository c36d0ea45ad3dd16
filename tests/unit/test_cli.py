"""The `d3s` command line: every subcommand's help, and clear errors for bad configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from d3s_cli import run_d3s
from typer.testing import CliRunner

from services.rollout.config import vllm_installed
from services.run.cli import app

runner = CliRunner()
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_top_level_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.splitlines()) > 3


def test_validate_prints_the_filled_config(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rollout:\n  prompts_per_step: 8\n")
    result = runner.invoke(app, ["validate", str(cfg), "--set", "train.total_steps=9"])
    assert result.exit_code == 0, result.output
    assert '"prompts_per_step": 8' in result.output and '"total_steps": 9' in result.output


def test_a_bad_config_exits_2_naming_the_field(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rollout:\n  prompt_per_step: 8\n")
    for command in ("validate", "train", "run"):
        result = runner.invoke(app, [command, str(cfg)])
        assert result.exit_code == 2, (command, result.output)
        assert "rollout.prompt_per_step" in result.output


@pytest.mark.skipif(vllm_installed(), reason="the message is about vLLM missing")
def test_config_errors_reach_the_terminal_with_their_brackets(tmp_path) -> None:
    """The install hint names the extra in brackets: read as markup, '[gpu]' vanished and the
    user installed no vLLM. The command runs as a user runs it, on a real terminal's stderr."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rollout:\n  engine: vllm\n  prompts[gpu]/x: 1\n")
    out = run_d3s("validate", str(cfg), timeout=120)
    assert out.returncode == 2, out.stderr
    # Two errors: the unknown field (the user's own bracketed text) ...
    assert "rollout.prompts[gpu]/x: Extra inputs are not permitted" in out.stderr
    cfg.write_text("rollout:\n  engine: vllm\n")
    out = run_d3s("validate", str(cfg), timeout=120)
    assert out.returncode == 2, out.stderr
    # ... and the install hint, each exactly as the config check wrote it.
    assert "(pip install 'd3s-rl[gpu]'; " in out.stderr, out.stderr


def test_a_message_that_looks_like_markup_is_printed_as_written(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text('rollout:\n  "[/red][bold]x[gpu]": 1\n')
    result = runner.invoke(app, ["validate", str(cfg)])
    assert result.exit_code == 2  # a closing tag with no opening one no longer breaks the print
    assert "rollout.[/red][bold]x[gpu]: Extra inputs are not permitted" in result.output


def test_a_missing_config_file_exits_2(tmp_path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output


def test_a_component_without_redis_exits_2(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("D3S_REDIS_URL", raising=False)
    result = runner.invoke(app, ["selector"])
    assert result.exit_code == 2 and "--redis-url" in result.output


def test_the_installed_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.run.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "d3s" in out.stdout.lower()

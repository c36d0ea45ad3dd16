"""The `d3s` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from services.config import ConfigError, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="D3S-RL: RL post-training with Dynamic Dual-Level Down-Sampling.\n\n"
    "Train with [bold]d3s run CONFIG[/bold] (asynchronous service) or [bold]d3s train CONFIG[/bold] "
    "(synchronous, one process). Every command takes a YAML config and [bold]--set key=value[/bold] overrides.",
)
console = Console(stderr=True)

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML run config (defaults apply to missing fields)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a field: --set train.total_steps=50")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)], force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@app.command()
def train(config: ConfigArg = None, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Synchronous training in one process (rollout, selection and learner in lock-step)."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    from services.trainer import SyncTrainer

    summary = SyncTrainer(cfg).run()
    console.print_json(json.dumps(summary))


@app.command()
def warmstart(config: ConfigArg = None, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Supervised warm start of the tiny policy (cached: a second call returns at once)."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    from services.policy.prepare import prepare_policy

    path = prepare_policy(cfg)
    console.print(f"warm-start checkpoint: [bold]{path}[/bold]")


@app.command("validate")
def validate_config(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Check a config and print it with every default filled in."""
    cfg = _load(config, set_)
    sys.stdout.write(cfg.model_dump_json(indent=2) + "\n")


@app.command()
def presets() -> None:
    """List the presets (the paper's ablation ladder) and what each selects."""
    from rich.table import Table

    from selector.presets import PRESETS

    t = Table("preset", "sample level", "token level", "schedule", "rho_s", "K")
    for p in PRESETS.values():
        s = p.schedule
        t.add_row(p.name, p.sample_level + (" (renormalised)" if p.renormalize else ""), p.token_level, s.kind,
                  f"{s.sample_init:g}->{s.sample_final:g}", f"{s.token_init:g}->{s.token_final:g}")
    Console().print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

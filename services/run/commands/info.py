"""`d3s status`, `d3s validate` and `d3s presets`: a run, a config or the presets at a glance."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from services.run.commands.common import ConfigArg, SetOpt, load
from services.run.commands.training import resume_check


def status(
    url: Annotated[str, typer.Option("--url", help="the run's HTTP API")] = "http://127.0.0.1:8000",
) -> None:
    """A running (or finished) run at a glance: progress, schedule, actors, dead letters."""
    from services.api.status import print_status

    raise typer.Exit(print_status(url))


def validate_config(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Check a config and print it with every default filled in; if its run_dir holds a run,
    check the resume as `d3s run` would (exit 2 on a change that is not safe)."""
    cfg = load(config, set_)
    resume_check(cfg)
    sys.stdout.write(cfg.model_dump_json(indent=2) + "\n")


def presets() -> None:
    """List the presets (the paper's ablation ladder) and what each selects."""
    from rich.table import Table

    from selector.presets import PRESETS

    t = Table("preset", "sample level", "token level", "schedule", "rho_s", "K")
    for p in PRESETS.values():
        s = p.schedule
        t.add_row(
            p.name,
            p.sample_level + (" (renormalised)" if p.renormalize else ""),
            p.token_level,
            s.kind,
            f"{s.sample_init:g}->{s.sample_final:g}",
            f"{s.token_init:g}->{s.token_final:g}",
        )
    Console().print(t)

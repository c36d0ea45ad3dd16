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

from services.run.components import NOISY_LOGGERS
from services.run.config import ConfigError, load_config

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
    for noisy in NOISY_LOGGERS:
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
    from services.run.trainer import SyncTrainer

    summary = SyncTrainer(cfg).run()
    console.print_json(json.dumps(summary))


@app.command()
def run(config: ConfigArg = None, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """The asynchronous service on this machine (Redis, Ray, rollouts, selector, learner, API).

    Starts an embedded Redis and a local Ray unless service.redis_url / service.ray_address say
    otherwise, shows a progress bar, and stops everything at the end or on Ctrl-C."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    from services.run.orchestrator import ServiceError, run_service

    try:
        summary = run_service(cfg)
    except ServiceError as e:
        console.print(f"[red]run failed: {e}[/red]")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: everything was stopped; `d3s run` again resumes[/yellow]")
        raise typer.Exit(130) from None
    console.print_json(json.dumps(summary, default=str))


RedisOpt = Annotated[str | None, typer.Option("--redis-url", help="Redis of the run (default: service.redis_url, "
                                                                   "then $D3S_REDIS_URL)")]
RayOpt = Annotated[str | None, typer.Option("--ray-address", help="Ray cluster holding the weight store (default: "
                                                                  "service.ray_address, then 'auto')")]


def _component(kind: str, config: Path | None, set_: list[str] | None, redis_url: str | None,
               ray_address: str | None, index: int, verbose: bool) -> None:
    """Run one component of a run in this process, against an existing Redis (and Ray)."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    from services.run.components import run_component
    from services.transport.redis_server import resolve_url

    url = resolve_url(redis_url, cfg.service.redis_url)
    if not url:
        console.print("[red]--redis-url (or service.redis_url, or $D3S_REDIS_URL) is required: a "
                      "component joins the Redis of a run[/red]")
        raise typer.Exit(2)
    policy_path = None
    if kind != "selector":
        import ray

        from services.run.prepare import prepare_policy
        from services.weightsync.object_store import RAY_NAMESPACE

        policy_path = str(prepare_policy(cfg))
        ray.init(address=ray_address or cfg.service.ray_address or "auto", namespace=RAY_NAMESPACE,
                 include_dashboard=False, logging_level=logging.WARNING)
    summary = run_component(kind, cfg, url, index=index, policy_path=policy_path,
                            detached_store=kind == "learner")
    console.print_json(json.dumps(summary, default=str))


@app.command()
def rollout(config: ConfigArg = None, set_: SetOpt = None, redis_url: RedisOpt = None, ray_address: RayOpt = None,
            index: Annotated[int, typer.Option("--index", help="actor index, 0..rollout.num_actors-1")] = 0,
            verbose: VerboseOpt = False) -> None:
    """One rollout actor: generates scored groups into the run's groups stream."""
    _component("rollout", config, set_, redis_url, ray_address, index, verbose)


@app.command()
def selector(config: ConfigArg = None, set_: SetOpt = None, redis_url: RedisOpt = None,
             index: Annotated[int, typer.Option("--index", help="consumer index (a standby takes over "
                                                                "a dead one's pending groups)")] = 0,
             verbose: VerboseOpt = False) -> None:
    """The selector: scored groups in, one curated batch per learner step out (needs only Redis)."""
    _component("selector", config, set_, redis_url, None, index, verbose)


@app.command()
def learner(config: ConfigArg = None, set_: SetOpt = None, redis_url: RedisOpt = None, ray_address: RayOpt = None,
            verbose: VerboseOpt = False) -> None:
    """The learner (learner.world_size ranks, rank 0 here): trains each curated batch, publishes weights."""
    _component("learner", config, set_, redis_url, ray_address, 0, verbose)


@app.command()
def api(config: ConfigArg = None, set_: SetOpt = None, redis_url: RedisOpt = None,
        host: Annotated[str | None, typer.Option(help="bind address (default api.host)")] = None,
        port: Annotated[int | None, typer.Option(help="port (default api.port)")] = None,
        verbose: VerboseOpt = False) -> None:
    """The HTTP API under uvicorn, without Ray (docker-compose): reads the run's Redis."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    from services.transport.redis_server import resolve_url

    url = resolve_url(redis_url, cfg.service.redis_url)
    if not url:
        console.print("[red]--redis-url (or service.redis_url, or $D3S_REDIS_URL) is required[/red]")
        raise typer.Exit(2)
    from services.api.serve import run_standalone

    run_standalone(url, cfg.service.namespace, host or cfg.api.host, port if port is not None else cfg.api.port,
                   cfg.control_token())


@app.command()
def warmstart(config: ConfigArg = None, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Supervised warm start of the tiny policy (cached: a second call returns at once)."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    from services.run.prepare import prepare_policy

    path = prepare_policy(cfg)
    console.print(f"warm-start checkpoint: [bold]{path}[/bold]")


@app.command()
def status(url: Annotated[str, typer.Option("--url", help="the run's HTTP API")] = "http://127.0.0.1:8000") -> None:
    """A running (or finished) run at a glance: progress, schedule, actors, dead letters."""
    from services.api.status import print_status

    raise typer.Exit(print_status(url))


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

"""`d3s rollout|selector|learner|api`: one part of a run in this process, against the run's
Redis (and Ray)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from services.run.commands.common import (
    ConfigArg,
    RayOpt,
    RedisOpt,
    SetOpt,
    VerboseOpt,
    console,
    error,
    load,
    setup_logging,
)


def _component(
    kind: str,
    config: Path | None,
    set_: list[str] | None,
    redis_url: str | None,
    ray_address: str | None,
    index: int,
    verbose: bool,
) -> None:
    """Run one component of a run in this process, against an existing Redis (and Ray)."""
    cfg = load(config, set_)
    from services.run.components import component_name, run_component

    # Beside the other components' logs, wherever each runs (run_dir may be shared storage).
    log_file = Path(cfg.train.run_dir) / "logs" / f"{component_name(kind, index)}.log"
    setup_logging(verbose, log_file=log_file)
    from services.transport.redis_server import resolve_url

    url = resolve_url(redis_url, cfg.service.redis_url)
    if not url:
        error(
            "--redis-url (or service.redis_url, or $D3S_REDIS_URL) is required: a "
            "component joins the Redis of a run"
        )
        raise typer.Exit(2)
    policy_path = None
    if kind != "selector":
        import ray

        from services.run.prepare import prepare_policy
        from services.weightsync.ray_store import RAY_NAMESPACE

        policy_path = str(prepare_policy(cfg))
        ray.init(
            address=ray_address or cfg.service.ray_address or "auto",
            namespace=RAY_NAMESPACE,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    summary = run_component(
        kind, cfg, url, index=index, policy_path=policy_path, detached_store=kind == "learner"
    )
    console.print_json(json.dumps(summary, default=str))


def rollout(
    config: ConfigArg = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
    ray_address: RayOpt = None,
    index: Annotated[int, typer.Option("--index", help="actor index, 0..rollout.num_actors-1")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """One rollout actor: generates scored groups into the run's groups stream."""
    _component("rollout", config, set_, redis_url, ray_address, index, verbose)


def selector(
    config: ConfigArg = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
    index: Annotated[
        int,
        typer.Option(
            "--index", help="consumer index (a standby takes over a dead one's pending groups)"
        ),
    ] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """The selector: scored groups in, one curated batch per learner step out (needs only Redis)."""
    _component("selector", config, set_, redis_url, None, index, verbose)


def learner(
    config: ConfigArg = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
    ray_address: RayOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """The learner (learner.world_size ranks, rank 0 here): trains each curated batch, publishes weights."""
    _component("learner", config, set_, redis_url, ray_address, 0, verbose)


def api(
    config: ConfigArg = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
    host: Annotated[str | None, typer.Option(help="bind address (default api.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default api.port)")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """The HTTP API under uvicorn, without Ray (docker-compose): reads the run's Redis."""
    cfg = load(config, set_)
    setup_logging(verbose, log_file=Path(cfg.train.run_dir) / "logs" / "api.log")
    from services.transport.redis_server import resolve_url

    url = resolve_url(redis_url, cfg.service.redis_url)
    if not url:
        error("--redis-url (or service.redis_url, or $D3S_REDIS_URL) is required")
        raise typer.Exit(2)
    from services.api.serve import run_standalone

    run_standalone(
        url,
        cfg.service.namespace,
        host or cfg.api.host,
        port if port is not None else cfg.api.port,
        cfg.control_token(),
    )

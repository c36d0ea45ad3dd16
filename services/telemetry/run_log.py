"""Per-step metrics to metrics.jsonl, TensorBoard and (optionally) Weights & Biases, and
learning-curve plots."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_WANDB_MODES = ("online", "offline", "disabled")
# Keys of the ``wandb`` argument beyond project/mode that are handed to ``wandb.init`` as given.
_WANDB_PASSTHROUGH = ("name", "entity", "group", "tags", "notes")


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a step row (bools, NaN, infinities and non-numbers left out): what
    every metric logger receives, so TensorBoard and W&B plot the same series."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _check_wandb(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` validated into ``wandb.init`` keyword arguments; errors name the field."""
    unknown = sorted(set(spec) - {"project", "mode", *_WANDB_PASSTHROUGH})
    if unknown:
        raise ValueError(f"logging.wandb: unknown field(s) {unknown}")
    project = spec.get("project")
    if not isinstance(project, str) or not project:
        raise ValueError(f"logging.wandb.project: need a non-empty project name, got {project!r}")
    mode = spec.get("mode", "offline")
    if mode not in _WANDB_MODES:
        raise ValueError(f"logging.wandb.mode: {mode!r} is not one of {list(_WANDB_MODES)}")
    extra = {k: spec[k] for k in _WANDB_PASSTHROUGH if spec.get(k) is not None}
    return {"project": project, "mode": mode, **extra}


class RunLogger:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl`` and mirrors its numbers to
    TensorBoard and, when ``wandb`` is given, to a Weights & Biases run.

    Args:
        run_dir: where ``metrics.jsonl``, ``tensorboard/`` and ``wandb/`` go.
        tensorboard: mirror to TensorBoard (off with a warning if it cannot start).
        wandb: ``{"project": ..., "mode": "offline" | "online" | "disabled"}`` (mode defaults to
            offline, which needs no network: ``wandb sync run_dir/wandb/offline-run-*`` uploads
            later), optionally ``name``, ``entity``, ``group``, ``tags``, ``notes``; None: no W&B.
            A bad spec raises ValueError naming the field; a missing ``wandb`` package too.
        config: the run's (redacted) config, recorded with the W&B run.
    """

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        wandb: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        wandb_kwargs = _check_wandb(wandb) if wandb is not None else None
        self._fh = self.path.open("a")
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception as e:  # TensorBoard is optional at run time: log why it is off
                log.warning("TensorBoard disabled: %s", e)
        if wandb_kwargs is not None:
            self._wandb = self._start_wandb(wandb_kwargs, config)

    def _start_wandb(self, kwargs: dict[str, Any], config: Mapping[str, Any] | None) -> Any:
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "logging.wandb is set but the wandb package is not installed (pip install wandb)"
            ) from None
        # Quiet: no console capture, no banner, no system-metrics sampler competing for CPUs.
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        run = wandb.init(
            dir=str(self.run_dir),
            config=dict(config) if config is not None else None,
            settings=settings,
            reinit="create_new",
            **kwargs,
        )
        # Evaluations can finish steps after the weights they measured (a background
        # evaluator): they are drawn against the step they evaluated, carried as eval_step.
        run.define_metric("eval_step")
        for name in ("heldout_accuracy", "eval/*", "eval_seconds"):
            run.define_metric(name, step_metric="eval_step")
        log.info("W&B run %s (%s) in %s", run.id, kwargs["mode"], self.run_dir / "wandb")
        return run

    def log(self, step: int, values: dict[str, Any]) -> None:
        numbers = self._write(step, {}, values)
        if self._wandb is not None:
            # W&B drops a step not above the last one (a resumed run replaying steps) with a
            # warning; the JSONL and TensorBoard keep every row.
            self._wandb.log(numbers, step=step)

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        """The evaluation of ``step``'s weights, finished after later steps were logged: a row
        marked ``"row": "eval"`` that :func:`read_metrics` merges into the step's row;
        TensorBoard takes it at ``step``; W&B (whose steps only rise) at its ``eval_step``."""
        numbers = self._write(step, {"row": "eval"}, values)
        if self._wandb is not None:
            self._wandb.log({**numbers, "eval_step": step})

    def _write(self, step: int, marks: dict[str, str], values: dict[str, Any]) -> dict[str, float]:
        """One JSONL row (``marks`` after the step) and its scalars to TensorBoard at ``step``;
        returns the scalars."""
        row = {"step": step, **marks, **{k: v for k, v in values.items() if v is not None}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        numbers = scalars(values)
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        return numbers

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl, one per step: an evaluation row (``"row": "eval"``, written when
    a background evaluation finished) is merged into its step's row; a step row written again
    (a resumed run retraining it) replaces the earlier one."""
    rows: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            step = int(r["step"])
            if r.pop("row", None) == "eval":
                rows[step] = {**rows.get(step, {"step": step}), **r}
            else:
                rows[step] = r
    return [rows[k] for k in sorted(rows)]


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep only the rows of steps <= ``last_step`` (a resumed run rewrites the rest); returns
    how many rows were dropped. The file is replaced atomically."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a row cut short by a kill: the step it belonged to is rewritten
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)
    return dropped


def plot_run(metrics_path: Path, out_png: Path, title: str = "") -> Path:
    """Held-out accuracy and reward against step and against learner tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    ev = [r for r in rows if "heldout_accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(
        [r["step"] for r in ev],
        [r["heldout_accuracy"] for r in ev],
        marker="o",
        label="held-out accuracy",
    )
    axes[0].plot(
        [r["step"] for r in rows if "reward_mean" in r],
        [r["reward_mean"] for r in rows if "reward_mean" in r],
        alpha=0.5,
        label="train reward",
    )
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot(
        [r.get("learner_tokens_total", 0) for r in ev],
        [r["heldout_accuracy"] for r in ev],
        marker="o",
    )
    axes[1].set_xlabel("learner tokens (kept, cumulative)")
    axes[1].set_ylabel("held-out accuracy")
    axes[2].plot(
        [r["step"] for r in rows if "sample_ratio" in r],
        [r["sample_ratio"] for r in rows if "sample_ratio" in r],
        label="sample ratio",
    )
    axes[2].plot(
        [r["step"] for r in rows if "token_ratio" in r],
        [r["token_ratio"] for r in rows if "token_ratio" in r],
        label="token ratio",
    )
    axes[2].set_xlabel("step")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title or str(Path(metrics_path).parent.name))
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png

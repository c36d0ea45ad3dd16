"""Figures that overlay runs (``d3s report``): held-out metrics, schedule, selection, Var(A), gradient.

Each run is read from its ``metrics.jsonl`` (the rows every run writes, see
:class:`services.telemetry.reporter.RunReporter`). Figures are PNG files, one per topic; a
metric a run did not log is left out of its panel rather than drawn as zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.telemetry.run_log import read_metrics

X_AXES = (
    ("step", "step"),
    ("learner_tokens_total", "learner tokens"),
    ("learner_seconds_total", "learner seconds"),
)
FIGURES = ("heldout.png", "schedule.png", "kept.png", "var_adv.png", "grad_norm.png")


class RunSeries:
    """One run's rows: evaluation rows (with ``heldout_accuracy``) and trained-step rows."""

    def __init__(self, run_dir: str | Path, label: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{self.run_dir}: no metrics.jsonl (not a run directory?)")
        self.rows = read_metrics(path)
        self.label = label or self.run_dir.name
        self.evals = [r for r in self.rows if "heldout_accuracy" in r]
        self.steps = [r for r in self.rows if r.get("step", 0) > 0]

    def series(
        self, key: str, x: str = "step", evals: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` over the rows that have both keys as finite numbers."""
        rows = self.evals if evals else self.steps
        pts = [(r[x], r[key]) for r in rows if _finite(r.get(x)) and _finite(r.get(key))]
        if not pts:
            return np.zeros(0), np.zeros(0)
        xs, ys = zip(*pts, strict=True)
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    def eval_keys(self) -> list[str]:
        """Held-out metrics the run logged (overall, not per difficulty), in a stable order."""
        keys = {k for r in self.evals for k in r if k.startswith("eval/") and "/d" not in k[5:]}
        order = ["heldout_accuracy", *sorted(k for k in keys if "pass@" in k)]
        order += sorted(k for k in keys if "maj@" in k)
        order += [k for k in ("eval/mean_response_length",) if k in keys]
        return order


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and bool(np.isfinite(v))


def unique_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run's directory name, with its parent prepended where names collide."""
    paths = [Path(p).resolve() for p in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def plot_heldout(runs: Sequence[RunSeries], path: Path) -> Path:
    """One row per held-out metric, against step, learner tokens and learner seconds."""
    plt = _plt()
    keys = list(dict.fromkeys(k for r in runs for k in r.eval_keys()))
    fig, axes = plt.subplots(len(keys), 3, figsize=(16, 3.4 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys, strict=True):
        for ax, (x, xlabel) in zip(row, X_AXES, strict=True):
            for run in runs:
                xs, ys = run.series(key, x, evals=True)
                if xs.size:
                    ax.plot(xs, ys, marker=".", label=run.label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(key.removeprefix("eval/"))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("held-out evaluation")
    return _save(fig, path)


def _per_step(
    runs: Sequence[RunSeries],
    panels: list[tuple[str, list[tuple[str, str]]]],
    path: Path,
    title: str,
) -> Path:
    """Panels of per-step series: (y label, [(key, line style)])."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels, strict=True):
        for i, run in enumerate(runs):
            for key, style in lines:
                xs, ys = run.series(key)
                if xs.size:
                    ax.plot(
                        xs,
                        ys,
                        style,
                        color=f"C{i % 10}",
                        linewidth=1.2,
                        label=f"{run.label} {key}" if len(lines) > 1 else run.label,
                    )
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def _kept_fractions(runs: Sequence[RunSeries]) -> None:
    # Derived per step so that runs of every preset show on the same scale.
    for run in runs:
        for r in run.steps:
            if (
                _finite(r.get("samples_before"))
                and r["samples_before"] > 0
                and _finite(r.get("samples_kept"))
            ):
                r["kept_sample_fraction"] = r["samples_kept"] / r["samples_before"]
            if (
                _finite(r.get("tokens_valid"))
                and r["tokens_valid"] > 0
                and _finite(r.get("tokens_kept"))
            ):
                r["kept_token_fraction"] = r["tokens_kept"] / r["tokens_valid"]


def plot_grad_norm(runs: Sequence[RunSeries], path: Path) -> Path:
    """The gradient norm before clipping against step, and against Var(A) of the kept samples."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, run in enumerate(runs):
        xs, ys = run.series("grad_norm")
        axes[0].plot(xs, ys, color=f"C{i % 10}", linewidth=1.2, label=run.label)
        v, g = run.series("grad_norm", x="var_adv_after")
        axes[1].scatter(v, g, s=10, alpha=0.6, color=f"C{i % 10}", label=run.label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("Var(A) of the kept samples")
    for ax in axes:
        ax.set_ylabel("gradient norm (before clipping)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("policy-gradient norm")
    return _save(fig, path)


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None
) -> list[Path]:
    """Write the figures overlaying ``run_dirs`` into ``out_dir``; returns their paths.

    Raises:
        FileNotFoundError: a directory without ``metrics.jsonl``.
        ValueError: no run given, or labels of the wrong length.
    """
    if not run_dirs:
        raise ValueError("run_dirs: give at least one run directory")
    labels = list(labels) if labels is not None else unique_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"labels: {len(labels)} given for {len(run_dirs)} runs")
    runs = [RunSeries(d, lab) for d, lab in zip(run_dirs, labels, strict=True)]
    _kept_fractions(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_heldout(runs, out / "heldout.png"),
        _per_step(
            runs,
            [
                ("sample keep ratio rho_s", [("sample_ratio", "-")]),
                ("token keep ratio K", [("token_ratio", "-")]),
            ],
            out / "schedule.png",
            "the schedule's keep ratios",
        ),
        _per_step(
            runs,
            [
                ("kept fraction of samples", [("kept_sample_fraction", "-")]),
                ("kept fraction of response tokens", [("kept_token_fraction", "-")]),
            ],
            out / "kept.png",
            "what selection kept",
        ),
        _per_step(
            runs,
            [
                ("Var(A)", [("var_adv_before", "--"), ("var_adv_after", "-")]),
                ("||A|| of the kept samples", [("adv_norm_kept", "-")]),
            ],
            out / "var_adv.png",
            "advantage variance before (dashed) and after (solid) selection",
        ),
        plot_grad_norm(runs, out / "grad_norm.png"),
    ]

"""The end of a run: a short table on the terminal, the whole record in ``run_dir/summary.json``.

Both entry points (``d3s run`` and ``d3s train``) end here. The table is built from the run's
result and its ``metrics.jsonl`` rows, so the two report the same quantities the same way.

Token accounting (every count is summed over the run's trained steps):

* **kept** — response tokens that carried a gradient after both levels of D3S
  (``learner_tokens_total``, the sum of each step's ``tokens_kept``);
* **forward** — tokens the learner's gradient pass ran through the model, prompts and padding
  up to each row's last kept token included (``learner_forward_tokens_total``);
* **GRPO-equivalent** — the response tokens a GRPO step would have trained on the same rollouts:
  every response token of every sample generated for the step. A step's row counts the
  response tokens of the samples it kept (``tokens_valid``) and how many samples were generated
  and kept (``samples_before``, ``samples_kept``), so the GRPO count is estimated per step as
  ``tokens_valid * samples_before / samples_kept`` (the kept samples' mean response length
  times every sample). With no sample-level selection it is exact.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.telemetry.run_log import read_metrics

__all__ = [
    "SUMMARY_FILE",
    "build_summary",
    "log_problems",
    "print_summary",
    "summary_table",
    "token_totals",
    "write_summary",
]

SUMMARY_FILE = "summary.json"
# Metric rows' held-out fields: the learner's evaluator writes ``heldout_*``, the evaluation
# suite ``eval/*``.
_HELDOUT_PREFIXES = ("heldout_", "eval/")


TOKEN_DEFINITIONS = {
    "kept": "response tokens that carried a gradient after sample- and token-level D3S "
    "(sum of tokens_kept = learner_tokens_total)",
    "forward": "tokens the learner's gradient pass ran through the model, prompts and padding "
    "included (sum of tokens_forward = learner_forward_tokens_total)",
    "grpo_equivalent": "response tokens a GRPO step would train on the same rollouts (every "
    "sample): per step tokens_valid * samples_before / samples_kept",
}


def token_totals(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Kept, forward and GRPO-equivalent token counts of a run's metric rows (see the module
    docstring); ``kept_fraction`` is kept / GRPO-equivalent (NaN when nothing was trained)."""
    kept = forward = grpo = 0.0
    for row in rows:
        valid, before, after = (
            row.get("tokens_valid"),
            row.get("samples_before"),
            row.get("samples_kept"),
        )
        if valid is None:
            continue  # not a trained step (step 0, a skipped batch)
        kept += float(row.get("tokens_kept", 0.0))
        forward += float(row.get("tokens_forward", 0.0))
        grpo += float(valid) * (float(before) / float(after) if before and after else 1.0)
    return {
        "kept": kept,
        "forward": forward,
        "grpo_equivalent": grpo,
        "kept_fraction": kept / grpo if grpo > 0 else math.nan,
    }


def _heldout(rows: list[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Each held-out metric's first and last evaluated value, with their steps."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(_HELDOUT_PREFIXES) and isinstance(value, (int, float)):
                entry = out.setdefault(key, {"first": float(value), "first_step": row["step"]})
                entry["final"], entry["final_step"] = float(value), row["step"]
    return out


def build_summary(
    result: Mapping[str, Any],
    run_dir: Path,
    *,
    total_steps: int,
    mode: str,
    preset: str,
    counters: Mapping[str, int] | None = None,
    wall_seconds: float | None = None,
) -> dict[str, Any]:
    """The run's summary: ``result`` (what ``run_service`` or ``SyncTrainer.run`` returned)
    under ``result``, with the numbers the table shows computed from ``run_dir``'s metric rows.

    ``counters``: the service's Redis counters (groups written/used/stale, dead letters); None
    for the synchronous trainer, which drops nothing. ``wall_seconds``: the whole command's time
    (default: the result's ``wall_seconds``).
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics) if metrics.exists() else []
    trained = [r for r in rows if r.get("tokens_valid") is not None]
    # Generated counts every step's rollouts (a skipped batch's too); kept, what was trained.
    generated = sum(float(r.get("samples_before", 0.0)) for r in rows)
    kept = sum(float(r.get("samples_kept", 0.0)) for r in trained)
    counters = dict(counters) if counters is not None else None
    paths = {
        "run_dir": run_dir,
        "metrics": metrics,
        "tensorboard": run_dir / "tensorboard",
        "wandb": run_dir / "wandb",
        "plot": run_dir / "learning_curve.png",
        "logs": run_dir / "logs",
        "checkpoints": run_dir / "checkpoints",
        "final_policy": run_dir / "final_policy",
        "summary": run_dir / SUMMARY_FILE,
    }
    return {
        "mode": mode,
        "preset": preset,
        # The table reads "done / total": never more done than the run's total.
        "steps": min(int(result.get("steps") or 0), total_steps),
        "total_steps": total_steps,
        "wall_seconds": float(
            wall_seconds if wall_seconds is not None else result.get("wall_seconds") or 0.0
        ),
        "heldout": _heldout(rows),
        "last_reward_mean": trained[-1].get("reward_mean") if trained else None,
        "tokens": token_totals(rows),
        "tokens_defined": TOKEN_DEFINITIONS,
        "samples": {"generated": generated, "kept": kept},
        "groups": None
        if counters is None
        else {
            "written": counters.get("groups_written", 0),
            "used": counters.get("groups_used", 0),
            "stale": counters.get("groups_stale", 0),
            "skipped": counters.get("groups_skipped", 0),
            "zero_var_dropped": counters.get("groups_filtered", 0),
            "dead_lettered": counters.get("dead", 0),
        },
        "api_url": result.get("api_url"),
        "log_problems": log_problems(run_dir / "logs"),
        "paths": {k: str(v) for k, v in paths.items() if k in ("run_dir", "summary") or v.exists()},
        "result": dict(result),
    }


# A record line as the run's log files write it: "2026-01-01 12:00:00,000 WARNING name: ...".
_LOG_PROBLEM = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ")


def log_problems(log_dir: Path) -> dict[str, int]:
    """Warnings and errors recorded in each ``*.log`` of ``log_dir`` (files with none left out):
    in a quiet run they reached no terminal, so the summary points at them."""
    counts: dict[str, int] = {}
    if not Path(log_dir).is_dir():
        return counts
    for path in sorted(Path(log_dir).glob("*.log")):
        with path.open(errors="replace") as fh:
            n = sum(1 for line in fh if _LOG_PROBLEM.match(line))
        if n:
            counts[path.name] = n
    return counts


def write_summary(summary: Mapping[str, Any], run_dir: Path) -> Path:
    """Write ``summary`` as ``run_dir/summary.json`` (non-JSON values as strings); returns the
    path."""
    path = Path(run_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str, allow_nan=True) + "\n")
    tmp.replace(path)
    return path


def _count(x: float) -> str:
    return f"{x:,.0f}"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _rel(path: str) -> str:
    """A path relative to the working directory when under it (shorter to read and copy)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


# The held-out accuracy a run reports first; the evaluation suite's greedy accuracy is the same
# number when the learner's evaluator writes both.
_ACCURACY_KEYS = ("heldout_accuracy", "eval/greedy_accuracy")
_SAMPLED = re.compile(r"^eval/(pass|maj)@\d+$")


def _heldout_rows(heldout: Mapping[str, Mapping[str, float]]) -> list[tuple[str, str]]:
    """At most two rows: the accuracy from its first to its final evaluation, and the final
    pass@k / maj@k on one line (every other held-out metric is in summary.json)."""
    rows = []
    key = next((k for k in _ACCURACY_KEYS if k in heldout), None)
    if key is not None:
        h = heldout[key]
        rows.append(
            (
                "held-out accuracy",
                f"{h['final']:.3f} at step {h['final_step']:.0f} "
                f"(step {h['first_step']:.0f}: {h['first']:.3f})",
            )
        )
    sampled = [
        f"{k.removeprefix('eval/')} {h['final']:.3f}"
        for k, h in heldout.items()
        if _SAMPLED.match(k)
    ]
    if sampled:
        rows.append(("held-out pass/maj@k", ", ".join(sampled)))
    return rows


class _PlainTable(Table):
    """A table whose cells are shown as written: the run's name, paths and presets are the
    user's text, and a ``[...]`` in them is not markup."""

    def add_row(self, *cells: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def summary_table(summary: Mapping[str, Any], title: str) -> Table:
    """The rows a user reads at the end of a run."""
    t = _PlainTable(
        title=Text(title),
        title_justify="left",
        show_header=False,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row(
        "steps",
        f"{summary['steps']} / {summary['total_steps']} ({summary['mode']}; preset {summary['preset']})",
    )
    for label, value in _heldout_rows(summary["heldout"]):
        t.add_row(label, value)
    if summary.get("last_reward_mean") is not None:
        t.add_row("reward (last step)", f"{summary['last_reward_mean']:.3f}")
    tok = summary["tokens"]
    if tok["grpo_equivalent"] > 0:
        t.add_row(
            "tokens kept",
            f"{_count(tok['kept'])} of ~{_count(tok['grpo_equivalent'])} "
            f"GRPO-equivalent ({tok['kept_fraction']:.0%})",
        )
        t.add_row("tokens forward", f"{_count(tok['forward'])} (the learner's gradient pass)")
    s = summary["samples"]
    if s["generated"]:
        t.add_row("samples", f"{_count(s['kept'])} kept of {_count(s['generated'])} generated")
    g = summary.get("groups")
    if g is not None:
        t.add_row(
            "groups",
            f"{_count(g['written'])} written, {_count(g['used'])} used, "
            f"{_count(g['skipped'])} skipped",
        )
        t.add_row("stale / dead-lettered", f"{_count(g['stale'])} / {_count(g['dead_lettered'])}")
    else:
        t.add_row("stale / dead-lettered", "0 / 0 (lock-step: nothing is queued)")
    t.add_row("wall time", _duration(summary["wall_seconds"]))
    paths = summary["paths"]
    t.add_row("run dir", _rel(paths["run_dir"]))
    metrics = [paths[k] for k in ("metrics", "tensorboard", "wandb") if k in paths]
    if metrics:
        t.add_row("metrics", ", ".join(Path(p).name for p in metrics))
    if "plot" in paths:
        t.add_row("plot", _rel(paths["plot"]))
    if "logs" in paths:
        problems = summary.get("log_problems") or {}
        note = ", ".join(f"{n} warning/error lines in {name}" for name, n in problems.items())
        t.add_row("logs", _rel(paths["logs"]) + "/" + (f" ({note})" if note else ""))
    t.add_row("summary", _rel(paths["summary"]))
    return t


def print_summary(summary: Mapping[str, Any], console: Console, title: str) -> None:
    console.print(summary_table(summary, title))

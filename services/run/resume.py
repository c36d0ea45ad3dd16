"""Resuming a run directory: is the config given now the run's config?

``d3s run``, ``d3s train`` and ``d3s validate`` ask :func:`check_resume` before anything starts.
A run directory that holds a run (a checkpoint or metric rows) continues that run, so the new
config is compared, field by field, with the one stored there (``run_config.json``):

* fields in :data:`SAFE_ON_RESUME` change how the run is run or recorded, not what it trains
  (its length, logging, the API, evaluation and checkpoint cadence, infrastructure timeouts);
  they may differ, and are listed in one line;
* any other difference (preset, loss, model, task, batch shape, seed, ...) would silently mix
  two experiments in one directory: it is refused, each field named with both values;
* ``train.total_steps`` may change but not below the steps the directory already holds.

The functions here are pure over the two config mappings except :func:`inspect_run_dir`,
:func:`write_stored_config` and :func:`move_aside`, which touch the directory.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SAFE_ON_RESUME",
    "STORED_CONFIG",
    "Difference",
    "ResumeCheck",
    "RunDirState",
    "check_resume",
    "diff_configs",
    "inspect_run_dir",
    "is_safe",
    "move_aside",
    "write_stored_config",
]

# Not ``config.json``: that name marks a Hugging Face model directory (``d3s eval`` tells the
# two kinds of target apart by it).
STORED_CONFIG = "run_config.json"

# Dotted paths (a section name covers all its fields) that may differ when a run is resumed.
# Each changes how the run is driven, logged or served, never what a step computes; anything
# not listed is refused, so a field added later is safe until someone argues it onto this list.
SAFE_ON_RESUME: tuple[str, ...] = (
    "train.total_steps",  # checked separately against the steps already done
    "train.eval_every",
    "train.checkpoint_every",
    "train.progress_bar",
    "train.run_dir",  # the directory was found by it; absolute vs relative spelling may differ
    "train.resume",
    "logging",
    "api",
    # How held-out evaluation is scheduled and placed, not what it measures (n_samples, ks,
    # temperature and seed would change the curve mid-run).
    "eval.batch_size",
    "eval.background",
    "eval.num_gpus",
    "eval.max_pending",
    # Where the infrastructure is and how long it is waited for.
    "service.redis_url",
    "service.ray_address",
    "service.wait_timeout_s",
    "service.max_restarts",
    "service.restart_backoff_s",
    "service.redis_outage_s",
    "service.redis_maxmemory_mb",
    "learner.dist_timeout_s",
    # How the same weights reach the engines (a resumed learner republishes its checkpoint's).
    "weight_sync",
    # Only where the cached warm start lives; the resumed run starts from its checkpoint.
    "warmstart.cache_dir",
)

_MISSING = "(unset)"
_TAG = re.compile(r"^step(\d+)$")


@dataclass(frozen=True)
class Difference:
    """One field whose stored value differs from the value given now."""

    path: str
    """Dotted path of the field, e.g. ``train.seed``."""
    stored: Any
    """The value in the run directory's config (``"(unset)"`` when it has no such field)."""
    given: Any
    """The value of the config given now (``"(unset)"`` likewise)."""
    reason: str = ""
    """Why it is refused, when the values alone do not say (e.g. a total below the steps done)."""

    def describe(self) -> str:
        text = f"{self.path}: {_show(self.stored)} (stored) -> {_show(self.given)} (given)"
        return f"{text}; {self.reason}" if self.reason else text

    def short(self) -> str:
        return f"{self.path} {_show(self.stored)} -> {_show(self.given)}"


@dataclass(frozen=True)
class RunDirState:
    """What a run directory holds, as far as resuming is concerned."""

    holds_run: bool
    """A checkpoint or metric rows: starting here would continue (and append to) that run."""
    steps_done: int
    """The furthest step recorded: the newest checkpoint or the last metric row."""
    stored: dict[str, Any] | None
    """The stored config; None when the run was recorded without one (an older d3s)."""


@dataclass
class ResumeCheck:
    """The outcome of comparing a run directory's config with the config given now."""

    run_dir: Path
    state: RunDirState
    allowed: list[Difference] = field(default_factory=list)
    refused: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused

    def summary_line(self) -> str | None:
        """One line for a resume that may go ahead; None for a directory with no run in it."""
        if not self.state.holds_run:
            return None
        line = f"resuming the run in {self.run_dir} ({self.state.steps_done} steps done)"
        if self.state.stored is None:
            line += "; it has no stored config (an older d3s), so only its length was checked"
        if self.allowed:
            line += "; changed: " + ", ".join(d.short() for d in self.allowed)
        return line

    def refusal(self) -> str:
        """The message of a refused resume: every differing field and how to start afresh."""
        lines = [
            f"{self.run_dir} already holds a run ({self.state.steps_done} steps done) and its "
            "config differs from the one given:"
        ]
        lines += [f"  {d.describe()}" for d in self.refused]
        if self.allowed:
            lines.append("  (allowed on resume: " + ", ".join(d.path for d in self.allowed) + ")")
        lines.append(
            "To start a new run instead: give it its own directory (--set train.run_dir=DIR, "
            "or another name), or pass --fresh to move this one aside "
            f"({self.run_dir.name}.old-<time>, nothing is deleted)."
        )
        return "\n".join(lines)


def _show(value: Any) -> str:
    return value if value == _MISSING else json.dumps(value)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted path; lists and scalars are leaves, mappings are descended."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def diff_configs(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[Difference]:
    """Every leaf field whose value differs between two config mappings (as JSON-ready data),
    in dotted-path order; a field present on one side only differs from ``"(unset)"``."""
    a, b = _flatten(stored), _flatten(given)
    return [
        Difference(path, a.get(path, _MISSING), b.get(path, _MISSING))
        for path in sorted(a.keys() | b.keys())
        if a.get(path, _MISSING) != b.get(path, _MISSING)
    ]


def is_safe(path: str, allow: tuple[str, ...] = SAFE_ON_RESUME) -> bool:
    """Whether the field at dotted ``path`` may change on resume (``allow`` holds fields and
    whole sections)."""
    return any(path == p or path.startswith(p + ".") for p in allow)


def check_resume(
    run_dir: Path, state: RunDirState, given: Mapping[str, Any], total_steps: int
) -> ResumeCheck:
    """Compare the config ``given`` (JSON-ready, as stored) with what ``run_dir`` holds.

    ``total_steps``: the given run length, refused when below ``state.steps_done`` (a run
    cannot be shorter than what it has already trained). Without a stored config only that is
    checked.
    """
    check = ResumeCheck(Path(run_dir), state)
    if not state.holds_run:
        return check
    if state.stored is not None:
        for diff in diff_configs(state.stored, given):
            if diff.path == "train.total_steps":
                continue  # judged below, with or without a stored config
            (check.allowed if is_safe(diff.path) else check.refused).append(diff)
    stored_total = (state.stored or {}).get("train", {}).get("total_steps", _MISSING)
    if total_steps < state.steps_done:
        check.refused.insert(
            0,
            Difference(
                "train.total_steps",
                stored_total,
                total_steps,
                f"below the {state.steps_done} steps already done",
            ),
        )
    elif stored_total != _MISSING and stored_total != total_steps:
        check.allowed.insert(0, Difference("train.total_steps", stored_total, total_steps))
    return check


def _steps_in_checkpoints(ckpt_dir: Path) -> int | None:
    """The step of the checkpoint a resume loads (``latest``), else of the newest saved one."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        m = _TAG.match(latest.read_text().strip())
        if m:
            return int(m.group(1))
    steps = [int(m.group(1)) for p in ckpt_dir.glob("step*") if (m := _TAG.match(p.name))]
    return max(steps) if steps else None


def _last_metric_step(path: Path) -> int | None:
    """The highest step of ``metrics.jsonl`` (a torn last line, left by a crash, is skipped)."""
    last = None
    with path.open(errors="replace") as fh:
        for line in fh:
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                continue
            if isinstance(step, int):
                last = step if last is None else max(last, step)
    return last


def inspect_run_dir(run_dir: Path) -> RunDirState:
    """What ``run_dir`` holds. A directory with only logs or a stored config (a run that failed
    before recording anything) holds no run: starting there loses nothing."""
    run_dir = Path(run_dir)
    ckpt = _steps_in_checkpoints(run_dir / "checkpoints") if run_dir.is_dir() else None
    metrics = run_dir / "metrics.jsonl"
    rows = _last_metric_step(metrics) if metrics.is_file() else None
    holds = ckpt is not None or rows is not None
    stored = None
    path = run_dir / STORED_CONFIG
    if holds and path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            stored = None  # unreadable: judged like a run stored without its config
    return RunDirState(holds, max(ckpt or 0, rows or 0), stored)


def write_stored_config(run_dir: Path, config: Mapping[str, Any]) -> Path:
    """Store ``config`` (JSON-ready, secrets redacted) as the run's config, atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / STORED_CONFIG
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def move_aside(run_dir: Path, now: float | None = None) -> Path | None:
    """Rename ``run_dir`` to ``<run_dir>.old-<YYYYmmdd-HHMMSS>`` (a suffix ``-2``, ``-3``... if
    taken) so a fresh run can start there; never deletes. None when there is nothing to move."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 2
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    run_dir.rename(target)
    return target

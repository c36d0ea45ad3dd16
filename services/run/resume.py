"""Resuming a run directory: is the config given now the run's config?

``d3s run``, ``d3s train`` and ``d3s validate`` ask :func:`check_resume` before anything starts.
A run directory that holds a run (a checkpoint or metric rows) continues that run, so the new
config is compared, field by field, with the one stored there (``run_config.json``):

* fields in :data:`SAFE_ON_RESUME` change how the run is run or recorded, not what it trains
  (its length, logging, the API, evaluation and checkpoint cadence, infrastructure timeouts);
  they may differ, and are listed in one line;
* any other difference (preset, loss, model, task, batch shape, seed, ...) would silently mix
  two experiments in one directory: it is refused, each field named with both values;
* ``train.total_steps`` may change but not below the steps the directory already holds;
* the schedules' horizon (``train.schedule_steps``; ``train.total_steps`` at the run's first
  start) is kept: a config that leaves it unset goes on with the stored one
  (:attr:`ResumeCheck.schedule_steps`, which the caller applies), one that names another is
  refused. So a run extended past its horizon trains its extra steps at the schedules' final
  keep ratios and learning rate instead of having them stretched back toward their start.

Both configs are compared as the run would use them (:func:`effective_config`:
defaults filled in), so a field an older d3s did not store, or a section given as "the defaults",
is no difference. The functions here are pure over the two config mappings except
:func:`inspect_run_dir`, :func:`write_stored_config` and :func:`move_aside`, which touch the
directory.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from services.rollout.config import RolloutConfig, VLLMConfig
from services.run.config import RunConfig

__all__ = [
    "SAFE_ON_RESUME",
    "STORED_CONFIG",
    "Difference",
    "ResumeCheck",
    "RunDirState",
    "check_resume",
    "diff_configs",
    "effective_config",
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
# not listed is refused, so a field added later is refused until someone argues it onto this
# list. A section is listed whole only when every one of its fields passes that test.
SAFE_ON_RESUME: tuple[str, ...] = (
    # Checked separately against the steps already done; the schedules keep their horizon.
    "train.total_steps",
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
    # Not weight_sync.wire_dtype: bfloat16 on the wire rounds a float32 model's weights, so the
    # rollouts would sample from another policy than before.
    "weight_sync.transport",
    "weight_sync.bucket_mb",
    "weight_sync.path",
    "weight_sync.keep_last",
    "weight_sync.timeout_s",
    "weight_sync.rendezvous",
    "weight_sync.catchup_every",
    "weight_sync.member_timeout_s",
    "weight_sync.sample_every",  # the checksum's sampling, not the weights
    "weight_sync.sample_elements",
    "weight_sync.engine_digest",
    # Memory vLLM may take: its GPU share, its CPU KV cache (the other vllm fields change what
    # or how it samples).
    "rollout.vllm.gpu_memory_utilization",
    "rollout.vllm.cpu_kv_cache_gib",
    # Only where the warm start comes from (the cache, or the copy shipped with the package);
    # the resumed run starts from its checkpoint.
    "warmstart.cache_dir",
    "warmstart.use_shipped",
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
    schedule_steps: int | None = None
    """The schedules' horizon the resumed run goes on with (the stored one); None: the run is
    new, or was stored without its config, and uses the horizon given."""
    total_steps: int | None = None
    """The run length given (to say what the steps past the horizon do)."""

    @property
    def ok(self) -> bool:
        return not self.refused

    def apply_to(self, cfg: RunConfig) -> None:
        """Make ``cfg`` go on with the run's horizon (before it is stored and run)."""
        if self.schedule_steps is not None:
            cfg.train.schedule_steps = self.schedule_steps

    def summary_line(self) -> str | None:
        """One line for a resume that may go ahead; None for a directory with no run in it."""
        if not self.state.holds_run:
            return None
        line = f"resuming the run in {self.run_dir} ({self.state.steps_done} steps done)"
        if self.state.stored is None:
            line += "; it has no stored config (an older d3s), so only its length was checked"
        if self.allowed:
            line += "; changed: " + ", ".join(d.short() for d in self.allowed)
        h = self.schedule_steps
        if h is not None and self.total_steps is not None and self.total_steps != h:
            line += f"; the schedules keep their horizon of {h} steps"
            if self.total_steps > h:
                line += f" (steps after {h} train at the final keep ratios and learning rate)"
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
    in dotted-path order; a field present on one side only differs from ``"(unset)"``.
    Compared as given: :func:`check_resume` fills both with defaults first."""
    a, b = _flatten(stored), _flatten(given)
    return [
        Difference(path, a.get(path, _MISSING), b.get(path, _MISSING))
        for path in sorted(a.keys() | b.keys())
        if a.get(path, _MISSING) != b.get(path, _MISSING)
    ]


def effective_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config (JSON-ready, as :meth:`RunConfig.stored` wrote it, perhaps by an older
    d3s) as the run would use it: each section through its model, so every field it leaves out
    takes its default, and a section left out where that means its defaults (``rollout.vllm``
    under ``engine: vllm``) filled in. Comparing two such configs reports only what a run would
    do differently.

    Sections are validated one at a time and without the whole-run checks, some of which read
    the machine (an installed vLLM, a model directory). A section its model refuses (a field a
    later d3s removed, a check that fails here) keeps its stored values over the defaults.
    """
    defaults = RunConfig().model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, value in data.items():
        info = RunConfig.model_fields.get(name)
        if info is None:
            out[name] = value
            continue
        try:
            out[name] = TypeAdapter(info.annotation).dump_python(
                TypeAdapter(info.annotation).validate_python(value), mode="json"
            )
        except ValidationError:
            out[name] = _over_defaults(defaults.get(name), value)
    for name, value in defaults.items():
        out.setdefault(name, value)
    rollout = out.get("rollout")
    if isinstance(rollout, dict) and rollout.get("engine") == "vllm":
        rollout["vllm"] = _vllm_as_run(rollout)
    return out


def _vllm_as_run(rollout: dict[str, Any]) -> Any:
    """The ``vllm`` section a run with this ``rollout`` section uses: its defaults, and those
    that depend on the rest of the section (``dtype`` by ``num_gpus``), filled in."""
    given = rollout.get("vllm")
    try:
        vllm = VLLMConfig.model_validate(given or {})
        # Built without the section's own checks (an installed vLLM), only to read its settings.
        section = RolloutConfig.model_construct(**{**rollout, "vllm": vllm})
        return section.vllm_settings.model_dump(mode="json")
    except (ValidationError, TypeError, ValueError):
        defaults = VLLMConfig().model_dump(mode="json")
        return _over_defaults(defaults, given) if isinstance(given, Mapping) else defaults


def _over_defaults(default: Any, value: Any) -> Any:
    """``value`` with the fields it lacks taken from ``default`` (sections merged key by key; a
    section of another ``type``, such as another task, is taken as it is)."""
    if not (isinstance(default, Mapping) and isinstance(value, Mapping)):
        return value
    if "type" in default and default["type"] != value.get("type", default["type"]):
        return dict(value)
    keys = list(default) + [k for k in value if k not in default]
    return {
        k: _over_defaults(default[k], value[k])
        if k in default and k in value
        else value[k]
        if k in value
        else default[k]
        for k in keys
    }


def is_safe(path: str, allow: tuple[str, ...] = SAFE_ON_RESUME) -> bool:
    """Whether the field at dotted ``path`` may change on resume (``allow`` holds fields and
    whole sections)."""
    return any(path == p or path.startswith(p + ".") for p in allow)


def _horizon(train: Mapping[str, Any]) -> int | None:
    """The schedules' horizon a ``train`` section sets: ``schedule_steps``, else ``total_steps``."""
    value = train.get("schedule_steps")
    return value if value is not None else train.get("total_steps")


def check_resume(
    run_dir: Path, state: RunDirState, given: Mapping[str, Any], total_steps: int
) -> ResumeCheck:
    """Compare the config ``given`` (JSON-ready, as stored) with what ``run_dir`` holds.

    ``total_steps``: the given run length, refused when below ``state.steps_done`` (a run
    cannot be shorter than what it has already trained). Without a stored config only that is
    checked. The stored horizon is kept (:attr:`ResumeCheck.schedule_steps`); a given
    ``train.schedule_steps`` other than it is refused.
    """
    check = ResumeCheck(Path(run_dir), state, total_steps=total_steps)
    if not state.holds_run:
        return check
    if state.stored is not None:
        stored, now = effective_config(state.stored), effective_config(given)
        for diff in diff_configs(stored, now):
            if diff.path in ("train.total_steps", "train.schedule_steps"):
                continue  # judged below
            (check.allowed if is_safe(diff.path) else check.refused).append(diff)
        _judge_horizon(check, stored.get("train", {}), now.get("train", {}))
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


def _judge_horizon(check: ResumeCheck, stored: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Keep the stored horizon; refuse a given ``schedule_steps`` that names another one (it
    would move the keep ratios and learning rate of every step still to come)."""
    horizon = _horizon(stored)
    if not isinstance(horizon, int):
        return  # a stored config without a length: nothing to keep
    asked = given.get("schedule_steps")
    if asked is not None and asked != horizon:
        check.refused.append(
            Difference(
                "train.schedule_steps",
                horizon,
                asked,
                "the schedules' horizon is kept on resume (changing it moves the keep ratios "
                "and learning rate of every later step); leave it unset to keep it",
            )
        )
        return
    check.schedule_steps = horizon


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

"""What each route shows: small functions from the run's state (as :class:`RunState` returns it)
to the response models. Pure apart from :func:`latest_history`, which reads; the routes in
:mod:`services.api.routes` only fetch and hand over.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.api.models import (
    ActorInfo,
    ActorsResponse,
    Checkpoint,
    CheckpointsResponse,
    DeadLetter,
    DeadLettersResponse,
    HistoryResponse,
    MetricsResponse,
    QueueDepths,
    Rate,
    ScheduleResponse,
    ThroughputResponse,
)
from services.transport.bundle import Transport
from services.transport.state import RunState

__all__ = [
    "MAX_NAMES",
    "NAMES_MAX_LENGTH",
    "NAMES_PATTERN",
    "MalformedValue",
    "RunSnapshot",
    "actors_view",
    "checkpoints_view",
    "dead_letters_view",
    "finite_or_none",
    "history_page",
    "latest_history",
    "metrics_response",
    "parse_names",
    "parse_schedule",
    "read_snapshot",
    "throughput",
]

log = logging.getLogger(__name__)

MAX_NAMES = 64
# Metric names as the services write them (``eval/acc@1`` included), nothing that needs escaping.
_NAME_CHARS = r"[A-Za-z0-9_./@:-]{1,128}"
_NAME = re.compile(f"^{_NAME_CHARS}$")
# A comma-separated list of 1..MAX_NAMES names: documented as the parameter's pattern.
NAMES_PATTERN = f"^{_NAME_CHARS}(,{_NAME_CHARS}){{0,{MAX_NAMES - 1}}}$"
NAMES_MAX_LENGTH = MAX_NAMES * 129 - 1


class MalformedValue(ValueError):
    """A stored value that does not parse as the type the API documents."""


def finite_or_none(value: float) -> float | None:
    """``value``, or None where JSON cannot carry it (NaN, +-inf)."""
    return value if math.isfinite(value) else None


def _as_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise MalformedValue(f"{raw!r} is not a number") from None


def _as_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        pass
    # Writers that format every number as a float ("12.0") still mean an integer.
    value = _as_float(raw)
    if not value.is_integer():
        raise MalformedValue(f"{raw!r} is not an integer")
    return int(value)


def parse_schedule(raw: Mapping[str, str]) -> ScheduleResponse:
    """The schedule hash as typed fields; raises :class:`MalformedValue` naming the bad field."""
    fields: dict[str, Any] = {}
    for name, parse in (
        ("step", _as_int),
        ("total_steps", _as_int),
        ("progress", _as_float),
        ("sample_ratio", _as_float),
        ("token_ratio", _as_float),
    ):
        if name not in raw:
            continue
        try:
            value = parse(raw[name])
        except MalformedValue as exc:
            raise MalformedValue(f"schedule field {name!r}: {exc}") from None
        fields[name] = finite_or_none(value) if isinstance(value, float) else value
    if "preset" in raw:
        fields["preset"] = raw["preset"]
    return ScheduleResponse(**fields)


@dataclass(frozen=True)
class RunSnapshot:
    """One read of everything ``/metrics`` and ``/metrics/prometheus`` report.

    Metric values keep NaN and infinities: Prometheus has them, only JSON needs them nulled.
    """

    metrics: dict[str, float]
    counters: dict[str, int]
    queues: QueueDepths
    paused: bool
    stop_reason: str | None
    done: bool
    schedule: ScheduleResponse | None


def read_snapshot(t: Transport) -> RunSnapshot:
    """Read the run's metrics, counters, queue depths, flags and schedule."""
    raw_schedule = t.state.schedule()
    try:
        counters = t.state.stats()
    except ValueError as exc:  # counters are written by HINCRBY: a bad one is a defect
        raise MalformedValue(f"counters: {exc}") from None
    return RunSnapshot(
        metrics=dict(sorted(t.state.numeric_metrics().items())),
        counters=dict(sorted(counters.items())),
        queues=QueueDepths(**t.backlogs()),
        paused=t.control.paused(),
        stop_reason=t.control.stop_reason(),
        done=t.control.is_done(),
        schedule=parse_schedule(raw_schedule) if raw_schedule else None,
    )


def metrics_response(snap: RunSnapshot) -> MetricsResponse:
    """The JSON form of a snapshot (non-finite metric values as null)."""
    return MetricsResponse(
        metrics={k: finite_or_none(v) for k, v in snap.metrics.items()},
        counters=snap.counters,
        queues=snap.queues,
        paused=snap.paused,
        stop_reason=snap.stop_reason,
        done=snap.done,
    )


# ---- history ------------------------------------------------------------------------------------


def parse_names(raw: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (order kept, duplicates dropped); None or blank -> None (all).

    Raises ValueError naming the parameter for an empty entry, a name with characters no metric
    uses, or more than :data:`MAX_NAMES` names.
    """
    if raw is None or not raw.strip():
        return None
    names = [n.strip() for n in raw.split(",")]
    for name in names:
        if not _NAME.match(name):
            raise ValueError(
                f"names: {name!r} is not a metric name (1-128 of letters, digits, '_./@:-')"
            )
    unique = list(dict.fromkeys(names))
    if len(unique) > MAX_NAMES:
        raise ValueError(f"names: at most {MAX_NAMES} names, got {len(unique)}")
    return unique


def history_page(
    rows: Sequence[Mapping[str, float]], names: list[str] | None, since_step: int, limit: int
) -> HistoryResponse:
    """A :class:`HistoryResponse` from up to ``limit + 1`` rows (the extra one only says "more").

    Args:
        rows: step rows with ``step`` >= ``since_step``, ascending, as ``RunState.history`` gives.
        names: the metrics to return; None returns every field any returned row has.
    """
    page = list(rows[:limit])
    steps = [int(r["step"]) for r in page]
    if names is None:
        names = sorted({k for r in page for k in r if k != "step"})
    series: dict[str, list[float | None]] = {}
    for name in names:
        column: list[float | None] = []
        for row in page:
            value = row.get(name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            column.append(finite_or_none(float(value)) if ok else None)
        series[name] = column
    return HistoryResponse(
        steps=steps,
        series=series,
        next_since_step=steps[-1] + 1 if steps else since_step,
        more=len(rows) > limit,
    )


# ---- throughput ---------------------------------------------------------------------------------

# Rows are written once per step, so the latest learner step locates the tail of the history
# without reading all of it; this many steps of slack cover a row or two written out of order.
_TAIL_SLACK = 8
_FULL_SCAN_CAP = 100_000


def latest_history(state: RunState, window: int) -> list[dict[str, float]]:
    """The last ``window`` history rows (ascending), read without scanning the whole history
    when the latest step is known from the ``learner_version`` metric."""
    anchor = state.numeric_metrics().get("learner_version")
    if anchor is not None and math.isfinite(anchor):
        start = max(0, int(anchor) - window - _TAIL_SLACK + 1)
        rows = state.history(start, window + 2 * _TAIL_SLACK)
        # A full read ending exactly at the limit may not have reached the tail: fall through.
        if rows and len(rows) < window + 2 * _TAIL_SLACK:
            return rows[-window:]
    return state.history(0, _FULL_SCAN_CAP)[-window:]


def _rate(rows: Sequence[Mapping[str, float]], total: str) -> Rate:
    usable = [
        r
        for r in rows
        if isinstance(r.get(total), (int, float))
        and isinstance(r.get("wall_time"), (int, float))
        and math.isfinite(r[total])
        and math.isfinite(r["wall_time"])
    ]
    if len(usable) < 2:
        return Rate(value=None, total_field=total)
    first, last = usable[0], usable[-1]
    span = (first["step"], last["step"])
    dt = last["wall_time"] - first["wall_time"]
    d_total = last[total] - first[total]
    if dt <= 0 or d_total < 0:
        return Rate(value=None, total_field=total, from_step=int(span[0]), to_step=int(span[1]))
    return Rate(value=d_total / dt, total_field=total, from_step=int(span[0]), to_step=int(span[1]))


def throughput(rows: Sequence[Mapping[str, float]], window: int) -> ThroughputResponse:
    """Rates over ``rows`` (the latest history rows, ascending); see :class:`ThroughputResponse`."""
    return ThroughputResponse(
        window=window,
        rows=len(rows),
        samples_per_s=_rate(rows, "samples_total"),
        tokens_per_s=_rate(rows, "learner_tokens_total"),
        learner_busy_fraction=_rate(rows, "learner_seconds_total"),
    )


# ---- actors, dead letters, checkpoints ----------------------------------------------------------


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return finite_or_none(float(value))
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def actors_view(
    heartbeats: Mapping[str, Mapping[str, Any]], learner_version: float | None, now: float
) -> ActorsResponse:
    """Heartbeats (``weight_version``, ``groups_published``, ``time`` + anything else) as a list
    sorted by actor name."""
    learner = _int_or_none(learner_version)
    actors = []
    for name in sorted(heartbeats):
        beat = dict(heartbeats[name]) if isinstance(heartbeats[name], Mapping) else {}
        version = _int_or_none(beat.pop("weight_version", None))
        stamp = _float_or_none(beat.pop("time", None))
        actors.append(
            ActorInfo(
                name=name,
                weight_version=version,
                versions_behind=learner - version
                if learner is not None and version is not None
                else None,
                groups_published=_int_or_none(beat.pop("groups_published", None)),
                last_heartbeat=stamp,
                seconds_since_heartbeat=max(0.0, now - stamp) if stamp is not None else None,
                extra=_json_safe(beat),
            )
        )
    return ActorsResponse(learner_version=learner, actors=actors)


def _entry_time(entry_id: str) -> float | None:
    # A stream entry id is "<unix milliseconds>-<sequence>".
    ms, _, _ = entry_id.partition("-")
    return int(ms) / 1000.0 if ms.isdigit() else None


def dead_letters_view(
    rows: Sequence[Mapping[str, str]], total: int, in_stream: int
) -> DeadLettersResponse:
    """Dead letters (newest first, as ``RunState.dead_letters`` gives them) with reason counts."""
    recent = [
        DeadLetter(
            id=row["id"],
            time=_entry_time(row["id"]),
            reason=row.get("reason") or "unknown",
            source=row.get("source"),
            entry_id=row.get("entry_id"),
            group=row.get("group"),
            consumer=row.get("consumer"),
        )
        for row in rows
    ]
    by_reason = Counter(d.reason for d in recent)
    return DeadLettersResponse(
        total=total, in_stream=in_stream, recent=recent, by_reason=dict(by_reason.most_common())
    )


def checkpoints_view(rows: Sequence[Mapping[str, Any]]) -> CheckpointsResponse:
    """Checkpoint records, oldest first; a record missing its step or path is logged and skipped."""
    out = []
    for row in rows:
        step, path = _int_or_none(row.get("step")), row.get("path")
        if step is None or not isinstance(path, str):
            log.warning("skipping malformed checkpoint record %r", row)
            continue
        out.append(Checkpoint(step=step, path=path, time=_float_or_none(row.get("time"))))
    out.sort(key=lambda c: c.step)
    return CheckpointsResponse(checkpoints=out, latest=out[-1] if out else None)

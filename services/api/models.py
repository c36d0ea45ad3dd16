"""The API's request and response bodies: what each route promises, as pydantic models.

These are the OpenAPI document's schemas. Numbers that can be NaN or infinite in Redis are
``float | None`` here: strict JSON has no spelling for them, so null stands for "no finite value".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "ActorInfo",
    "ActorsResponse",
    "Checkpoint",
    "CheckpointsResponse",
    "ConfigResponse",
    "ControlResponse",
    "DeadLetter",
    "DeadLettersResponse",
    "ErrorResponse",
    "HealthResponse",
    "HistoryResponse",
    "MetricsResponse",
    "QueueDepths",
    "Rate",
    "ScheduleResponse",
    "StopRequest",
    "StopResponse",
    "ThroughputResponse",
]


class ErrorResponse(BaseModel):
    """An error, as FastAPI reports it."""

    detail: str = Field(description="what went wrong, naming the field or resource")


class HealthResponse(BaseModel):
    """Liveness of the API and its Redis."""

    status: Literal["ok", "unavailable"]
    redis: bool = Field(description="whether Redis answered PING")
    reason: str | None = Field(None, description="why Redis is unavailable (503 only)")


class ScheduleResponse(BaseModel):
    """The selector's current schedule state (the ``{ns}:schedule`` hash).

    A field the run has not written (yet) is null.
    """

    step: int | None = Field(None, description="learner step the schedule was computed for")
    total_steps: int | None = Field(None, description="steps planned for the run")
    progress: float | None = Field(None, description="step / total_steps, in [0, 1]")
    sample_ratio: float | None = Field(None, description="rho_s: share of samples kept")
    token_ratio: float | None = Field(None, description="K: share of tokens kept")
    preset: str | None = Field(None, description="selection preset, e.g. 'd3s' or 'grpo'")


class QueueDepths(BaseModel):
    """Records waiting in each stream (delivered but unacknowledged ones included)."""

    groups: int = Field(description="scored groups waiting for the selector")
    batches: int = Field(description="curated batches waiting for the learner")
    dead: int = Field(description="malformed records set aside in the dead-letter stream")


class MetricsResponse(BaseModel):
    """Everything the run reports right now, in one consistent-enough read."""

    metrics: dict[str, float | None] = Field(
        description="latest value of each metric; null where it is NaN or infinite"
    )
    counters: dict[str, int] = Field(description="monotonic event counters")
    queues: QueueDepths
    paused: bool = Field(description="whether an operator paused the run")
    stop_reason: str | None = Field(
        None, description="why the run was asked to stop; null while it was not"
    )
    done: bool = Field(False, description="whether the learner trained the run's last step")


class ControlResponse(BaseModel):
    """The run's paused flag after a control request."""

    paused: bool


class StopRequest(BaseModel):
    """Why an operator stops the run (kept in the run's control hash and logs)."""

    reason: str = Field(
        "stopped via the API",
        min_length=1,
        max_length=200,
        description="a short human-readable reason",
    )


class StopResponse(BaseModel):
    """The run's stop flag after a stop request."""

    stop_requested: bool = Field(description="always true once the request was recorded")
    reason: str = Field(
        description="the reason the run keeps: the first one given, which may predate this one"
    )


class HistoryResponse(BaseModel):
    """One page of per-step metric rows, as columns (one list per metric, aligned with ``steps``).

    Poll for new rows with ``since_step=next_since_step``; ``more`` says the page was full, so
    further rows may already be there.
    """

    steps: list[int] = Field(description="the learner steps of this page, ascending")
    series: dict[str, list[float | None]] = Field(
        description="metric name -> its value at each step of ``steps``; null where that step's "
        "row has no finite value for it"
    )
    next_since_step: int = Field(description="``since_step`` for the next page")
    more: bool = Field(description="whether rows beyond this page exist")


class Rate(BaseModel):
    """A rate over the throughput window: the change of a cumulative total per wall second."""

    value: float | None = Field(
        description="d(total) / d(wall_time) between the window's first and last rows that carry "
        "both; null when fewer than two such rows exist, wall time did not advance, or the total "
        "went down (a restart reset it)"
    )
    total_field: str = Field(description="the cumulative history field the rate is taken of")
    from_step: int | None = Field(None, description="step of the row the rate starts at")
    to_step: int | None = Field(None, description="step of the row the rate ends at")


class ThroughputResponse(BaseModel):
    """Recent learner throughput, computed from the last ``window`` per-step history rows.

    Each rate is ``(total[last] - total[first]) / (wall_time[last] - wall_time[first])`` over the
    first and last rows of the window that carry both the total and ``wall_time`` (unix seconds
    when the step's row was written). Rates span the whole pipeline, waits included: a learner
    starved by slow rollouts shows a low busy fraction, not a high one.
    """

    window: int = Field(description="how many of the latest history rows were considered")
    rows: int = Field(description="how many rows the window actually held")
    samples_per_s: Rate = Field(description="samples trained per second (``samples_total``)")
    tokens_per_s: Rate = Field(
        description="kept (loss-bearing) tokens trained per second (``learner_tokens_total``)"
    )
    learner_busy_fraction: Rate = Field(
        description="learner compute seconds per wall second (``learner_seconds_total``); "
        "1.0 means the learner never waited"
    )


class ActorInfo(BaseModel):
    """A rollout actor's latest heartbeat."""

    name: str = Field(description="the actor's name")
    weight_version: int | None = Field(
        None, description="the weight version the actor generates with"
    )
    versions_behind: int | None = Field(
        None, description="learner_version - weight_version; null when either is unknown"
    )
    groups_published: int | None = Field(None, description="scored groups the actor published")
    last_heartbeat: float | None = Field(None, description="unix time of the latest heartbeat")
    seconds_since_heartbeat: float | None = Field(
        None, description="seconds between the latest heartbeat and this response"
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="any further fields the actor reported"
    )


class ActorsResponse(BaseModel):
    """Every rollout actor that has sent a heartbeat, by name."""

    learner_version: int | None = Field(None, description="the latest published weight version")
    actors: list[ActorInfo]


class DeadLetter(BaseModel):
    """A record no consumer could use, set aside with the reason (payload left out)."""

    id: str = Field(description="entry id in the dead-letter stream")
    time: float | None = Field(None, description="unix time it was dead-lettered")
    reason: str = Field(description="why it was set aside")
    source: str | None = Field(None, description="the stream it came from")
    entry_id: str | None = Field(None, description="its entry id in that stream")
    group: str | None = Field(None, description="the consumer group that read it")
    consumer: str | None = Field(None, description="the consumer that read it")


class DeadLettersResponse(BaseModel):
    """The newest dead letters and how many there were of each reason."""

    total: int = Field(description="records dead-lettered since the run began (counter ``dead``)")
    in_stream: int = Field(description="dead letters still kept in the stream (it is trimmed)")
    recent: list[DeadLetter] = Field(description="the newest ones, newest first")
    by_reason: dict[str, int] = Field(description="reason -> how many of ``recent`` have it")


class Checkpoint(BaseModel):
    """A checkpoint the learner saved."""

    step: int = Field(description="the learner step it holds")
    path: str = Field(description="where it was written")
    time: float | None = Field(None, description="unix time it was recorded")


class CheckpointsResponse(BaseModel):
    """Every checkpoint of the run, oldest first."""

    checkpoints: list[Checkpoint]
    latest: Checkpoint | None = Field(None, description="the newest one; null before the first")


class ConfigResponse(BaseModel):
    """The run's configuration, secrets redacted."""

    config: dict[str, Any] = Field(
        description="the config as the orchestrator wrote it, with every value under a key "
        "naming a secret replaced by the redaction marker"
    )
    redacted: list[str] = Field(description="dotted paths of the values this API redacted")

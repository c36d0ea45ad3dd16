"""The selector's settings: the algorithm section of a run config, and what the service needs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from selector.presets import PRESETS, Preset, get_preset
from selector.schedule import Schedule


class DynamicSamplingConfig(BaseModel):
    """DAPO's dynamic sampling: a step's batch is ``prompts_per_step`` groups whose rewards
    differ, drawn from as many generated groups as it takes. A group whose rewards are all equal
    (zero variance: every advantage 0, nothing to learn from) is counted and dropped, and more
    are generated until the batch is full, at most ``max_draws_factor x prompts_per_step``
    groups per step; past that bound with the batch not full the run stops with an error.
    D3S's sample selection then selects within the filled batch.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Fill every batch with groups that carry reward variance (off: a step takes the groups
    as they come, zero-variance ones included)."""
    max_draws_factor: float = Field(4.0, ge=1, le=100)
    """Most groups one step may consume, as a multiple of ``rollout.prompts_per_step`` (kept
    and dropped together; verl's ``max_num_gen_batches``). A task that gives no variance stops
    the run once a step has drawn this many without filling its batch."""

    def max_draws(self, prompts_per_step: int) -> int:
        """The most groups a step may consume."""
        return math.ceil(self.max_draws_factor * prompts_per_step)


class AlgorithmConfig(BaseModel):
    """Which D3S variant runs: a preset of the ablation ladder, with optional overrides.

    Every override left unset takes the preset's own value, so ``preset: d3s`` alone is the
    method with its default schedule.
    """

    model_config = ConfigDict(extra="forbid")

    preset: str = "d3s"
    """grpo, pods, d1s, d1s-cross, d2s, d3s, d3s-i or random (the ladder in the README)."""
    schedule: Literal["linear", "cosine", "constant"] | None = None
    """How the keep ratios move from their initial to their final value over the run."""
    sample_init: float | None = Field(None, gt=0, le=1)
    """Sample keep ratio rho_s at step 0."""
    sample_final: float | None = Field(None, gt=0, le=1)
    """Sample keep ratio rho_s at the last step."""
    token_init: float | None = Field(None, gt=0, le=1)
    """Token keep ratio K at step 0."""
    token_final: float | None = Field(None, gt=0, le=1)
    """Token keep ratio K at the last step."""
    token_pool: Literal["batch", "sequence"] | None = None
    """Rank tokens across the whole batch or within each response."""
    token_score: Literal["adv_entropy", "entropy", "adv"] | None = None
    """Token-level ranking: ``adv_entropy`` |A| x H (the paper's), ``entropy`` H alone (the
    80/20 high-entropy-token criterion), ``adv`` |A| alone; None: the preset's (adv_entropy)."""
    renormalize: bool | None = None
    """Re-normalise advantages after sample selection (PODS); D3S does not."""
    adv_eps: float = Field(1e-6, gt=0)
    """Added to the group's reward std before dividing."""
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    """DAPO's dynamic sampling (batches of groups with reward variance only); off by default."""

    @model_validator(mode="after")
    def _known(self) -> AlgorithmConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; choose from {sorted(PRESETS)}")
        self.build_preset()  # surfaces a bad combination now, not at step 1
        return self

    def build_preset(self) -> Preset:
        """The preset with this section's overrides applied."""
        base = get_preset(self.preset)
        s = base.schedule
        schedule = Schedule(
            kind=self.schedule or s.kind,
            sample_init=self.sample_init or s.sample_init,
            sample_final=self.sample_final or s.sample_final,
            token_init=self.token_init or s.token_init,
            token_final=self.token_final or s.token_final,
        )
        changes: dict[str, Any] = {"schedule": schedule}
        if self.token_pool is not None:
            changes["token_pool"] = self.token_pool
        if self.renormalize is not None:
            changes["renormalize"] = self.renormalize
        if self.token_score is not None:
            changes["token_score"] = self.token_score
        return base.with_overrides(**changes)


@dataclass(frozen=True)
class SelectorSettings:
    """What the selector service needs of a run (the entry point builds it from the run config).

    ``max_abs_reward``, ``vocab_size`` and ``max_positions`` bound what a group may contain:
    a group outside them is dead-lettered with the reason instead of reaching the learner.
    """

    preset: Preset
    total_steps: int
    prompts_per_step: int
    samples_per_prompt: int
    seed: int
    max_staleness: int
    max_batch_backlog: int
    wait_timeout_s: float
    adv_eps: float = 1e-6
    max_abs_reward: float = 1e6
    vocab_size: int | None = None
    max_positions: int | None = None
    schedule_steps: int | None = None
    """The keep-ratio schedule's horizon (``train.schedule_steps``); None: ``total_steps``."""
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    """Drop zero-variance groups and keep reading until the batch is full (bounded)."""

    @property
    def horizon(self) -> int:
        return self.schedule_steps if self.schedule_steps is not None else self.total_steps

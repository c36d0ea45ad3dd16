"""Presets: the paper's ablation ladder (grpo .. d3s) as validated configurations of pure functions.

A preset says *which* selection runs at each level; the ratios come from its Schedule. Both
levels are applied by the two functions at the bottom, so every variant shares one code path
instead of a forked trainer per algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from selector._checks import check_dim, require
from selector.advantages import DEFAULT_EPS, group_advantages, renormalized_advantages
from selector.sample import select_cross, select_intra, select_random
from selector.schedule import Schedule
from selector.token import TOKEN_SCORES, Pool, TokenScore, random_token_mask, token_mask

SampleLevel = Literal["none", "intra", "cross", "random"]
TokenLevel = Literal["none", "topk", "random"]
SAMPLE_LEVELS = ("none", "intra", "cross", "random")
TOKEN_LEVELS = ("none", "topk", "random")
POOLS = ("batch", "sequence")

_DYNAMIC = Schedule(
    kind="linear", sample_init=0.25, sample_final=0.5, token_init=0.2, token_final=0.5
)
# Presets "without the schedule" hold D3S's aggressive starting ratios for the whole run: that is
# the regime the paper says learns fast early and overfits later.
_CONSTANT = Schedule(
    kind="constant", sample_init=0.25, sample_final=0.25, token_init=0.2, token_final=0.2
)


@dataclass(frozen=True)
class Preset:
    name: str
    sample_level: SampleLevel = "none"
    token_level: TokenLevel = "none"
    renormalize: bool = False
    token_pool: Pool = "batch"
    schedule: Schedule = field(default_factory=Schedule)
    token_score: TokenScore = "adv_entropy"

    def __post_init__(self) -> None:
        require(
            self.sample_level in SAMPLE_LEVELS,
            "sample_level",
            f"must be one of {SAMPLE_LEVELS}, got {self.sample_level!r}",
        )
        require(
            self.token_level in TOKEN_LEVELS,
            "token_level",
            f"must be one of {TOKEN_LEVELS}, got {self.token_level!r}",
        )
        require(
            self.token_pool in POOLS,
            "token_pool",
            f"must be one of {POOLS}, got {self.token_pool!r}",
        )
        require(
            self.token_score in TOKEN_SCORES,
            "token_score",
            f"must be one of {TOKEN_SCORES}, got {self.token_score!r}",
        )
        require(
            not (self.renormalize and self.sample_level == "none"),
            "renormalize",
            "needs a sample-level selection to re-normalise after",
        )

    def ratios(self, step: int, total_steps: int) -> tuple[float, float]:
        """(sample_ratio, token_ratio) this preset uses at a step; 1.0 where a level is off."""
        sample, token = self.schedule.at(step, total_steps)
        return (
            sample if self.sample_level != "none" else 1.0,
            token if self.token_level != "none" else 1.0,
        )

    def with_overrides(self, **changes) -> Preset:
        return replace(self, **changes)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("grpo", schedule=_CONSTANT),
        Preset("pods", sample_level="intra", renormalize=True, schedule=_CONSTANT),
        Preset("d1s", sample_level="intra", schedule=_CONSTANT),
        Preset("d1s-cross", sample_level="cross", schedule=_CONSTANT),
        Preset("d2s", sample_level="cross", token_level="topk", schedule=_CONSTANT),
        Preset("d3s", sample_level="cross", token_level="topk", schedule=_DYNAMIC),
        Preset("d3s-i", sample_level="intra", token_level="topk", schedule=_DYNAMIC),
        Preset("random", sample_level="random", token_level="random", schedule=_DYNAMIC),
    )
}


def get_preset(name: str, **overrides) -> Preset:
    require(name in PRESETS, "preset", f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].with_overrides(**overrides) if overrides else PRESETS[name]


def _count(ratio: float, total: int) -> int:
    # At least one rollout survives: an empty batch is no batch.
    return max(1, min(total, round(ratio * total)))


def select_samples(
    preset: Preset,
    rewards: torch.Tensor,
    sample_ratio: float,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample level of a preset.

    Args:
        rewards: [B, G] verifier rewards of B groups of G rollouts.
        sample_ratio: rho_s in (0, 1] (ignored when the preset has no sample level).
    Returns:
        keep: [B, G] bool, the rollouts sent to the learner.
        adv: [B, G] advantages, computed over all G rollouts of a group (not re-normalised
            unless the preset says so); meaningful where keep is True.
    """
    check_dim(rewards, 2, "rewards")
    adv = group_advantages(rewards, eps)
    b, g = adv.shape
    level = preset.sample_level
    if level == "none":
        keep = torch.ones_like(adv, dtype=torch.bool)
    elif level == "intra":
        keep = select_intra(adv, _count(sample_ratio, g))
    elif level == "cross":
        keep = select_cross(adv, _count(sample_ratio, b * g))
    else:
        keep = select_random((b, g), _count(sample_ratio, b * g), generator).to(adv.device)
    if preset.renormalize:
        adv = renormalized_advantages(rewards, keep, eps)
    return keep, adv


def select_tokens(
    preset: Preset,
    adv: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    token_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token level of a preset: the top-K tokens by the preset's ``token_score``, a random K,
    or all. Shapes: adv [N], entropy [N, T], response_mask [N, T] bool -> [N, T] bool."""
    if preset.token_level == "none" or token_ratio >= 1.0:
        return response_mask.clone()
    if preset.token_level == "random":
        return random_token_mask(response_mask, token_ratio, preset.token_pool, generator)
    return token_mask(
        adv, entropy, response_mask, token_ratio, preset.token_pool, preset.token_score
    )

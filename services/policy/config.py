"""The policy's settings: the built-in model's architecture, a local model path, the warm start."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from services.policy.probe import StartProbe

# Bump when the warm-start procedure changes, so old cached checkpoints are not reused.
# 2: the char tokenizer is saved as a Hugging Face fast tokenizer; 3: stop in a probed band.
WARMSTART_FORMAT = 3


class PolicySpec(BaseModel):
    """The built-in policy: a GPT-2 from a config (0.6M parameters by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_layer: int = Field(3, ge=1)
    """Transformer blocks."""
    n_embd: int = Field(128, ge=8)
    """Hidden size (a multiple of n_head)."""
    n_head: int = Field(4, ge=1)
    """Attention heads."""
    n_positions: int = Field(32, ge=8)
    """Context length; must cover prompt + response (8 + 5 tokens for 3-digit arithmetic)."""


class PolicyConfig(PolicySpec):
    """The ``policy`` section: a local Hugging Face model, or the built-in one (warm-started)."""

    path: Path | None = None
    """A local Hugging Face model directory (config.json, weights, tokenizer); skips the warm
    start. None: build the GPT-2 above and warm-start it on the arithmetic task."""

    def spec(self) -> PolicySpec:
        """The architecture alone (what the warm start's cache key depends on)."""
        return PolicySpec(**self.model_dump(exclude={"path"}))


class StartBand(BaseModel):
    """Where a warm start must land to be a good start for RL, measured on the dev prompts
    (training split) by the probe in :mod:`services.policy.probe`.

    RL at the quickstart's budget re-weights answers the policy can already produce; it does
    not teach the sums. A start whose temperature-1 samples are rarely right (~0.1) sees little
    reward, and RL barely moves it; one sampling the right answer a quarter of the time or more,
    while greedy decoding still prefers the wrong one, climbs to ~0.9 in 60 steps.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_sample_accuracy: float = Field(0.25, ge=0, le=1)
    """Share of temperature-1 samples that are right, at least (the first RL step's reward)."""
    max_greedy_accuracy: float = Field(0.45, ge=0, le=1)
    """Greedy accuracy at most: the headroom RL is there to climb."""
    samples: int = Field(8, ge=1)
    """Samples per dev prompt."""

    def holds(self, probe: StartProbe) -> bool:
        return (
            probe.sample_accuracy >= self.min_sample_accuracy
            and probe.greedy_accuracy <= self.max_greedy_accuracy
        )


class WarmstartConfig(BaseModel):
    """Supervised training of the built-in policy on imperfect demonstrations before RL.

    The policy learns the sums (carries included) but the demonstrations prefer the off-by-one
    answer, so greedy accuracy starts low and RL has a clear, verifiable job. After ``steps``,
    the start is probed every ``check_every`` steps and training stops at the first probe inside
    ``band``; a start that is not in the band by ``max_steps`` is begun again from a fresh
    initialisation, up to ``attempts`` times. Every field but ``cache_dir`` and ``use_shipped``
    enters the cache key, with the architecture and the task.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(1500, ge=0)
    """Optimiser steps always run (the end, when ``band`` is null)."""
    batch_size: int = Field(64, ge=1)
    """Demonstrations per step."""
    lr: float = Field(2e-3, gt=0)
    """AdamW learning rate after the warm-up (then constant)."""
    warmup_steps: int = Field(30, ge=0)
    """Linear learning-rate warm-up."""
    wrong_fraction: float = Field(0.55, ge=0, le=1)
    """Probability that a demonstration is the off-by-one answer."""
    clean: bool = False
    """Train on correct answers only (wrong_fraction is then 0); needs ``band: null``."""
    seed: int = 0
    """Model initialisation and data order (attempt k > 0 derives its own from it)."""
    band: StartBand | None = StartBand()
    """Where the start must land; null: stop after exactly ``steps``, unprobed."""
    max_steps: int = Field(6000, ge=0)
    """Steps after which an attempt that never landed in the band is abandoned."""
    check_every: int = Field(250, ge=1)
    """Steps between probes past ``steps``."""
    attempts: int = Field(3, ge=1)
    """Fresh initialisations tried before the warm start fails, naming the band."""
    dev_prompts: int = Field(500, ge=1)
    """Dev-set size, drawn from the training split (the held-out set never influences training)."""
    eval_prompts: int = Field(500, ge=0)
    """Held-out prompts scored after training, recorded with the checkpoint; 0 skips it."""
    cache_dir: Path = Path(".cache/warmstart")
    """Where finished warm starts are kept, one directory per cache key."""
    use_shipped: bool = True
    """Start from the checkpoint shipped with the package for this spec when there is one
    (sha256-checked), so every machine begins from the same weights; false trains one here."""

    @model_validator(mode="after")
    def _band_fits(self) -> WarmstartConfig:
        if self.clean and self.band is not None:
            raise ValueError(
                "band: a clean warm start is meant to start near the ceiling, outside any "
                "band; set warmstart.band: null with warmstart.clean: true"
            )
        if self.band is not None and self.max_steps < self.steps:
            raise ValueError(f"max_steps ({self.max_steps}) is below steps ({self.steps})")
        return self

    @property
    def effective_wrong_fraction(self) -> float:
        return 0.0 if self.clean else self.wrong_fraction

    def cache_key(self, policy: PolicySpec, task: int | dict[str, Any]) -> str:
        """Stable hash of what is trained (clean normalised, so equivalent specs share one).

        ``task``: the addition task's operand digits (an int: the key every addition warm start
        has always had), or the identity of another built-in task as a JSON-ready dict (e.g.
        ``{"type": "mixed", "levels": [1, 2]}``).
        """
        d = self.model_dump(mode="json", exclude={"cache_dir", "use_shipped"})
        d["wrong_fraction"] = self.effective_wrong_fraction
        d["clean"] = d["wrong_fraction"] == 0.0
        if isinstance(task, int):
            d["digits"] = task
        else:
            d["task"] = task
        d["model"] = policy.model_dump(mode="json")
        payload = json.dumps({"format": WARMSTART_FORMAT, "spec": d}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

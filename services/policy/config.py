"""The policy's settings: the built-in model's architecture, a local model path, the warm start."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Bump when the warm-start procedure changes, so old cached checkpoints are not reused.
WARMSTART_FORMAT = 2  # 2: the char tokenizer is saved as a Hugging Face fast tokenizer


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


class WarmstartConfig(BaseModel):
    """Supervised training of the built-in policy on imperfect demonstrations before RL.

    3000 steps by default: the policy learns the sums (carries included) but prefers the
    off-by-one answer, so greedy accuracy starts low (~0.16) and RL has a clear, verifiable job.
    Every field but ``cache_dir`` enters the cache key, with the architecture and task digits.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(3000, ge=0)
    """Optimiser steps always run."""
    batch_size: int = Field(64, ge=1)
    """Demonstrations per step."""
    lr: float = Field(2e-3, gt=0)
    """AdamW learning rate after the warm-up (then constant)."""
    warmup_steps: int = Field(30, ge=0)
    """Linear learning-rate warm-up."""
    wrong_fraction: float = Field(0.55, ge=0, le=1)
    """Probability that a demonstration is the off-by-one answer."""
    clean: bool = False
    """Train on correct answers only (wrong_fraction is then 0)."""
    seed: int = 0
    """Model initialisation and data order."""
    min_accuracy: float = Field(0.0, ge=0, le=1)
    """After ``steps``, keep training until greedy accuracy on training-split dev prompts reaches
    this (checked every ``eval_every`` steps), up to ``max_steps``; 0 disables."""
    max_steps: int = Field(3000, ge=0)
    """Upper bound on steps when min_accuracy is not reached (then a warning)."""
    eval_every: int = Field(50, ge=1)
    """Steps between dev evaluations past ``steps``."""
    dev_prompts: int = Field(500, ge=1)
    """Dev-set size, drawn from the training split (the held-out set never influences training)."""
    eval_prompts: int = Field(500, ge=0)
    """Held-out prompts scored after training, recorded with the checkpoint; 0 skips it."""
    cache_dir: Path = Path(".cache/warmstart")
    """Where finished warm starts are kept, one directory per cache key."""
    use_shipped: bool = True
    """Start from the checkpoint shipped with the package for this spec when there is one
    (sha256-checked), so every machine begins from the same weights; false trains one here."""

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

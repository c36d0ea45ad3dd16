"""The ``rollout`` section: how many answers per prompt, how they are sampled, by how many actors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RolloutConfig(BaseModel):
    """Generation settings shared by every rollout actor (and the synchronous trainer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts_per_step: int = Field(32, ge=1)
    """Prompts in one learner step (B); the step's samples are B x samples_per_prompt."""
    samples_per_prompt: int = Field(8, ge=2)
    """Answers generated per prompt (G); one sample would have no group baseline."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the learner scores with the same one."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling; behaviour log-probs are taken under the truncated distribution."""
    max_new_tokens: int = Field(5, ge=1)
    """Longest response in tokens."""
    num_actors: int = Field(1, ge=1)
    """Rollout actors sharing each step's prompts."""
    engine: Literal["hf"] = "hf"
    """Generation backend: ``hf`` (Hugging Face generate, CPU or GPU)."""

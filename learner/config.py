"""The learner's typed configuration. Unknown fields are errors, so a typo fails at load time."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.loss import POLICY_LOSSES, LossConfig, default_loss_config


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy_loss: Literal["grpo", "gspo"] = "grpo"
    # None takes the loss's own default (GRPO 0.2 / 0.28, GSPO 3e-4 / 4e-4).
    clip_low: float | None = Field(None, gt=0, lt=1)
    clip_high: float | None = Field(None, gt=0)
    aggregation: Literal["token-mean", "seq-mean-token-mean"] | None = None
    is_cap: float = Field(2.0, gt=0, description="C in the truncated IS weight min(pi_old/pi_behav, C)")
    kl_coef: float = Field(0.0, ge=0)

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)

    zero_stage: int = Field(1, ge=0, le=3)
    world_size: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA, off on CPU
    temperature: float = Field(1.0, gt=0, description="must equal the rollout temperature")
    # "compact": a no-grad pass for entropy and old log-probs, then the gradient pass only over
    # samples with a kept token, cut after their last kept token (DESIGN §5: where the token
    # level saves time). "full": one pass over everything, mask only.
    token_pass: Literal["compact", "full"] = "compact"
    entropy_chunk_rows: int = Field(1024, ge=1)
    # DeepSpeed compiles a shared-memory all-reduce op on first CPU start (~1 min). Gloo is
    # plenty for small models, so it is off unless asked for.
    cpu_shm_comm: bool = False
    dist_timeout_s: int = Field(600, ge=10)

    @model_validator(mode="after")
    def _known_loss(self) -> LearnerConfig:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss: unknown {self.policy_loss!r}")
        return self

    def loss_config(self) -> LossConfig:
        base = default_loss_config(self.policy_loss)
        return LossConfig(
            clip_low=self.clip_low if self.clip_low is not None else base.clip_low,
            clip_high=self.clip_high if self.clip_high is not None else base.clip_high,
            aggregation=self.aggregation or base.aggregation,
            is_cap=self.is_cap,
            kl_coef=self.kl_coef,
        )

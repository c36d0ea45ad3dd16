"""The learner's typed configuration. Unknown fields are errors, so a typo fails at load time."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.loss import GRPOLossConfig, LossConfig


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: LossConfig = Field(
        default_factory=GRPOLossConfig,
        description="the policy loss, chosen by `type` (grpo | gspo); each type has its own fields and defaults",
    )

    lr: float = Field(1e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2)")
    grad_clip: float = Field(
        1.0, gt=0, description="global gradient-norm clip applied before each optimizer step"
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="after warm-up: constant, or cosine decay to min_lr_ratio * lr at the last step",
    )
    warmup_steps: int = Field(
        0, ge=0, description="optimizer steps of linear warm-up from lr / warmup_steps to lr"
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="the cosine schedule's final lr as a fraction of lr"
    )

    zero_stage: int = Field(
        1, ge=0, le=3, description="DeepSpeed ZeRO stage (3 partitions the parameters)"
    )
    world_size: int = Field(1, ge=1, description="learner ranks (processes); one GPU each on CUDA")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available, else CPU"
    )
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 weights and activations; auto: on for CUDA, off on CPU"
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="the sampling temperature the log-probs are scored at; must equal the rollout's",
    )
    token_pass: Literal["compact", "full"] = Field(
        "compact",
        description="compact: the gradient pass runs only rows with a kept token, each micro-batch cut after its "
        "last kept position, so the token level saves learner time and not only tokens; full: the gradient pass "
        "runs every row to its end and the token level only masks the loss",
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="padded tokens (rows x padded width) per micro-batch forward, in both the no-grad pass and the "
        "gradient pass; gradients of all micro-batches accumulate into one optimizer step per batch. A row longer "
        "than the budget runs alone. None: each rank's shard is one micro-batch",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass instead of storing them (less memory, ~1/3 more compute)",
    )
    entropy_chunk_rows: int = Field(
        1024,
        ge=1,
        description="token positions per chunk when turning logits into log-probs and entropies ([chunk, V] at a time)",
    )
    cpu_shm_comm: bool = Field(
        False,
        description="DeepSpeed's shared-memory CPU all-reduce; it compiles a C++ op on first start (~1 min), and gloo "
        "is plenty for small models",
    )
    dist_timeout_s: int = Field(
        600, ge=10, description="timeout of the learner's collective operations, seconds"
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_policy_loss(cls, data: Any) -> Any:
        # Transitional: `policy_loss: gspo` (the flat form) becomes `loss: {type: gspo}` while
        # callers move to the typed loss section.
        if isinstance(data, dict) and "policy_loss" in data:
            data = dict(data)
            name = data.pop("policy_loss")
            loss = data.get("loss")
            if loss is None or isinstance(loss, dict):
                data["loss"] = {**(loss or {}), "type": name}
        return data

    @property
    def policy_loss(self) -> str:
        """The loss's registered name (read-only shortcut for ``loss.type``)."""
        return self.loss.type

"""The learner's typed configuration. Unknown fields are errors, so a typo fails at load time."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
)

from learner.loss import POLICY_LOSSES
from services.policy.lora import LoraConfig

Aggregation = Literal["token-mean", "seq-mean-token-mean"]


class LossConfigBase(BaseModel):
    """Settings every PPO-clip loss shares; each variant adds its own clip range and defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(description="the registered loss name; each variant narrows it to its own")
    is_cap: float = Field(
        2.0,
        gt=0,
        description="C in the truncated importance weight min(pi_old / pi_behav, C) that corrects for "
        "rollouts sampled by an older policy",
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="weight of a KL penalty to a frozen reference policy; only 0 is accepted (the "
        "learner keeps no reference model)",
    )

    @field_validator("kl_coef")
    @classmethod
    def _no_reference_model(cls, v: float) -> float:
        if v > 0:
            raise ValueError(
                f"got {v}; a KL penalty needs a frozen reference model, which this learner does not keep. "
                "Set kl_coef: 0 (the clip and the truncated IS weight bound the update instead)"
            )
        return v


class GRPOLossConfig(LossConfigBase):
    """Token-level PPO-clip (GRPO / DAPO-style asymmetric clip)."""

    type: Literal["grpo"] = Field("grpo", description="token-level PPO-clip")
    clip_low: float = Field(
        0.2, gt=0, lt=1, description="the token ratio is clipped below at 1 - clip_low"
    )
    clip_high: float = Field(
        0.28, gt=0, description="the token ratio is clipped above at 1 + clip_high"
    )
    aggregation: Aggregation = Field(
        "token-mean",
        description="token-mean: mean over all kept tokens of the batch; seq-mean-token-mean: mean "
        "over each sequence's kept tokens, then over sequences with a kept token",
    )


class GSPOLossConfig(LossConfigBase):
    """Sequence-level PPO-clip (GSPO): one length-normalised ratio per sequence."""

    type: Literal["gspo"] = Field("gspo", description="sequence-level PPO-clip")
    clip_low: float = Field(
        3e-4, gt=0, lt=1, description="the sequence ratio is clipped below at 1 - clip_low"
    )
    clip_high: float = Field(
        4e-4, gt=0, description="the sequence ratio is clipped above at 1 + clip_high"
    )


def _loss_type(v: Any) -> str | None:
    # A mapping without `type` means GRPO, so `--set learner.loss.clip_high=0.3` works alone.
    if isinstance(v, dict):
        return v.get("type", "grpo")
    return getattr(v, "type", None)


LossConfig = Annotated[
    Annotated[GRPOLossConfig, Tag("grpo")] | Annotated[GSPOLossConfig, Tag("gspo")],
    Discriminator(
        _loss_type,
        custom_error_type="loss_type",
        custom_error_message="unknown loss type; choose from 'grpo', 'gspo'",
    ),
]
"""Any registered loss's config, chosen by its ``type`` field."""


def default_loss_config(name: str) -> LossConfigBase:
    """The named loss's config with all its defaults."""
    if name not in _VARIANTS:
        raise ValueError(f"loss.type: unknown {name!r}; choose from {sorted(_VARIANTS)}")
    return _VARIANTS[name]()


_VARIANTS: dict[str, type[LossConfigBase]] = {"grpo": GRPOLossConfig, "gspo": GSPOLossConfig}
# Every registered loss has a config variant and every variant a loss.
assert set(_VARIANTS) == set(POLICY_LOSSES), (sorted(_VARIANTS), sorted(POLICY_LOSSES))


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
    packing: bool = Field(
        False,
        description="pack each micro-batch's rows end to end into shared rows (position_ids restart per row, "
        "attention kept within each row: transformers' packed-sequence masks, varlen with flash attention) "
        "instead of padding every row to the widest, so padding is not computed; the budget "
        "micro_batch_tokens then counts packed positions. The learner checks at start that the model keeps "
        "packed rows apart (same logits as padded) and refuses it otherwise. Off: rows are padded, "
        "longest first",
    )
    packing_row_tokens: int = Field(
        1024,
        ge=1,
        description="with packing: the most columns of a packed row (micro_batch_tokens if smaller; a longer row "
        "runs alone). Wider rows fill better, but sdpa and eager attention compute across the whole packed row "
        "(masked), so attention costs grow with it; flash attention's varlen kernel does not",
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
    lora: LoraConfig | None = Field(
        None,
        description="train a LoRA adapter on the frozen base model instead of the full model (rank, alpha, "
        "dropout, target_modules); weight syncs, checkpoints and exports then carry the adapter alone. "
        "None: full fine-tuning",
    )
    dist_timeout_s: int = Field(
        600, ge=10, description="timeout of the learner's collective operations, seconds"
    )

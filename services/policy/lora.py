"""LoRA adapters on the policy: their configuration, and the names they travel under.

With ``learner.lora`` set, the learner wraps the policy in a PEFT LoRA model whose base weights
are frozen, and a weight sync moves the adapter alone. The contract every side keeps (learner,
transports, HF engine, vLLM engine, checkpoints):

* A synced version is a flat ``{name: tensor}`` holding only the adapter's ``lora_A`` and
  ``lora_B`` weights, under PEFT's *saved* names (what ``peft.get_peft_model_state_dict`` gives,
  without the adapter name): ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
  These are also the keys of ``adapter_model.safetensors``, so vLLM and PEFT load them as is.
* The tensors are in the dtype the engines compute in (the learner casts them at publish time),
  never PEFT's float32 master copy next to a bf16 base.
* The adapter's shape is fixed for the run by :class:`LoraConfig`, which both sides read from the
  run config; a version carries tensors only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LoraConfig(BaseModel):
    """``learner.lora``: train a LoRA adapter instead of the full model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(16, ge=1, le=512, description="the adapter's rank r")
    alpha: float = Field(
        32.0, gt=0, description="the scale numerator: the update is (alpha / rank) * B @ A"
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the adapter's input while training (0: none)"
    )
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        min_length=1,
        description="names of the linear layers that get an adapter (module name suffixes, as PEFT "
        "matches them); the default is every attention and MLP projection of a Llama-style model",
    )

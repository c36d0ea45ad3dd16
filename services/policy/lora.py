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

import json
import re
from pathlib import Path
from typing import Any

import torch
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


# ---- the adapter on a model ------------------------------------------------------------------

#: PEFT's adapter name inside the model; the saved (wire) names leave it out.
ADAPTER = "default"
_IN_MODEL = re.compile(rf"\.(lora_[AB])\.{ADAPTER}\.weight$")


def peft_config(cfg: LoraConfig) -> Any:
    """``cfg`` as PEFT's ``LoraConfig`` for a causal LM (no bias, adapters on the named layers)."""
    import peft

    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_targets(model: torch.nn.Module, cfg: LoraConfig) -> None:
    """Raise ValueError naming ``learner.lora.target_modules`` when one of its entries matches
    no linear layer of ``model`` (as PEFT matches them: the module's name or its last parts)."""
    linear = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    ]
    unmatched = [t for t in cfg.target_modules if not any(_matches(n, t) for n in linear)]
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"learner.lora.target_modules: {unmatched} match no linear layer of "
            f"{type(model).__name__}; its linear layers are named {kinds}"
        )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """``model`` wrapped in a PEFT LoRA model: its base weights frozen (``requires_grad`` off),
    a fresh adapter (``lora_B`` zero, so the wrapped model computes what ``model`` did)."""
    import peft

    check_targets(model, cfg)
    return peft.get_peft_model(model, peft_config(cfg))


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (base plus adapter)."""
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def wire_name(param_name: str) -> str | None:
    """The saved name of an adapter parameter (``...q_proj.lora_A.weight``), None for any other
    parameter (the frozen base)."""
    if not _IN_MODEL.search(param_name):
        return None
    return _IN_MODEL.sub(r".\1.weight", param_name)


def param_name(wire: str) -> str:
    """The in-model name of the adapter tensor saved as ``wire``."""
    return re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{ADAPTER}.weight", wire)


def adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The live adapter parameters of a PEFT model under their wire names, in model order."""
    out = {}
    for name, p in model.named_parameters():
        wire = wire_name(name)
        if wire is not None:
            out[wire] = p
    return out


def synced_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a weight sync writes into ``model``, by the names a version carries (detached views
    of the live tensors): a PEFT model's adapter under its wire names, or every parameter and
    buffer of a full model (tied ones under each name)."""
    if is_lora(model):
        return {n: p.detach() for n, p in adapter_params(model).items()}
    targets = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    targets.update(model.named_buffers(remove_duplicate=False))
    return targets


def synced_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a whole version must have written: a PEFT model's adapter (the base is
    never synced), or every parameter of a full model."""
    return adapter_params(model) if is_lora(model) else dict(model.named_parameters())


def unloaded(model: torch.nn.Module, loaded: set[int]) -> list[str]:
    """The names of :func:`synced_params` whose storage (``data_ptr``) is not in ``loaded``."""
    return [n for n, p in synced_params(model).items() if p.data_ptr() not in loaded]


def load_synced(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a whole version into ``model`` in place (cast to its dtypes): a PEFT model's adapter
    (the base untouched); raises KeyError unless ``tensors`` names exactly the adapter."""
    targets = synced_state(model)
    if set(tensors) != set(targets):
        extra, lack = sorted(set(tensors) - set(targets)), sorted(set(targets) - set(tensors))
        raise KeyError(
            f"adapter tensors do not fit the model: unexpected {extra[:5]}, lacking {lack[:5]}"
        )
    with torch.no_grad():
        for name, t in tensors.items():
            targets[name].copy_(t)


def adapter_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the adapter (in ``dtype``, default each tensor's own)."""
    return sum(
        p.numel()
        * (p.element_size() if dtype is None else torch.empty(0, dtype=dtype).element_size())
        for p in adapter_params(model).values()
    )


# ---- the adapter on disk (PEFT format) ---------------------------------------------------------


def save_adapter_config(model: torch.nn.Module, directory: str | Path) -> None:
    """Write ``adapter_config.json`` of a PEFT model into ``directory`` (its base model's path
    in ``base_model_name_or_path``)."""
    model.peft_config[ADAPTER].save_pretrained(str(directory))


def base_path(adapter_dir: str | Path) -> Path:
    """The base model directory an adapter directory names (``base_model_name_or_path``)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir}: its base model {base!r} is not a model directory here; pass the "
            "base model directory (--policy)"
        )
    return Path(base)


def load_adapter_dir(
    adapter_dir: str | Path,
    dtype: torch.dtype | None = torch.float32,
    base: str | Path | None = None,
) -> torch.nn.Module:
    """Base plus the PEFT adapter saved in ``adapter_dir`` (eval mode), the base from ``base``
    or the directory the adapter names."""
    import peft
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    base_dir = Path(base) if base is not None else base_path(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()

"""A LoRA run's checkpoint as the adapter in PEFT's format, or merged into its base model.

A LoRA checkpoint holds the adapter alone (the frozen base is the model the run started from)
and the ``adapter_config.json`` the learner wrote beside it, which names the base.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from services.policy.lora import base_path, load_synced, wire_name

log = logging.getLogger(__name__)


def export_adapter(
    state: dict[str, torch.Tensor], tag_dir: Path, model_dir: Path, out: str | Path, merge: bool
) -> Path:
    """Write the adapter ``state`` (in-model names, from the checkpoint at ``tag_dir``) to
    ``out``: ``adapter_model.safetensors`` and ``adapter_config.json`` (loadable with
    ``PeftModel.from_pretrained``), or with ``merge`` the base with the adapter merged in (a
    plain model directory); the tokenizer either way.

    ``model_dir``: the base model directory, or an adapter directory naming it (the run's
    ``final_policy``); else the base the checkpoint's adapter config names.
    """
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (model_dir / "config.json").is_file():
        base_dir = model_dir
    else:
        base_dir = base_path(
            model_dir if (model_dir / "adapter_config.json").is_file() else tag_dir
        )
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, local_files_only=True, dtype=torch.float32
    )
    config = peft.PeftConfig.from_pretrained(str(tag_dir))
    config.base_model_name_or_path = str(base_dir)
    model = peft.get_peft_model(base, config)
    adapter = {wire_name(k): v for k, v in state.items() if wire_name(k) is not None}
    if len(adapter) != len(state):
        raise ValueError(f"{tag_dir}: the checkpoint holds tensors that are no LoRA adapter's")
    load_synced(model, adapter)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir, local_files_only=True).save_pretrained(out)
    log.info("exported the adapter of %s%s to %s", tag_dir, " merged" if merge else "", out)
    return out

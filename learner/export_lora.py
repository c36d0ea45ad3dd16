"""A LoRA run's checkpoint as the adapter in PEFT's format, or merged into its base model.

A LoRA checkpoint holds the adapter alone (the frozen base is the model the run started from)
and the ``adapter_config.json`` the learner wrote beside it, which names the base. Also the
learner's own adapter: its config for the weight transports (which write each version as a PEFT
directory) and the run's ``final_policy`` at any ZeRO stage.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.policy.lora import (
    base_path,
    is_lora,
    load_synced,
    save_adapter_config,
    wire_name,
)

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


def adapter_config(module: torch.nn.Module) -> dict[str, Any] | None:
    """The ``adapter_config.json`` PEFT writes for ``module``'s adapter, as a dict (None for a
    full model): what the weight transports write beside each version's tensors."""
    if not is_lora(module):
        return None
    with tempfile.TemporaryDirectory() as d:
        save_adapter_config(module, d)
        return json.loads((Path(d) / "adapter_config.json").read_text())


def save_final_adapter(engine: Any, tokenizer: Any, directory: str | Path) -> Path:
    """The learner's adapter in PEFT's format (``adapter_model.safetensors`` in float32 under
    PEFT's saved names, ``adapter_config.json``) and the tokenizer, into ``directory``.

    ``engine``: the learner engine (or rank 0's leader of several). The adapter comes from its
    :meth:`state_dict_cpu`, which gathers it under ZeRO-3 (on every rank); PEFT's own
    ``save_pretrained`` would write ZeRO-3's empty local shards."""
    sync_dtype = engine.sync_dtype
    engine.set_sync_dtype(torch.float32)  # the master copy, not the engines' rounding of it
    try:
        adapter = engine.state_dict_cpu()
    finally:
        engine.set_sync_dtype(sync_dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    save_adapter_config(engine.module, directory)
    tokenizer.save_pretrained(directory)
    return directory

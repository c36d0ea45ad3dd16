"""A learner checkpoint as a Hugging Face model directory, at any saved step and ZeRO stage.

``LearnerEngine.save_checkpoint`` writes DeepSpeed checkpoints: ``<checkpoints>/step<NNNNNNN>/``
(one tag per saved step, ``latest`` naming the newest) holding ``mp_rank_00_model_states.pt``
(the module's state dict; under ZeRO-3 only placeholders, since the parameters are partitioned)
and, under ZeRO 1-3, ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank with that rank's
fp32 partition. The weights are rebuilt from the fp32 partitions with DeepSpeed's consolidation
(``get_fp32_state_dict_from_zero_checkpoint``), so every stage exports the same full model;
without ZeRO files (stage 0) the module state dict is the model. The architecture and tokenizer
come from a model directory of the same policy (the run's ``final_policy`` or its start).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step(\d{7})$")


def checkpoint_steps(checkpoint_dir: str | Path) -> list[int]:
    """The steps saved in ``checkpoint_dir`` (ascending); empty if none."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if p.is_dir() and (m := _TAG.match(p.name)))


def checkpoint_tag(checkpoint_dir: str | Path, step: int | None = None) -> str:
    """The tag of ``step`` (None: the newest, as ``latest`` names it).

    Raises:
        FileNotFoundError: no checkpoint, or none at ``step`` (the message lists those saved).
    """
    d = Path(checkpoint_dir)
    steps = checkpoint_steps(d)
    if not steps:
        raise FileNotFoundError(f"{d}: no learner checkpoint (no step<NNNNNNN>/ directory)")
    if step is None:
        latest = d / "latest"
        return latest.read_text().strip() if latest.is_file() else f"step{steps[-1]:07d}"
    if step not in steps:
        raise FileNotFoundError(f"--step {step}: no checkpoint at that step in {d}; saved: {steps}")
    return f"step{step:07d}"


def consolidated_state_dict(
    checkpoint_dir: str | Path, step: int | None = None
) -> dict[str, torch.Tensor]:
    """The full fp32 weights saved at ``step`` (None: the newest), whatever the ZeRO stage.

    Returns:
        parameter name -> float32 CPU tensor, names as in the module's ``state_dict``.
    """
    d = Path(checkpoint_dir)
    tag = checkpoint_tag(d, step)
    lora = (d / tag / "adapter_config.json").is_file()  # the adapter alone was saved
    if list((d / tag).glob("zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The utility prints its progress; keep it out of a CLI's output.
        with contextlib.redirect_stdout(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(
                str(d), tag=tag, exclude_frozen_parameters=lora
            )
    else:
        saved = torch.load(
            d / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        state = saved["module"]
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def export_checkpoint(
    checkpoint_dir: str | Path,
    model_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    merge: bool = False,
) -> Path:
    """Write the policy saved at ``step`` as a Hugging Face directory ``out`` (safetensors,
    config, generation config, tokenizer), loadable with ``from_pretrained``.

    Args:
        checkpoint_dir: The run's ``checkpoints/`` directory.
        model_dir: A model directory of the same architecture (``config.json``) with its
            tokenizer: the run's ``final_policy`` or the policy it started from.
        out: Where to write (created; files of the same names are overwritten).
        step: The saved step; None: the newest.
        merge: a LoRA checkpoint is written as base plus adapter merged into a plain model
            directory; otherwise (the default) as the adapter alone in PEFT's format.

    Raises:
        FileNotFoundError: no such checkpoint or model directory.
        ValueError: the checkpoint's weights do not fit the architecture (names the keys).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir = Path(model_dir)
    tag_dir = Path(checkpoint_dir) / checkpoint_tag(checkpoint_dir, step)
    if (tag_dir / "adapter_config.json").is_file():
        from learner.export_lora import export_adapter

        return export_adapter(
            consolidated_state_dict(checkpoint_dir, step), tag_dir, model_dir, out, merge
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    state = consolidated_state_dict(checkpoint_dir, step)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied output layer is one tensor under two names; the checkpoint may carry only one.
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"checkpoint does not fit {model_dir}: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    if tied:
        model.tie_weights()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(out)
    log.info("exported %s (%s) to %s", checkpoint_dir, checkpoint_tag(checkpoint_dir, step), out)
    return out


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    """Whether parameter ``name`` shares its storage with another parameter of ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(other is target for k, other in params.items() if k != name)

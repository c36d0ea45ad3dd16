"""The tiny CPU policy: GPT-2 architecture from a config (no hub), plus HF-format save/load.

``load_policy`` is the path for every model, built-in or real: any local directory
``from_pretrained`` can read, with the tokenizer saved in it (``AutoTokenizer``; the built-in
policy's character tokenizer is a Hugging Face fast tokenizer too).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from services.policy.config import PolicySpec

logger = logging.getLogger(__name__)


def build_policy(spec: PolicySpec, tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 LM for ``tokenizer``'s vocabulary (float32, eval mode).

    Dropout is 0 everywhere: RL compares the learner's log-probs with the rollout engine's
    behaviour log-probs, and dropout in train mode would make them differ for no benefit at
    this scale. Initialisation depends only on ``seed`` (the global RNG is restored after).
    """
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def save_policy(model: torch.nn.Module, tokenizer, directory: str | Path) -> Path:
    """Write ``model`` (HF format, safetensors) and its tokenizer (``save_pretrained``, chat
    template included) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_policy(path: str | Path, dtype: torch.dtype | None = torch.float32):
    """Load ``(model, tokenizer)`` from a local HF-format directory (no network).

    Args:
        path: Directory with ``config.json`` and weights.
        dtype: Parameter dtype; float32 by default because the CPU path computes log-probs in
            it. ``None`` keeps what the checkpoint says.

    Returns:
        The causal LM in eval mode, and ``AutoTokenizer.from_pretrained(path)``.
    """
    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from services.policy.lora import load_adapter_dir

        return load_adapter_dir(path, dtype), load_tokenizer(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval(), load_tokenizer(path)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in the local model directory ``path`` (``AutoTokenizer``, no network),
    for a process that needs no model of its own (a vLLM rollout actor)."""
    return AutoTokenizer.from_pretrained(Path(path), local_files_only=True)


def num_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for batched generation.

    Returns:
        input_ids: int64 [B, L] with ``L = max len``, padding on the left.
        attention_mask: int64 [B, L], 0 on padding.
    """
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("left_pad needs a non-empty list of non-empty sequences")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask

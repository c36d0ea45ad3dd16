"""A tiny random-initialised Qwen2 causal LM, built from a config (no hub), for the vLLM engine
tests; the tokenizer (byte-level BPE with a Qwen-style chat template) is the full-vocabulary
model's, ``bench.full_vocab_model.build_tokenizer``, with its own small vocabulary."""

from __future__ import annotations

import torch

from bench.full_vocab_model import EOS, IM_END, IM_START, build_tokenizer, steer_head

__all__ = ["EOS", "IM_END", "IM_START", "build_llama", "build_model", "build_tokenizer"]

# Weights multiplied into the output projection: peaked next-token distributions, so greedy
# decoding has clear winners that float rounding in two implementations cannot flip.
HEAD_SCALE = 30.0


def build_model(tokenizer, seed: int = 0):
    """Two-layer Qwen2 (hidden 128, head dim 64, grouped KV heads), float32, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model.eval()


def build_llama(tokenizer, seed: int = 0, *, steered: bool = False):
    """Two-layer Llama, SmolLM2's architecture in miniature (the same vLLM model class and
    weight loader), float32. ``steered``: the head of ``bench.full_vocab_model.steer_head`` (every
    ordinary token equally likely, ``<|im_end|>`` likelier), untied from the embeddings, so
    responses end on the end-of-turn token at varied lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=not steered,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    if steered:
        steer_head(model, tokenizer)
    return model.eval()

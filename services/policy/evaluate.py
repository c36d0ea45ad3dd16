"""Held-out evaluation of a policy: the greedy accuracy every run reports per step."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from services.policy.model import left_pad
from services.policy.tokenizer import (
    decode_ids,
    default_stop_token_ids,
    encode_text,
    special_ids,
)
from services.tasks.base import Prompt
from services.tasks.verify import CORRECT_REWARD, resolve_verifier


@torch.no_grad()
def evaluate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int,
    batch_size: int = 512,
) -> float:
    """Fraction of greedy responses that earn full reward (verifier reward >= 1), as sampled
    responses are counted correct for pass@k: a verifier's partial credit (``gsm8k_format``'s
    credit for the format alone) is never accuracy.

    Each prompt is scored with the verifier ``prompt.task`` names; a response ends at the first
    stop token (EOS, or the chat template's end-of-turn) or after ``max_new_tokens``. Batched with left padding; the model's train/eval mode is restored.
    """
    if not prompts:
        raise ValueError("no prompts to evaluate")
    pad_id, _ = special_ids(tokenizer)
    stops = default_stop_token_ids(tokenizer)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stops
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, mask = left_pad([encode_text(tokenizer, p.text) for p in chunk], pad_id)
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for p, row in zip(chunk, out[:, ids.shape[1] :].tolist(), strict=True):
                ends = [i for i, t in enumerate(row) if t in stops]
                if ends:
                    row = row[: ends[0]]
                reward = resolve_verifier(p.task)(decode_ids(tokenizer, row), p.answer)
                total += 1.0 if reward >= CORRECT_REWARD else 0.0
    finally:
        model.train(was_training)
    return total / len(prompts)

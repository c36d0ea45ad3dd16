"""Held-out evaluation of a policy: the greedy accuracy every run reports per step."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from services.policy.model import left_pad
from services.policy.tokenizer import decode_ids, encode_text, special_ids
from services.tasks.base import Prompt
from services.tasks.verify import VERIFIERS


@torch.no_grad()
def evaluate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int,
    batch_size: int = 512,
) -> float:
    """Mean verifier reward of greedy responses (held-out accuracy for arithmetic).

    Each prompt is scored with ``VERIFIERS[prompt.task]``; a response ends at the first EOS or
    after ``max_new_tokens``. Batched with left padding; the model's train/eval mode is restored.
    """
    if not prompts:
        raise ValueError("no prompts to evaluate")
    pad_id, eos_id = special_ids(tokenizer)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id
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
                if eos_id in row:
                    row = row[: row.index(eos_id)]
                total += VERIFIERS[p.task](decode_ids(tokenizer, row), p.answer)
    finally:
        model.train(was_training)
    return total / len(prompts)

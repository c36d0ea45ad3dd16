"""Held-out evaluation of a policy: the greedy accuracy every run reports per step."""

from __future__ import annotations

from collections.abc import Callable, Mapping

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
from services.tasks.verify import CORRECT_REWARD, resolve_verifier, score_response


def evaluate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int,
    batch_size: int = 512,
    verifiers: Mapping[str, Callable] | None = None,
) -> float:
    """Fraction of greedy responses that earn full reward (verifier reward >= 1), as sampled
    responses are counted correct for pass@k: a verifier's partial credit (``gsm8k_format``'s
    credit for the format alone) is never accuracy. See :func:`greedy_correct`."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    correct = greedy_correct(model, tokenizer, prompts, max_new_tokens, batch_size, verifiers)
    return sum(correct) / len(prompts)


@torch.no_grad()
def greedy_correct(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int,
    batch_size: int = 512,
    verifiers: Mapping[str, Callable] | None = None,
) -> list[bool]:
    """Per prompt, whether its greedy response earns full reward (verifier reward >= 1).

    Each prompt is scored with the verifier ``prompt.task`` names (from ``verifiers`` when given,
    e.g. ``TaskSource.verifiers``, which also holds the keys a task registers: a reasoning-gym
    dataset's scorer), with its metadata when the verifier takes it; a response ends at the first
    stop token (EOS, or the chat template's end-of-turn) or after ``max_new_tokens``. Batched with
    left padding; the model's train/eval mode is restored.
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
    correct: list[bool] = []
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
                verify = verifiers[p.task] if verifiers is not None else resolve_verifier(p.task)
                reward = score_response(verify, p, decode_ids(tokenizer, row))
                correct.append(reward >= CORRECT_REWARD)
    finally:
        model.train(was_training)
    return correct

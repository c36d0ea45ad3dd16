"""Probe a starting policy: how it samples, which decides whether RL from it has signal."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from services.policy.evaluate import evaluate_greedy
from services.policy.model import left_pad
from services.policy.tokenizer import (
    decode_ids,
    default_stop_token_ids,
    encode_text,
    special_ids,
)
from services.tasks.base import Prompt
from services.tasks.verify import resolve_verifier


@dataclass(frozen=True)
class StartProbe:
    """How a policy samples on a prompt set: what decides whether RL from it has signal.

    Attributes:
        greedy_accuracy: Fraction of greedy responses with full reward.
        sample_accuracy: Fraction of temperature-1 samples with full reward (the expected
            training reward of a binary task at the first RL step).
        pass_at_k: Fraction of prompts with at least one correct sample among ``samples``.
        zero_variance_share: Fraction of prompts whose samples are all right or all wrong
            (groups GRPO cannot learn from).
        entropy: Mean next-token entropy (nats) over the sampled response tokens, EOS included.
        samples: Samples per prompt.
    """

    greedy_accuracy: float
    sample_accuracy: float
    pass_at_k: float
    zero_variance_share: float
    entropy: float
    samples: int


@torch.no_grad()
def probe_start(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int,
    samples: int = 8,
    seed: int = 0,
) -> StartProbe:
    """Greedy accuracy, then ``samples`` temperature-1 samples per prompt (seeded, so a probe
    is reproducible on one machine): their accuracy, pass@``samples``, the zero-variance share
    and the mean entropy of the distributions they were drawn from."""
    if not prompts:
        raise ValueError("no prompts to probe")
    greedy = evaluate_greedy(model, tokenizer, prompts, max_new_tokens)
    pad_id, _ = special_ids(tokenizer)
    stops = default_stop_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, mask = left_pad([encode_text(tokenizer, p.text) for p in prompts], pad_id)
    ids, mask = ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)
    torch.manual_seed(seed)
    try:
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=GenerationConfig(
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=stops,
                output_scores=True,
                return_dict_in_generate=True,
            ),
        )
    finally:
        model.train(was_training)
    rows = out.sequences[:, ids.shape[1] :].tolist()
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # [N, T, V]
    entropy = -(logp.exp() * logp).sum(-1)  # [N, T]
    valid = torch.zeros_like(entropy, dtype=torch.bool)
    correct = torch.zeros(len(rows), dtype=torch.bool)
    for i, row in enumerate(rows):
        ends = [j for j, t in enumerate(row) if t in stops]
        n = ends[0] + 1 if ends else len(row)
        valid[i, :n] = True
        prompt = prompts[i // samples]
        text = decode_ids(tokenizer, row[: n - 1] if ends else row)
        correct[i] = resolve_verifier(prompt.task)(text, prompt.answer) >= 1.0
    per_prompt = correct.view(len(prompts), samples).sum(1)
    return StartProbe(
        greedy_accuracy=greedy,
        sample_accuracy=correct.float().mean().item(),
        pass_at_k=(per_prompt > 0).float().mean().item(),
        zero_variance_share=((per_prompt == 0) | (per_prompt == samples)).float().mean().item(),
        entropy=entropy[valid].mean().item(),
        samples=samples,
    )

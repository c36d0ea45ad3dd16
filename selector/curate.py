"""Scored groups in, one curated batch out: advantages, sample-level D3S, packing for the learner.

Both the synchronous trainer and the selector service call ``curate``, so the on-policy
baseline and the asynchronous service select samples through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selector.presets import Preset, select_samples
from services.transport.schema import CuratedBatch, ScoredGroup


@dataclass
class CurateResult:
    batch: CuratedBatch | None  # None: nothing informative to train on (counted, not an error)
    stats: dict[str, float]


def batch_id_for(step: int) -> str:
    """The idempotency key of the batch for a learner step: one step, one batch."""
    return f"step-{step:07d}"


def curate(
    groups: list[ScoredGroup],
    preset: Preset,
    step: int,
    total_steps: int,
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
) -> CurateResult:
    """Select the samples of ``groups`` the learner will see at ``step``.

    All groups must have the same G. Returns the batch (rows: prompt + response, right-padded)
    and statistics: Var(A) over all rollouts and over the kept ones, counts of groups whose
    rewards were all equal, and the ratios used.
    """
    if not groups:
        raise ValueError("groups: need at least one scored group")
    sizes = {g.group_size for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"groups: all groups need the same samples_per_prompt, got sizes {sorted(sizes)}")
    sample_ratio, token_ratio = preset.ratios(step, total_steps)
    progress = preset.schedule.progress(step, total_steps)
    rewards = torch.from_numpy(np.stack([g.rewards for g in groups]).astype(np.float32))  # [B, G]
    keep, adv = select_samples(preset, rewards, sample_ratio, eps, generator)
    zero_var = (rewards == rewards[:, :1]).all(dim=1)
    kept_adv = adv[keep]
    stats = {
        "groups": float(len(groups)),
        "groups_zero_var": float(zero_var.sum()),
        "samples_before": float(rewards.numel()),
        "samples_kept": float(keep.sum()),
        "var_adv_before": float(adv.var(unbiased=False)),
        "var_adv_after": float(kept_adv.var(unbiased=False)) if kept_adv.numel() else 0.0,
        "reward_mean": float(rewards.mean()),
        "sample_ratio": sample_ratio,
        "token_ratio": token_ratio,
    }
    if not bool((kept_adv != 0).any()):
        return CurateResult(None, stats)

    rows = keep.nonzero().tolist()  # (group, sample) pairs, in group order
    width = max(len(groups[b].prompt) + int(groups[b].response_lengths[s]) for b, s in rows)
    n = len(rows)
    input_ids = np.zeros((n, width), dtype=np.int32)
    behav = np.zeros((n, width), dtype=np.float32)
    p_len = np.zeros(n, dtype=np.int32)
    s_len = np.zeros(n, dtype=np.int32)
    for i, (b, s) in enumerate(rows):
        g = groups[b]
        lp, lr = len(g.prompt), int(g.response_lengths[s])
        input_ids[i, :lp] = g.prompt
        input_ids[i, lp : lp + lr] = g.responses[s, :lr]
        behav[i, lp : lp + lr] = g.behav_logp[s, :lr]
        p_len[i], s_len[i] = lp, lp + lr
    batch = CuratedBatch(
        batch_id=batch_id_for(step),
        step=step,
        total_steps=total_steps,
        progress=progress,
        sample_ratio=sample_ratio,
        token_ratio=token_ratio,
        preset=preset.name,
        input_ids=input_ids,
        prompt_lengths=p_len,
        seq_lengths=s_len,
        behav_logp=behav,
        advantages=np.array([float(adv[b, s]) for b, s in rows], dtype=np.float32),
        rewards=np.array([float(rewards[b, s]) for b, s in rows], dtype=np.float32),
        policy_versions=np.array([groups[b].policy_version for b, _ in rows], dtype=np.int32),
        group_ids=[g.group_id for g in groups],
        stats=stats,
    )
    return CurateResult(batch, stats)

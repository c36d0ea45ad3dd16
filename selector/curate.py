"""Scored groups in, the kept rows of one learner step out: advantages, sample-level D3S, packing.

Both the synchronous trainer and the selector service call :func:`curate`, so the on-policy
baseline and the asynchronous service select samples through the same code. Groups are anything
shaped like a scored group (:class:`GroupLike`); the kept rows are
:class:`~services.transport.records.CuratedRows`, the row schema the wire record and the
learner share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from selector.presets import Preset, select_samples
from services.common.metric_names import source_suffix
from services.transport.records import CuratedRows


class GroupLike(Protocol):
    """G scored rollouts of one prompt (shapes as in the groups stream). A ``source``
    attribute (the prompt's source, as on a scored group) is read where present."""

    group_id: str
    policy_version: int
    prompt: np.ndarray  # int32 [P]
    responses: np.ndarray  # int32 [G, T]
    response_lengths: np.ndarray  # int32 [G]
    behav_logp: np.ndarray  # float32 [G, T]
    rewards: np.ndarray  # float32 [G]

    @property
    def group_size(self) -> int: ...


@dataclass(frozen=True)
class CurateResult:
    """The kept rows (None: every kept advantage is zero, nothing to learn from) and statistics."""

    rows: CuratedRows | None
    stats: dict[str, float]
    progress: float
    sample_ratio: float
    token_ratio: float


def batch_id_for(step: int) -> str:
    """The idempotency key of the batch for a learner step: one step, one batch."""
    return f"step-{step:07d}"


def curate(
    groups: list[GroupLike],
    preset: Preset,
    step: int,
    total_steps: int,
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
) -> CurateResult:
    """Select the samples of ``groups`` the learner will see at ``step``.

    All groups must have the same G. Statistics: Var(A) over all rollouts and over the kept
    ones, the L2 norm of the advantages of both, the groups whose rewards were all equal, and
    the ratios used.
    """
    if not groups:
        raise ValueError("groups: need at least one scored group")
    sizes = {g.group_size for g in groups}
    if len(sizes) != 1:
        raise ValueError(
            f"groups: all groups need the same samples_per_prompt, got sizes {sorted(sizes)}"
        )
    sample_ratio, token_ratio = preset.ratios(step, total_steps)
    progress = preset.schedule.progress(step, total_steps)
    # float64: advantages of large (but finite float32) rewards must not overflow.
    rewards = torch.from_numpy(np.stack([g.rewards for g in groups]).astype(np.float64))  # [B, G]
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
        # The L2 norms of the advantages: the policy gradient is a sum of per-sample gradients
        # weighted by A_i, so these bound its size (with Var(A), the paper's mechanism).
        "adv_norm_before": float(adv.norm()),
        "adv_norm_kept": float(kept_adv.norm()) if kept_adv.numel() else 0.0,
        "reward_mean": float(rewards.mean()),
        "sample_ratio": sample_ratio,
        "token_ratio": token_ratio,
    }
    stats.update(source_stats(groups, rewards, zero_var))
    rows = _pack(groups, keep, adv, rewards) if bool((kept_adv != 0).any()) else None
    return CurateResult(rows, stats, progress, sample_ratio, token_ratio)


def source_stats(
    groups: list[GroupLike], rewards: torch.Tensor, zero_var: torch.Tensor
) -> dict[str, float]:
    """Per source, when the groups come from two sources or more: the mean reward
    (``reward_mean/src:<source>``) and the share of its groups whose rewards were all equal
    (``zero_var_share/src:<source>``); nothing for one source, whose numbers are the step's.

    Args:
        groups: the step's groups; a group's source is its ``source`` ("" or none: left out).
        rewards: [B, G] their rewards.
        zero_var: [B] bool, the groups whose rewards were all equal.
    """
    rows: dict[str, list[int]] = {}
    for b, g in enumerate(groups):
        source = getattr(g, "source", "")
        if source:
            # Keyed by the metric name's suffix: sources it writes alike are one series.
            rows.setdefault(source_suffix(source), []).append(b)
    if len(rows) < 2:
        return {}
    out: dict[str, float] = {}
    for suffix, idx in sorted(rows.items()):
        out[f"reward_mean{suffix}"] = float(rewards[idx].mean())
        out[f"zero_var_share{suffix}"] = float(zero_var[idx].double().mean())
    return out


def _pack(
    groups: list[GroupLike], keep: torch.Tensor, adv: torch.Tensor, rewards: torch.Tensor
) -> CuratedRows:
    kept = keep.nonzero().tolist()  # (group, sample) pairs, in group order
    width = max(len(groups[b].prompt) + int(groups[b].response_lengths[s]) for b, s in kept)
    n = len(kept)
    input_ids = np.zeros((n, width), dtype=np.int32)
    behav = np.zeros((n, width), dtype=np.float32)
    p_len = np.zeros(n, dtype=np.int32)
    s_len = np.zeros(n, dtype=np.int32)
    for i, (b, s) in enumerate(kept):
        g = groups[b]
        lp, lr = len(g.prompt), int(g.response_lengths[s])
        input_ids[i, :lp] = g.prompt
        input_ids[i, lp : lp + lr] = g.responses[s, :lr]
        behav[i, lp : lp + lr] = g.behav_logp[s, :lr]
        p_len[i], s_len[i] = lp, lp + lr
    return CuratedRows(
        input_ids=input_ids,
        prompt_lengths=p_len,
        seq_lengths=s_len,
        behav_logp=behav,
        advantages=np.array([float(adv[b, s]) for b, s in kept], dtype=np.float32),
        rewards=np.array([float(rewards[b, s]) for b, s in kept], dtype=np.float32),
        policy_versions=np.array([groups[b].policy_version for b, _ in kept], dtype=np.int32),
    )

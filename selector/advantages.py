"""Group-normalised advantages (GRPO) and the PODS re-normalisation after selection.

Shapes: B groups (prompts) of G rollouts each.
"""

from __future__ import annotations

import torch

from selector._checks import check_dim, check_finite, require

DEFAULT_EPS = 1e-6


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 has 8 mantissa bits: a group mean of 16 rewards is already inexact there.
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Which groups have no reward variance (every reward of the group exactly equal).

    Args:
        rewards: [B, G] rewards.
    Returns:
        flat: [B] bool; such a group's advantages are all zero (:func:`group_advantages`).
    """
    check_dim(rewards, 2, "rewards")
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(rewards: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) per group, population std (ddof=0).

    Args:
        rewards: [B, G] rewards, any floating dtype, finite.
        eps: added to the std; must be > 0.
    Returns:
        adv: [B, G] in float32 (float64 if the input is float64). A group whose rewards are all
        equal gets exactly zero advantages (not eps-scaled rounding noise).
    """
    check_dim(rewards, 2, "rewards")
    check_finite(rewards, "rewards")
    require(eps > 0, "eps", f"must be > 0, got {eps!r}")
    r = rewards.to(_work_dtype(rewards.dtype))
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    adv = (r - mean) / (std + eps)
    # Exact zeros: with r = 0.1 everywhere, r - mean is ~1e-17, and /eps would turn it into noise.
    flat = flat_groups(r).unsqueeze(1)
    return torch.where(flat, torch.zeros_like(adv), adv)


def renormalized_advantages(
    rewards: torch.Tensor, keep: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """PODS behaviour: advantages recomputed from the kept rollouts of each group only.

    Args:
        rewards: [B, G] rewards.
        keep: [B, G] bool, the selected rollouts.
    Returns:
        adv: [B, G]; kept entries normalised with their group's kept mean and population std,
        dropped entries 0. A group with fewer than two kept rollouts, or equal kept rewards, is 0.
    """
    check_dim(rewards, 2, "rewards")
    check_finite(rewards, "rewards")
    require(
        keep.shape == rewards.shape,
        "keep",
        f"shape {tuple(keep.shape)} != rewards {tuple(rewards.shape)}",
    )
    require(keep.dtype == torch.bool, "keep", f"must be bool, got {keep.dtype}")
    r = rewards.to(_work_dtype(rewards.dtype))
    w = keep.to(r.dtype)
    n = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (r * w).sum(dim=1, keepdim=True) / n
    var = (((r - mean) * w) ** 2).sum(dim=1, keepdim=True) / n
    adv = (r - mean) / (var.sqrt() + eps) * w
    big = torch.finfo(r.dtype).max
    lo = torch.where(keep, r, torch.full_like(r, big)).amin(dim=1, keepdim=True)
    hi = torch.where(keep, r, torch.full_like(r, -big)).amax(dim=1, keepdim=True)
    flat = lo >= hi
    return torch.where(flat, torch.zeros_like(adv), adv)

"""Argument checks shared by the pure core. Every failure is a ValueError naming the argument."""

from __future__ import annotations

import torch


def require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")


def check_ratio(value: float, name: str) -> float:
    """Keep ratios live in (0, 1]: a ratio of 0 would train on nothing."""
    value = float(value)
    require(value == value and 0.0 < value <= 1.0, name, f"must be in (0, 1], got {value!r}")
    return value


def check_dim(t: torch.Tensor, dim: int, name: str) -> None:
    require(isinstance(t, torch.Tensor), name, f"must be a torch.Tensor, got {type(t).__name__}")
    require(t.dim() == dim, name, f"must have {dim} dimension(s), got shape {tuple(t.shape)}")


def check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point():
        require(bool(torch.isfinite(t).all()), name, "contains NaN or infinite values")

"""Sample-level down-sampling: keep the rollouts whose advantages have the largest variance.

For n values and a subset size m, a maximum-variance subset is always "the k largest plus the
m - k smallest" for some k in 0..m (Xu et al. 2025, PODS). So one stable sort and a scan over k
with prefix sums of x and x^2 is exact, O(n log n), and runs batched with no Python loop.

Tie-breaking is deterministic: values are sorted stably (equal values keep index order), and
among splits k of equal variance the smallest k wins.
"""

from __future__ import annotations

import torch

from selector._checks import check_dim, check_finite, require


def _check_count(m: int, n: int, name: str) -> int:
    require(
        isinstance(m, int) and not isinstance(m, bool),
        name,
        f"must be an int, got {type(m).__name__}",
    )
    require(0 <= m <= n, name, f"must be in [0, {n}], got {m}")
    return m


def _max_variance_rows(values: torch.Tensor, m: int) -> torch.Tensor:
    """Row-wise max-variance subset of size m.

    Args:
        values: [R, n] finite values.
        m: subset size, 0 <= m <= n.
    Returns:
        keep: [R, n] bool with exactly m True per row.
    """
    rows, n = values.shape
    if m == 0:
        return torch.zeros(rows, n, dtype=torch.bool, device=values.device)
    if m == n:
        return torch.ones(rows, n, dtype=torch.bool, device=values.device)
    # float64 and centred: the scan compares variances that can differ in the 10th digit.
    x = values.to(torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    xs, order = torch.sort(x, dim=1, stable=True)
    zero = xs.new_zeros(rows, 1)
    p1 = torch.cat([zero, xs.cumsum(dim=1)], dim=1)  # [R, n+1]
    p2 = torch.cat([zero, (xs * xs).cumsum(dim=1)], dim=1)
    k = torch.arange(m + 1, device=values.device)  # k largest + (m - k) smallest
    s1 = p1[:, m - k] + p1[:, n : n + 1] - p1[:, n - k]  # [R, m+1]
    s2 = p2[:, m - k] + p2[:, n : n + 1] - p2[:, n - k]
    var = s2 / m - (s1 / m) ** 2
    best = var.argmax(dim=1, keepdim=True)  # first maximum: smallest k on ties
    pos = torch.arange(n, device=values.device).unsqueeze(0)
    keep_sorted = (pos < (m - best)) | (pos >= (n - best))
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def max_variance_subset(values: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of the size-m subset of ``values`` with the largest population variance.

    Args:
        values: [n] finite floating values.
        m: subset size, 0 <= m <= n.
    Returns:
        indices: [m] int64, ascending.
    """
    check_dim(values, 1, "values")
    check_finite(values, "values")
    _check_count(m, values.shape[0], "m")
    keep = _max_variance_rows(values.unsqueeze(0), m)[0]
    return torch.nonzero(keep, as_tuple=False).flatten()


def select_intra(adv: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Per group, keep the n_keep rollouts of maximum advantage variance (D1S, D3S-I, PODS).

    Args:
        adv: [B, G] advantages.
        n_keep: rollouts kept per group, 0 <= n_keep <= G.
    Returns:
        keep: [B, G] bool, n_keep True per row.
    """
    check_dim(adv, 2, "adv")
    check_finite(adv, "adv")
    _check_count(n_keep, adv.shape[1], "n_keep")
    return _max_variance_rows(adv, n_keep)


def select_cross(adv: torch.Tensor, n_keep_total: int) -> torch.Tensor:
    """Pool all B x G advantages and keep the n_keep_total of maximum variance (D1S-Cross, D3S).

    Zero-variance groups have A = 0, the middle of the pooled distribution, so they go first.

    Args:
        adv: [B, G] advantages.
        n_keep_total: rollouts kept in the whole batch, 0 <= n_keep_total <= B * G.
    Returns:
        keep: [B, G] bool with n_keep_total True in all.
    """
    check_dim(adv, 2, "adv")
    check_finite(adv, "adv")
    _check_count(n_keep_total, adv.numel(), "n_keep_total")
    return _max_variance_rows(adv.reshape(1, -1), n_keep_total).reshape(adv.shape)


def select_random(
    shape: tuple[int, int], n_keep_total: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniformly random subset of n_keep_total rollouts: the control for the `random` preset.

    Returns:
        keep: [B, G] bool with n_keep_total True in all.
    """
    b, g = shape
    _check_count(n_keep_total, b * g, "n_keep_total")
    perm = torch.randperm(b * g, generator=generator)
    keep = torch.zeros(b * g, dtype=torch.bool)
    keep[perm[:n_keep_total]] = True
    return keep.reshape(b, g)

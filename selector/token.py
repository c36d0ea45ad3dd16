"""Token-level down-sampling: keep the top ceil(K * T) valid tokens by a score, |A_i| x H_{i,t}
by default (the paper's criterion); ``H`` alone (high-entropy "forking" tokens, as in the 80/20
study) and ``|A|`` alone (the sample's advantage for every one of its tokens) are the alternatives.

H is the detached entropy of the current policy at each response position (see
``learner.logits.logprobs_and_entropy``), so this runs in the learner, after its forward pass.

Ties are broken by position (earlier flat index first) so the mask is a function of the inputs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from selector._checks import check_dim, check_ratio, require

Pool = Literal["batch", "sequence"]
TokenScore = Literal["adv_entropy", "entropy", "adv"]
TOKEN_SCORES: tuple[str, ...] = ("adv_entropy", "entropy", "adv")


def keep_count(keep_ratio: float, total: int) -> int:
    """ceil(K * T) without float noise: 0.2 * 10 is 2.0000000000000004, which must give 2."""
    return min(total, math.ceil(round(keep_ratio * total, 6)))


def token_scores(
    adv: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    score: TokenScore = "adv_entropy",
) -> torch.Tensor:
    """The ranking score of every token in float32, -inf at padding.

    Args:
        adv: [N] advantage of each sample.
        entropy: [N, T] detached entropy at each response position.
        response_mask: [N, T] bool, True at valid response tokens.
        score: ``adv_entropy``: |A_i| x H_{i,t}; ``entropy``: H_{i,t}; ``adv``: |A_i| (every
            token of a sample ties, so the earliest positions of the largest-|A| samples win).
    Returns:
        [N, T] float32.
    """
    require(score in TOKEN_SCORES, "score", f"must be one of {TOKEN_SCORES}, got {score!r}")
    a = adv.detach().abs().to(torch.float32).unsqueeze(1)  # [N, 1]
    h = entropy.detach().to(torch.float32)  # [N, T]
    if score == "adv_entropy":
        out = a * h
    elif score == "entropy":
        out = h.clone()
    else:
        out = a.expand_as(h).clone()
    return out.masked_fill(~response_mask, float("-inf"))


def _top_count_batch(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Exactly n_keep True at the largest scores of the whole [N, T] tensor, earliest on ties.

    A selection (kthvalue) and one cumsum instead of a full sort: O(NT), cheaper than sorting.
    """
    flat = score.reshape(-1)
    total = flat.numel()
    if n_keep == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thr = torch.kthvalue(flat, total - n_keep + 1).values
    above = flat > thr
    tied = flat == thr
    need = n_keep - above.sum()
    keep = above | (tied & (tied.cumsum(0) <= need))
    return keep.reshape(score.shape)


def _top_count_rows(score: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """Per row i, n_keep[i] True at its largest scores, earliest position on ties. [N, T], [N]."""
    _, order = torch.sort(score, dim=1, descending=True, stable=True)
    rank_ok = torch.arange(score.shape[1], device=score.device).unsqueeze(0) < n_keep.unsqueeze(1)
    return torch.zeros_like(rank_ok).scatter(1, order, rank_ok)


def token_mask(
    adv: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    keep_ratio: float,
    pool: Pool = "batch",
    score: TokenScore = "adv_entropy",
) -> torch.Tensor:
    """Mask of the tokens the loss keeps: top ceil(K * T) by ``score`` among valid tokens.

    Args:
        adv: [N] advantage of each (kept) sample.
        entropy: [N, T] detached entropy of the current policy at each response position.
        response_mask: [N, T] bool, True at valid response tokens.
        keep_ratio: K in (0, 1]; K = 1 keeps every valid token.
        pool: "batch" ranks all valid tokens of the batch together (T = their count);
            "sequence" ranks within each response (T_i = its valid length).
        score: the ranking criterion (see :func:`token_scores`), |A| x entropy by default.
    Returns:
        mask: [N, T] bool, a subset of response_mask. Padding is never kept.
    """
    check_dim(adv, 1, "adv")
    check_dim(entropy, 2, "entropy")
    check_dim(response_mask, 2, "response_mask")
    require(
        response_mask.dtype == torch.bool,
        "response_mask",
        f"must be bool, got {response_mask.dtype}",
    )
    require(
        entropy.shape == response_mask.shape,
        "entropy",
        f"shape {tuple(entropy.shape)} != response_mask {tuple(response_mask.shape)}",
    )
    require(
        adv.shape[0] == entropy.shape[0],
        "adv",
        f"length {adv.shape[0]} != number of rows in entropy {entropy.shape[0]}",
    )
    require(pool in ("batch", "sequence"), "pool", f"must be 'batch' or 'sequence', got {pool!r}")
    require(score in TOKEN_SCORES, "score", f"must be one of {TOKEN_SCORES}, got {score!r}")
    keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    require(bool(torch.isfinite(adv).all()), "adv", "contains NaN or infinite values")
    require(
        not bool((~torch.isfinite(entropy) & response_mask).any()),
        "entropy",
        "contains NaN or infinite values at valid tokens",
    )
    if keep_ratio == 1.0:
        return response_mask.clone()
    ranked = token_scores(adv, entropy, response_mask, score)
    if pool == "batch":
        n_valid = int(response_mask.sum())
        return _top_count_batch(ranked, keep_count(keep_ratio, n_valid))
    lengths = response_mask.sum(dim=1).to(torch.float64)
    n_keep = torch.ceil(torch.round(keep_ratio * lengths, decimals=6)).to(torch.long)
    return _top_count_rows(ranked, n_keep)


def random_token_mask(
    response_mask: torch.Tensor,
    keep_ratio: float,
    pool: Pool = "batch",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The `random` preset's control: the same number of tokens as token_mask, chosen uniformly."""
    check_dim(response_mask, 2, "response_mask")
    keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    noise = torch.rand(response_mask.shape, generator=generator).to(response_mask.device)
    ones = torch.ones(response_mask.shape[0], device=response_mask.device)
    return token_mask(ones, noise, response_mask, keep_ratio, pool, "adv_entropy")

"""Per-token log-probs and entropies from a causal LM's logits, without an extra [N, T, V] copy.

Real vocabularies have ~150k entries: a float32 softmax of the whole [N, T, V] tensor is several
GB. Both quantities are computed over row chunks, so peak extra memory is [chunk, V].
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 1024


def logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(label_t | <t) with gradient, and the (detached) entropy of pi(. | <t).

    Args:
        logits: [N, T, V] logits whose position t predicts labels[:, t].
        labels: [N, T] int token ids (any value at padding; mask later).
        temperature: the sampling temperature; the learner must score the same distribution the
            rollout engine sampled from.
    Returns:
        logp: [N, T] float32, differentiable w.r.t. logits.
        entropy: [N, T] float32, detached; None if with_entropy is False.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits/labels: expected [N, T, V] and [N, T], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    n, t, v = logits.shape
    flat = logits.reshape(n * t, v)
    flat_labels = labels.reshape(n * t, 1).long()
    logps, ents = [], []
    for start in range(0, n * t, chunk_rows):
        x = flat[start : start + chunk_rows].float()
        if temperature != 1.0:
            x = x / temperature
        lse = torch.logsumexp(x, dim=-1)
        logps.append(x.gather(1, flat_labels[start : start + chunk_rows]).squeeze(1) - lse)
        if with_entropy:
            with torch.no_grad():
                # H = logsumexp(x) - sum softmax(x) * x
                ents.append(lse.detach() - (torch.softmax(x.detach(), dim=-1) * x.detach()).sum(-1))
    logp = torch.cat(logps).reshape(n, t) if logps else logits.new_zeros(n, t, dtype=torch.float32)
    if not with_entropy:
        return logp, None
    ent = torch.cat(ents).reshape(n, t) if ents else logp.detach().new_zeros(n, t)
    return logp, ent


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Detached entropy [N, T] of the next-token distributions in logits [N, T, V], chunked."""
    n, t, v = logits.shape
    flat = logits.detach().reshape(n * t, v)
    out = []
    with torch.no_grad():
        for start in range(0, n * t, chunk_rows):
            x = flat[start : start + chunk_rows].float()
            out.append(torch.logsumexp(x, -1) - (torch.softmax(x, -1) * x).sum(-1))
    return torch.cat(out).reshape(n, t) if out else flat.new_zeros(n, t, dtype=torch.float32)

"""Per-token log-probs and entropies from a causal LM's logits, without a float32 [N, T, V] copy.

Real vocabularies have ~150k entries: a float32 softmax of a whole [N, T, V] tensor is several
GB, and autograd through ``logits.float()`` would keep such a copy alive until backward. Here
both directions work over row chunks: the forward keeps only the logits (in their own dtype)
and one log-normaliser per position, and the backward recomputes the softmax chunk by chunk,
so the extra memory at any time is [chunk, V] float32.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 1024


def _tempered(x: torch.Tensor, temperature: float) -> torch.Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> float32, float64 stays
    return x / temperature if temperature != 1.0 else x


class _TokenLogProb(torch.autograd.Function):
    """logp [R] of labels [R] under softmax(logits [R, V] / temperature), and entropy [R]."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk_rows, with_entropy):
        rows = logits.shape[0]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.empty(rows, dtype=dtype, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for s in range(0, rows, chunk_rows):
            x = _tempered(logits[s : s + chunk_rows], temperature)
            z = torch.logsumexp(x, dim=-1)
            lse[s : s + chunk_rows] = z
            logp[s : s + chunk_rows] = x.gather(1, labels[s : s + chunk_rows, None]).squeeze(1) - z
            if with_entropy:
                # H = logsumexp(x) - sum softmax(x) * x, the softmax as exp(x - z) from the z
                # already computed (torch.softmax would reduce max and sum over V again)
                p = torch.exp(x - z[:, None])
                ent[s : s + chunk_rows] = z - p.mul_(x).sum(-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        logits, labels, lse = ctx.saved_tensors
        if grad_logp is None:
            return None, None, None, None, None
        t, chunk = ctx.temperature, ctx.chunk_rows
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            x = _tempered(logits[s : s + chunk], t)
            g = grad_logp[s : s + chunk, None].to(x.dtype)
            # d logp / d x = onehot(label) - softmax(x); d x / d logits = 1 / temperature
            d = torch.exp(x - lse[s : s + chunk, None]).mul_(-g)
            d.scatter_add_(1, labels[s : s + chunk, None], g)
            grad[s : s + chunk] = d.div_(t) if t != 1.0 else d
        return grad, None, None, None, None


def logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(label_t | <t) with gradient, and the (detached) entropy of pi(. | <t).

    Args:
        logits: [N, T, V] logits (any float dtype) whose position t predicts labels[:, t].
        labels: [N, T] int token ids (any valid id at padding; mask later).
        temperature: the sampling temperature; the learner must score the same distribution the
            rollout engine sampled from.
        chunk_rows: positions per chunk; each chunk makes one [chunk_rows, V] float32 temporary.
    Returns:
        logp: [N, T] float32 (float64 for float64 logits), differentiable w.r.t. logits.
        entropy: [N, T] like logp, detached; None if with_entropy is False.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits/labels: expected [N, T, V] and [N, T], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    n, t, v = logits.shape
    flat = logits.reshape(n * t, v)
    flat_labels = labels.reshape(n * t).long()
    logp, ent = _TokenLogProb.apply(
        flat, flat_labels, float(temperature), int(chunk_rows), with_entropy
    )
    return logp.reshape(n, t), ent.reshape(n, t) if with_entropy else None

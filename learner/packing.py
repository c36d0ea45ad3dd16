"""Sequence packing: several rows end to end in one input row, each with positions from 0.

Hugging Face causal LMs (transformers 5.x) read a forward with ``position_ids`` and no
attention mask as packed: every restart of the positions begins a new sequence, and the causal
mask becomes block-diagonal (a varlen kernel with flash attention, a block mask with sdpa and
eager). Each token then sees exactly the tokens it sees in its own padded row, so log-probs and
gradients match the padded forward's up to float rounding, without computing padding.
Whether a model honours this is checked, not assumed: :func:`packing_mismatch`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from learner.batch import PackLayout


def pack_rows(
    input_ids: torch.Tensor, pack: PackLayout, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed input of rows ``input_ids`` [m, >= width] laid out by ``pack``.

    Returns:
        ids, position_ids: [n_bins, pack.width]; padding at a packed row's tail gets token 0 at
            position 0, so each padding token is a sequence of its own and touches no row.
        index: [m, width - 1], the flat packed position of row j's column t (its shifted target
            t + 1 is the next packed position); valid: [m, width - 1], t < lengths[j] - 1.
    """
    dev = input_ids.device
    m = input_ids.shape[0]
    cols = torch.arange(width, device=dev).expand(m, width)
    bins, offsets, lengths = (x.to(dev) for x in (pack.bins, pack.offsets, pack.lengths))
    dest = bins[:, None] * pack.width + offsets[:, None] + cols
    real = cols < lengths[:, None]
    flat_ids = input_ids.new_zeros(pack.n_bins * pack.width)
    flat_pos = torch.zeros_like(flat_ids)
    flat_ids[dest[real]] = input_ids[:, :width][real]
    flat_pos[dest[real]] = cols[real]
    shape = (pack.n_bins, pack.width)
    valid = cols[:, :-1] < (lengths[:, None] - 1)
    index = torch.where(valid, dest[:, :-1], 0)
    return flat_ids.view(shape), flat_pos.view(shape), index, valid


def packing_mismatch(forward: Callable[..., torch.Tensor], vocab_size: int, device) -> float:
    """Largest |logit| difference, relative to the largest logit (at least 1), between two short
    sequences run packed in one row and run padded; ``forward(**inputs)`` returns logits.

    A model whose attention ignores the position restarts (or whose forward derives positions
    from an attention mask) lets the second sequence see the first, and differs by far more
    than float rounding.
    """
    lengths = (3, 5)
    ids = (torch.arange(sum(lengths), device=device) * 7 % max(vocab_size - 1, 1)) + 1
    rows = torch.split(ids, lengths)
    padded = torch.zeros(len(rows), max(lengths), dtype=torch.long, device=device)
    mask = torch.zeros_like(padded)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
        mask[i, : len(r)] = 1
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    with torch.no_grad():
        ref = forward(input_ids=padded, attention_mask=mask, use_cache=False).float()
        got = forward(input_ids=ids[None], position_ids=pos[None], use_cache=False).float()[0]
    ref_rows = torch.cat([ref[i, :n] for i, n in enumerate(lengths)])
    scale = max(1.0, float(ref_rows.abs().max()))
    return float((got - ref_rows).abs().max()) / scale

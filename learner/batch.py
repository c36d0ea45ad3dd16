"""The learner's input: kept samples as prompt+response rows, the views the loss needs, and the
split into micro-batches by a padded-token budget (rows padded to a common width, or packed
end to end into shared rows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from itertools import accumulate

import numpy as np
import torch

from services.transport.records import CuratedRows


@dataclass
class LearnerBatch:
    """N samples, right-padded to width L. Response tokens of row i sit at [prompt_len_i, seq_len_i).

    input_ids: [N, L] int64; prompt_lengths, seq_lengths: [N] int64;
    behav_logp: [N, L] float32, the rollout engine's log-prob of the token at each position
    (0 at prompt and padding); advantages: [N] float32.

    The fields are those of the row schema (:class:`~services.transport.records.CuratedRows`)
    the learner trains on, under the same names: for the learner to use a new per-row field,
    name it here too; :meth:`from_rows`, :meth:`rows` and :meth:`to` carry every field.
    """

    input_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    seq_lengths: torch.Tensor
    behav_logp: torch.Tensor
    advantages: torch.Tensor

    def __post_init__(self) -> None:
        n, width = self.input_ids.shape
        for name in ("prompt_lengths", "seq_lengths", "advantages"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name}: expected [{n}], got {tuple(getattr(self, name).shape)}")
        if self.behav_logp.shape != (n, width):
            raise ValueError(
                f"behav_logp: expected [{n}, {width}], got {tuple(self.behav_logp.shape)}"
            )
        if (
            bool((self.prompt_lengths < 1).any())
            or bool((self.seq_lengths > width).any())
            or bool((self.seq_lengths < self.prompt_lengths).any())
        ):
            raise ValueError("prompt_lengths/seq_lengths: need 1 <= prompt_len <= seq_len <= width")

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def target_mask(self) -> torch.Tensor:
        """[N, L-1] bool: position t of the shifted view predicts token t+1, a response token."""
        pos = torch.arange(1, self.input_ids.shape[1], device=self.input_ids.device).unsqueeze(0)
        return (pos >= self.prompt_lengths.unsqueeze(1)) & (pos < self.seq_lengths.unsqueeze(1))

    def attention_mask(self) -> torch.Tensor:
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device).unsqueeze(0)
        return (pos < self.seq_lengths.unsqueeze(1)).long()

    def rows(self, index: torch.Tensor) -> LearnerBatch:
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> LearnerBatch:
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LearnerBatch:
        return LearnerBatch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def from_rows(rows: CuratedRows) -> LearnerBatch:
        """The row schema's fields the learner trains on, as tensors: int64 where the schema
        holds integers, float32 where it holds floats."""
        return LearnerBatch(
            **{f.name: _as_tensor(getattr(rows, f.name)) for f in fields(LearnerBatch)}
        )


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(array)
    return t.float() if t.is_floating_point() else t.long()


@dataclass(frozen=True)
class PackLayout:
    """Where a packed micro-batch's rows sit: row j's first ``lengths[j]`` input columns run at
    columns [offsets[j], offsets[j] + lengths[j]) of packed row ``bins[j]``, one of ``n_bins``
    packed rows of ``width`` columns. All of bins, offsets, lengths are [m] int64."""

    bins: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    n_bins: int
    width: int


@dataclass(frozen=True)
class MicroBatch:
    """Rows ``rows`` [m] (indices into a batch) run over input columns [:width].

    ``live`` False marks a placeholder: one row whose loss counts zero, run only so that every
    rank makes the same number of forward/backward calls (ZeRO's collectives pair up per call).
    ``pack``: the rows run packed end to end (see :class:`PackLayout`) instead of one padded
    row each; ``width`` is still the widest row's, the width of the per-row view the loss sees.
    """

    rows: torch.Tensor
    width: int
    live: bool = True
    pack: PackLayout | None = None

    @property
    def padded_tokens(self) -> int:
        """Input positions the forward runs (real and padding)."""
        if self.pack is not None:
            return self.pack.n_bins * self.pack.width
        return int(self.rows.numel()) * self.width


def plan_micro_batches(widths: torch.Tensor, budget: int | None) -> list[MicroBatch]:
    """Split rows into micro-batches of at most ``budget`` padded tokens (rows x widest row).

    Args:
        widths: [n] int, the input columns row i needs (>= 1).
        budget: padded tokens per micro-batch; None puts all rows, in order, into one.
    Returns:
        Micro-batches covering every row once. Rows go longest first, so each micro-batch pads
        to its first row and similar lengths share one; a row wider than the budget runs alone.
    """
    n = int(widths.numel())
    if n == 0:
        return []
    if budget is None:
        return [MicroBatch(torch.arange(n), int(widths.max()))]
    order = torch.argsort(widths, descending=True, stable=True)
    sorted_w = widths[order].tolist()
    plans: list[MicroBatch] = []
    start = 0
    while start < n:
        width = int(sorted_w[start])
        take = max(1, min(n - start, budget // max(width, 1)))
        plans.append(MicroBatch(order[start : start + take], width))
        start += take
    return plans


def plan_packed_micro_batches(
    widths: torch.Tensor, budget: int | None, row_width: int
) -> list[MicroBatch]:
    """Pack rows end to end into shared rows, then split those into micro-batches by ``budget``.

    Args:
        widths: [n] int, the input columns row i needs (>= 1).
        budget: input positions per micro-batch; None puts every packed row into one.
        row_width: the most columns of a packed row (``budget`` if smaller; a row wider than
            that runs alone). sdpa and eager attention span the whole packed row, so wider rows
            fill better but cost attention.
    Returns:
        Micro-batches covering every row once. Rows go in longest first, each into the first
        packed row with room (first-fit decreasing); the packed rows' width is the smallest that
        needs no more of them than ``row_width`` would, so they fill evenly and only their
        tails pad.
    """
    n = int(widths.numel())
    if n == 0:
        return []
    order = torch.argsort(widths, descending=True, stable=True)
    sorted_w = [int(w) for w in widths[order].tolist()]
    cap_max = max(min(row_width, budget or row_width), 1)
    bins, fill = _first_fit(sorted_w, cap_max)
    # The same number of packed rows, as narrow as first-fit allows: even fills, less padding.
    cap = max(min(sorted_w[0], cap_max), -(-sum(sorted_w) // len(bins)))
    while cap < cap_max:
        even = _first_fit(sorted_w, cap)
        if len(even[0]) <= len(bins):
            bins, fill = even
            break
        cap += max(1, cap // 32)
    per = len(bins) if budget is None else max(1, budget // max(fill))
    return [
        _packed(order, sorted_w, bins[s : s + per], fill[s : s + per])
        for s in range(0, len(bins), per)
    ]


def _first_fit(sorted_w: list[int], cap: int) -> tuple[list[list[int]], list[int]]:
    """Positions of ``sorted_w`` in packed rows of ``cap`` columns, first fit; a row wider than
    ``cap`` gets a packed row of its own. Returns each packed row's positions and fill."""
    bins: list[list[int]] = []
    fill: list[int] = []
    for j, w in enumerate(sorted_w):
        b = next((b for b, f in enumerate(fill) if f + w <= cap), None)
        if b is None:
            bins.append([j])
            fill.append(w)
        else:
            bins[b].append(j)
            fill[b] += w
    return bins, fill


def _packed(
    order: torch.Tensor, sorted_w: list[int], bins: list[list[int]], fill: list[int]
) -> MicroBatch:
    pos = [j for b in bins for j in b]
    bin_of = [i for i, b in enumerate(bins) for _ in b]
    offsets = [o for b in bins for o in accumulate((sorted_w[k] for k in b[:-1]), initial=0)]
    lengths = [sorted_w[j] for j in pos]
    layout = PackLayout(
        bins=torch.tensor(bin_of, dtype=torch.long),
        offsets=torch.tensor(offsets, dtype=torch.long),
        lengths=torch.tensor(lengths, dtype=torch.long),
        n_bins=len(bins),
        width=max(fill),
    )
    return MicroBatch(order[pos], max(lengths), pack=layout)


def last_kept_width(mask: torch.Tensor) -> torch.Tensor:
    """[n] input columns each row needs to score its last kept target of ``mask`` [n, T].

    Target column c is predicted from input column c, so inputs [:c + 2] cover it (the shifted
    logits drop the last input column). Rows with no kept target get 1.
    """
    cols = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    return (
        torch.where(mask, cols, -1).amax(dim=1) + 2
        if mask.shape[1]
        else mask.new_ones(mask.shape[0])
    )

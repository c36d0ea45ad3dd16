"""Splitting rows into micro-batches by a padded-token budget."""

from __future__ import annotations

import pytest
import torch

from learner.batch import plan_micro_batches, plan_packed_micro_batches
from learner.packing import pack_rows


def test_no_budget_is_one_micro_batch_in_order():
    (mb,) = plan_micro_batches(torch.tensor([3, 9, 5]), None)
    assert mb.rows.tolist() == [0, 1, 2] and mb.width == 9 and mb.live


@pytest.mark.parametrize("budget", [1, 7, 10, 24, 50, 1000])
def test_every_row_once_and_each_micro_batch_within_budget(budget):
    g = torch.Generator().manual_seed(budget)
    widths = torch.randint(2, 12, (37,), generator=g)
    plans = plan_micro_batches(widths, budget)
    rows = torch.cat([p.rows for p in plans])
    assert sorted(rows.tolist()) == list(range(37))
    for p in plans:
        assert p.width == int(widths[p.rows].max())  # pads only to its own widest row
        assert p.padded_tokens <= budget or p.rows.numel() == 1  # a too-wide row runs alone


def test_longest_rows_first_so_similar_lengths_share_a_micro_batch():
    widths = torch.tensor([2, 10, 3, 9, 2, 10])
    plans = plan_micro_batches(widths, 20)
    assert [sorted(p.rows.tolist()) for p in plans] == [[1, 5], [2, 3], [0, 4]]
    assert [p.width for p in plans] == [10, 9, 2]


def test_empty():
    assert plan_micro_batches(torch.zeros(0, dtype=torch.long), 10) == []


def _layout_rows(plans):
    """Each packed row's columns, as (row, column-in-row) per position (None: padding)."""
    out = []
    for p in plans:
        grid = [[None] * p.pack.width for _ in range(p.pack.n_bins)]
        for j, r in enumerate(p.rows.tolist()):
            b, o, n = (int(x[j]) for x in (p.pack.bins, p.pack.offsets, p.pack.lengths))
            for t in range(n):
                assert grid[b][o + t] is None, "two rows share a packed position"
                grid[b][o + t] = (r, t)
        out.append(grid)
    return out


@pytest.mark.parametrize("budget", [None, 1, 7, 10, 24, 50, 1000])
def test_packing_covers_every_row_once_within_the_budget(budget):
    g = torch.Generator().manual_seed(7 if budget is None else budget)
    widths = torch.randint(2, 12, (37,), generator=g)
    plans = plan_packed_micro_batches(widths, budget, 20)
    assert sorted(torch.cat([p.rows for p in plans]).tolist()) == list(range(37))
    _layout_rows(plans)  # each row inside its packed row, no two on one position
    for p in plans:
        assert p.pack.lengths.tolist() == widths[p.rows].tolist()  # every row whole
        assert p.width == int(widths[p.rows].max())
        # a packed row spans at most row_width columns (or one row wider than the budget)
        assert p.pack.width <= 20 or p.pack.n_bins == 1
        too_wide = budget is not None and int(widths[p.rows].max()) > budget
        assert p.padded_tokens <= (budget or 10**9) or (too_wide and p.pack.n_bins == 1)
    if budget is None:
        assert len(plans) == 1


def test_packing_fills_rows_first_fit_longest_first():
    # capacity 10 (the widest row): [10], [9], [6, 4], [3, 3, 2, 2]
    widths = torch.tensor([3, 10, 2, 9, 6, 4, 3, 2])
    (p,) = plan_packed_micro_batches(widths, None, 10)
    assert p.pack.n_bins == 4 and p.pack.width == 10
    fills = torch.zeros(4, dtype=torch.long).index_add_(0, p.pack.bins, p.pack.lengths)
    assert fills.tolist() == [10, 9, 10, 10]
    assert p.padded_tokens == 40 and int(widths.sum()) == 39  # 1 padded position of 40


def test_packed_micro_batch_trims_to_its_fullest_row():
    # budget 6 -> one packed row of capacity 6 per micro-batch: [6], then [3, 2] 5 wide
    plans = plan_packed_micro_batches(torch.tensor([6, 2, 3]), 6, 1024)
    assert [(p.rows.tolist(), p.pack.width) for p in plans] == [([0], 6), ([2, 1], 5)]


def test_pack_rows_places_tokens_and_positions_and_unpacks_the_targets():
    ids = torch.tensor([[11, 12, 13, 0], [21, 22, 23, 24], [31, 32, 0, 0]])
    (p,) = plan_packed_micro_batches(torch.tensor([3, 4, 2, 1]), None, 4)
    ids = torch.cat([ids, torch.tensor([[41, 0, 0, 0]])])
    sub = ids[p.rows]
    packed, pos, index, valid = pack_rows(sub, p.pack, p.width)
    # capacity 4: [row1], [row0, row3], [row2]; rows never split across packed rows
    assert packed.tolist() == [[21, 22, 23, 24], [11, 12, 13, 41], [31, 32, 0, 0]]
    # position restarts at each row; padding sits at position 0 alone
    for j, r in enumerate(p.rows.tolist()):
        b, o, n = (int(x[j]) for x in (p.pack.bins, p.pack.offsets, p.pack.lengths))
        assert packed[b, o : o + n].tolist() == ids[r, :n].tolist()
        assert pos[b, o : o + n].tolist() == list(range(n))
    # each row's target columns index its own flat packed positions; none past its last target
    assert index.shape == valid.shape == (4, p.width - 1)
    for j, n in enumerate(p.pack.lengths.tolist()):
        b, o = int(p.pack.bins[j]), int(p.pack.offsets[j])
        start = b * p.pack.width + o
        assert index[j, : n - 1].tolist() == [start + t for t in range(n - 1)]
        assert valid[j, : n - 1].all() and not valid[j, n - 1 :].any()
        assert index[j, n - 1 :].abs().sum() == 0


def test_packed_rows_fill_evenly_up_to_the_row_width():
    # 64 rows of 70-106 columns (a prompt-dominated step): one per row when packed rows are
    # the widest row's width; at most 1024 columns, spread evenly so no packed row runs half empty
    g = torch.Generator().manual_seed(0)
    widths = torch.randint(70, 107, (64,), generator=g)
    (narrow,) = plan_packed_micro_batches(widths, None, 106)
    (wide,) = plan_packed_micro_batches(widths, None, 1024)
    real = int(widths.sum())
    assert wide.pack.width <= 1024 and wide.pack.n_bins == -(-real // 1024)
    assert 1 - real / wide.padded_tokens < 0.05 < 0.1 < 1 - real / narrow.padded_tokens

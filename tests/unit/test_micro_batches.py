"""Splitting rows into micro-batches by a padded-token budget."""

from __future__ import annotations

import pytest
import torch

from learner.batch import plan_micro_batches


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

"""Sample-level selection against brute force over every subset."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selector.sample import max_variance_subset, select_cross, select_intra, select_random


def pvar(xs: list[float]) -> float:
    if not xs:
        return 0.0
    mu = sum(xs) / len(xs)
    return sum((x - mu) ** 2 for x in xs) / len(xs)


def brute_best(values: list[float], m: int) -> float:
    return max(pvar([values[i] for i in c]) for c in itertools.combinations(range(len(values)), m))


# Small integer grids produce many ties; binary rewards are the common RL case.
value_lists = st.one_of(
    st.lists(st.floats(-10, 10, allow_nan=False, width=64), min_size=1, max_size=12),
    st.lists(st.integers(-2, 2).map(float), min_size=1, max_size=12),
    st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(values=value_lists, data=st.data())
def test_max_variance_subset_matches_brute_force(values, data):
    m = data.draw(st.integers(0, len(values)))
    idx = max_variance_subset(torch.tensor(values, dtype=torch.float64), m)
    assert idx.shape == (m,)
    assert idx.dtype == torch.int64
    assert len(set(idx.tolist())) == m
    assert idx.tolist() == sorted(idx.tolist())
    got = pvar([values[i] for i in idx.tolist()])
    assert got == pytest.approx(brute_best(values, m), abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(
    b=st.integers(1, 3),
    g=st.integers(1, 6),
    data=st.data(),
)
def test_select_intra_matches_brute_force_per_group(b, g, data):
    vals = data.draw(
        st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.5]), min_size=b * g, max_size=b * g)
    )
    n_keep = data.draw(st.integers(0, g))
    adv = torch.tensor(vals, dtype=torch.float64).reshape(b, g)
    keep = select_intra(adv, n_keep)
    assert keep.shape == (b, g) and keep.dtype == torch.bool
    assert keep.sum(dim=1).tolist() == [n_keep] * b
    for row in range(b):
        row_vals = adv[row].tolist()
        chosen = [row_vals[i] for i in range(g) if keep[row, i]]
        assert pvar(chosen) == pytest.approx(brute_best(row_vals, n_keep), abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(b=st.integers(1, 3), g=st.integers(1, 4), data=st.data())
def test_select_cross_matches_brute_force_over_pool(b, g, data):
    vals = data.draw(
        st.lists(st.floats(-3, 3, allow_nan=False, width=64), min_size=b * g, max_size=b * g)
    )
    n = data.draw(st.integers(0, b * g))
    adv = torch.tensor(vals, dtype=torch.float64).reshape(b, g)
    keep = select_cross(adv, n)
    assert int(keep.sum()) == n
    chosen = adv[keep].tolist()
    assert pvar(chosen) == pytest.approx(brute_best(vals, n), abs=1e-9)


def test_all_equal_and_edge_sizes():
    v = torch.full((7,), 0.3)
    assert max_variance_subset(v, 0).numel() == 0
    assert max_variance_subset(v, 7).tolist() == list(range(7))
    # all equal: ties go to the smallest split k = 0, i.e. the first m by index
    assert max_variance_subset(v, 3).tolist() == [0, 1, 2]


def test_deterministic_tie_breaking():
    v = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    a = max_variance_subset(v, 4).tolist()
    assert a == max_variance_subset(v.clone(), 4).tolist()
    assert sorted(v[a].tolist()) == [0.0, 0.0, 1.0, 1.0]


def test_cross_drops_zero_variance_groups_first():
    # group 0 has signal, group 1 is all-correct (A = 0 everywhere)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    keep = select_cross(adv, 4)
    assert keep[0].all() and not keep[1].any()


def test_intra_binary_rewards_keeps_both_outcomes():
    adv = torch.tensor([[1.5, -0.5, -0.5, -0.5]])
    keep = select_intra(adv, 2)
    assert sorted(adv[keep].tolist()) == [-0.5, 1.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    adv = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert select_cross(adv, 40).sum() == 40
    assert (select_intra(adv, 3).sum(1) == 3).all()


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: max_variance_subset(torch.zeros(3), 4), "m"),
        (lambda: max_variance_subset(torch.zeros(3), -1), "m"),
        (lambda: max_variance_subset(torch.zeros(2, 2), 1), "values"),
        (lambda: max_variance_subset(torch.tensor([0.0, float("nan")]), 1), "values"),
        (lambda: select_intra(torch.zeros(2, 3), 4), "n_keep"),
        (lambda: select_intra(torch.zeros(3), 1), "adv"),
        (lambda: select_cross(torch.zeros(2, 3), 7), "n_keep_total"),
        (lambda: select_cross(torch.tensor([[float("inf"), 0.0]]), 1), "adv"),
        (lambda: select_random((2, 3), 7), "n_keep_total"),
    ],
)
def test_invalid_arguments_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        call()


def test_select_random_count_and_seed():
    a = select_random((8, 4), 10, torch.Generator().manual_seed(1))
    b = select_random((8, 4), 10, torch.Generator().manual_seed(1))
    c = select_random((8, 4), 10, torch.Generator().manual_seed(2))
    assert int(a.sum()) == 10 and torch.equal(a, b) and not torch.equal(a, c)

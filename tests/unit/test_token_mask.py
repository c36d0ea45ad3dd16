from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.logits import logprobs_and_entropy
from selector.token import keep_count, random_token_mask, token_mask


def _reference(adv, ent, rmask, k, pool):
    """Plain-Python top-k with ties to the earlier flat index."""
    n, t = ent.shape
    out = torch.zeros(n, t, dtype=torch.bool)
    if pool == "batch":
        cells = [(i, j) for i in range(n) for j in range(t) if rmask[i, j]]
        cells.sort(key=lambda c: (-abs(float(adv[c[0]])) * float(ent[c]), c[0] * t + c[1]))
        for c in cells[: keep_count(k, len(cells))]:
            out[c] = True
    else:
        for i in range(n):
            cells = [j for j in range(t) if rmask[i, j]]
            cells.sort(key=lambda j, i=i: (-abs(float(adv[i])) * float(ent[i, j]), j))
            for j in cells[: keep_count(k, len(cells))]:
                out[i, j] = True
    return out


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 5),
    t=st.integers(1, 7),
    k=st.sampled_from([0.05, 0.2, 0.3, 0.5, 0.77, 1.0]),
    pool=st.sampled_from(["batch", "sequence"]),
    data=st.data(),
)
def test_matches_reference_including_ties(n, t, k, pool, data):
    ent = torch.tensor(
        data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=n * t, max_size=n * t))
    ).reshape(n, t)
    adv = torch.tensor(
        data.draw(st.lists(st.sampled_from([0.0, -1.0, 1.0, 0.5]), min_size=n, max_size=n))
    )
    lengths = data.draw(st.lists(st.integers(0, t), min_size=n, max_size=n))
    rmask = torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    got = token_mask(adv, ent, rmask, k, pool)
    assert torch.equal(got, _reference(adv, ent, rmask, k, pool))


def test_counts_batch_and_sequence():
    g = torch.Generator().manual_seed(0)
    ent = torch.rand(6, 10, generator=g)
    adv = torch.randn(6, generator=g)
    rmask = torch.arange(10).unsqueeze(0) < torch.tensor([10, 7, 3, 1, 0, 5]).unsqueeze(1)
    m = token_mask(adv, ent, rmask, 0.3, "batch")
    assert int(m.sum()) == math.ceil(0.3 * 26)
    s = token_mask(adv, ent, rmask, 0.3, "sequence")
    assert s.sum(1).tolist() == [3, 3, 1, 1, 0, 2]
    assert not (m & ~rmask).any() and not (s & ~rmask).any()


def test_keeps_highest_scores():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3]])
    adv = torch.tensor([1.0, 2.0])  # row 1 scores 0.6 each
    rmask = torch.ones(2, 4, dtype=torch.bool)
    m = token_mask(adv, ent, rmask, 0.25, "batch")  # 2 tokens
    # scores: row0 [.1 .9 .5 .2], row1 [.6 .6 .6 .6] -> .9 then the first .6
    assert m.nonzero().tolist() == [[0, 1], [1, 0]]


def test_padding_never_kept_even_with_huge_entropy():
    ent = torch.tensor([[1.0, 100.0, 100.0]])
    rmask = torch.tensor([[True, False, False]])
    for pool in ("batch", "sequence"):
        assert token_mask(torch.tensor([1.0]), ent, rmask, 0.5, pool).tolist() == [
            [True, False, False]
        ]


def test_k_one_keeps_every_valid_token():
    rmask = torch.tensor([[True, True, False], [True, False, False]])
    ent = torch.rand(2, 3)
    for pool in ("batch", "sequence"):
        assert torch.equal(token_mask(torch.zeros(2), ent, rmask, 1.0, pool), rmask)


def test_float_noise_in_ceil():
    assert keep_count(0.2, 10) == 2
    assert keep_count(0.3, 10) == 3
    assert keep_count(0.21, 10) == 3


def test_bfloat16_inputs():
    ent = torch.rand(4, 8).bfloat16()
    m = token_mask(torch.randn(4).bfloat16(), ent, torch.ones(4, 8, dtype=torch.bool), 0.5)
    assert int(m.sum()) == 16


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": float("nan")}, "keep_ratio"),
        ({"pool": "group"}, "pool"),
        ({"entropy": torch.rand(2, 4)}, "entropy"),
        ({"adv": torch.rand(3)}, "adv"),
        ({"adv": torch.tensor([float("nan"), 1.0])}, "adv"),
        ({"entropy": torch.full((2, 3), float("nan"))}, "entropy"),
        ({"response_mask": torch.ones(2, 3)}, "response_mask"),
    ],
)
def test_invalid_arguments(kwargs, arg):
    args = {
        "adv": torch.ones(2),
        "entropy": torch.rand(2, 3),
        "response_mask": torch.ones(2, 3, dtype=torch.bool),
        "keep_ratio": 0.5,
        "pool": "batch",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        token_mask(**args)


def test_nan_entropy_at_padding_is_ignored():
    ent = torch.tensor([[0.5, float("nan")]])
    m = token_mask(torch.ones(1), ent, torch.tensor([[True, False]]), 0.5)
    assert m.tolist() == [[True, False]]


def test_random_mask_same_count_different_choice():
    rmask = torch.ones(8, 16, dtype=torch.bool)
    a = random_token_mask(rmask, 0.25, generator=torch.Generator().manual_seed(0))
    b = random_token_mask(rmask, 0.25, generator=torch.Generator().manual_seed(1))
    assert int(a.sum()) == int(b.sum()) == 32 and not torch.equal(a, b)


def test_entropy_and_logprobs_match_dense_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    logp, ent = logprobs_and_entropy(logits, labels, temperature=0.7, chunk_rows=4)
    ref_lp = torch.log_softmax(logits / 0.7, -1)
    assert torch.allclose(logp, ref_lp.gather(2, labels.unsqueeze(2)).squeeze(2), atol=1e-6)
    assert torch.allclose(ent, -(ref_lp.exp() * ref_lp).sum(-1), atol=1e-5)
    assert not ent.requires_grad and logp.requires_grad
    logp.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0

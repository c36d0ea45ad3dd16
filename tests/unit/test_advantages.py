from __future__ import annotations

import pytest
import torch

from selector.advantages import group_advantages, renormalized_advantages


def test_matches_hand_computation():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(r)
    # group 0: mean .5, population std .5
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-6))
    std1 = (0.5) ** 0.5
    assert torch.allclose(adv[1], (r[1] - 2.0) / (std1 + 1e-6))


def test_zero_variance_group_is_exactly_zero():
    r = torch.tensor([[0.1] * 7, [1.0] * 7, [0.0, 1, 0, 0, 0, 0, 0]])
    adv = group_advantages(r)
    assert torch.equal(adv[:2], torch.zeros(2, 7))
    assert adv[2].abs().sum() > 0


def test_population_std_and_eps():
    r = torch.tensor([[0.0, 2.0]])
    assert torch.allclose(group_advantages(r, eps=0.5), torch.tensor([[-1 / 1.5, 1 / 1.5]]))


def test_dtypes():
    r = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert group_advantages(r.bfloat16()).dtype == torch.float32
    assert group_advantages(r.double()).dtype == torch.float64


@pytest.mark.parametrize(
    "rewards, arg",
    [
        (torch.tensor([[0.0, float("nan")]]), "rewards"),
        (torch.zeros(4), "rewards"),
    ],
)
def test_invalid(rewards, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        group_advantages(rewards)


def test_eps_must_be_positive():
    with pytest.raises(ValueError, match="^eps:"):
        group_advantages(torch.zeros(1, 2), eps=0.0)


def test_renormalized_uses_kept_only():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]])
    keep = torch.tensor([[True, True, False, False, False]])
    adv = renormalized_advantages(r, keep)
    # kept {1, 0}: mean .5 std .5 -> +-1; dropped -> 0
    assert torch.allclose(adv, torch.tensor([[1.0, -1.0, 0.0, 0.0, 0.0]]), atol=1e-5)
    flat_keep = torch.tensor([[True, False, False, False, True]])
    assert torch.equal(renormalized_advantages(r, flat_keep), torch.zeros(1, 5))

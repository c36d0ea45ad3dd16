"""token_score: |A| x H (default), H alone, |A| alone, through token_mask, select_tokens and config."""

import pytest
import torch

from selector.config import AlgorithmConfig
from selector.presets import get_preset, select_tokens
from selector.token import token_mask, token_scores

# Two samples of 3 tokens: sample 0 has a small |A| and high entropy, sample 1 the reverse.
ADV = torch.tensor([0.1, -2.0])
ENT = torch.tensor([[3.0, 2.0, 0.5], [0.1, 0.3, 0.2]])
RMASK = torch.ones(2, 3, dtype=torch.bool)


def test_scores_by_criterion():
    assert torch.allclose(token_scores(ADV, ENT, RMASK, "adv_entropy"), ADV.abs()[:, None] * ENT)
    assert torch.equal(token_scores(ADV, ENT, RMASK, "entropy"), ENT)
    assert torch.equal(token_scores(ADV, ENT, RMASK, "adv"), ADV.abs()[:, None].expand(2, 3))
    pad = RMASK.clone()
    pad[0, 2] = False
    for s in ("adv_entropy", "entropy", "adv"):
        assert token_scores(ADV, ENT, pad, s)[0, 2] == float("-inf")


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        # |A|xH: 0.3, 0.2, 0.05 | 0.2, 0.6, 0.4 -> top 2 are (1,1) 0.6 and (1,2) 0.4
        ("adv_entropy", [[False, False, False], [False, True, True]]),
        # H: the two high-entropy tokens of the low-advantage sample
        ("entropy", [[True, True, False], [False, False, False]]),
        # |A|: sample 1's tokens tie; the earliest two win
        ("adv", [[False, False, False], [True, True, False]]),
    ],
)
def test_mask_differs_by_criterion(score, expected):
    for pool in ("batch",):
        assert token_mask(ADV, ENT, RMASK, 2 / 6, pool, score).tolist() == expected


def test_sequence_pool_entropy_ignores_advantage():
    m = token_mask(torch.tensor([0.0, 5.0]), ENT, RMASK, 1 / 3, "sequence", "entropy")
    assert m.tolist() == [[True, False, False], [False, True, False]]


def test_select_tokens_uses_preset_score():
    base = get_preset("d3s")
    assert base.token_score == "adv_entropy"
    h = select_tokens(base.with_overrides(token_score="entropy"), ADV, ENT, RMASK, 2 / 6)
    assert h.tolist() == [[True, True, False], [False, False, False]]
    default = select_tokens(base, ADV, ENT, RMASK, 2 / 6)
    assert default.tolist() == [[False, False, False], [False, True, True]]


def test_bad_score_named():
    with pytest.raises(ValueError, match="score"):
        token_mask(ADV, ENT, RMASK, 0.5, "batch", "bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token_score"):
        get_preset("d3s", token_score="bogus")


def test_config_field():
    assert AlgorithmConfig(preset="d3s", token_score="adv").build_preset().token_score == "adv"
    assert AlgorithmConfig(preset="d3s").build_preset().token_score == "adv_entropy"
    with pytest.raises(ValueError, match="token_score"):
        AlgorithmConfig(preset="d3s", token_score="h")

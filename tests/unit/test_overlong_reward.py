"""Overlong reward shaping (DAPO's soft punishment): hand-computed values, the config checks,
and the rollout worker adding it to the verifier's rewards of real generations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.reward import OverlongConfig
from services.run.build_rollout import build_worker
from services.run.config import ConfigError, parse_config


def test_shaping_against_hand_computed_values():
    cfg = OverlongConfig(max_len=10, buffer=4, penalty=0.5)  # buffer: lengths 7..10
    lengths = np.array([1, 6, 7, 8, 9, 10, 12, 5])
    cut = np.array([False] * 7 + [True])  # the last one was cut by max_new_tokens
    expected = [
        0.0,  # short
        0.0,  # L = max_len - buffer: not yet
        (6 - 7) / 4 * 0.5,  # -0.125
        (6 - 8) / 4 * 0.5,  # -0.25
        (6 - 9) / 4 * 0.5,  # -0.375
        -0.5,  # at max_len: the full penalty
        -0.5,  # beyond it
        -0.5,  # truncated: the full penalty whatever its length
    ]
    got = cfg.shaping(lengths, cut)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    # DAPO's defaults: penalty 1, the linear ramp down to -1 at max_len.
    np.testing.assert_allclose(
        OverlongConfig(max_len=4, buffer=2).shaping(np.array([2, 3, 4]), np.zeros(3, bool)),
        [0.0, -0.5, -1.0],
    )


@pytest.mark.parametrize(
    ("overlong", "message"),
    [
        (
            {"max_len": 8, "buffer": 2},
            "reward.overlong.max_len: 8 exceeds rollout.max_new_tokens=6",
        ),
        ({"max_len": 4, "buffer": 4}, "buffer: 4 must be below max_len"),
        ({"max_len": 4, "buffer": 2, "penalty": 0}, "penalty"),
        ({"max_len": 4, "buffer": 2, "scale": 1}, "scale"),  # a field nothing reads
    ],
)
def test_config_refuses_what_run_would_fail_on(overlong, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"rollout": {"max_new_tokens": 6}, "reward": {"overlong": overlong}})


def test_off_by_default():
    assert parse_config({}).reward.overlong is None


def test_worker_adds_the_shaping_to_the_verifiers_rewards_of_real_generations():
    """Same engine, same seed, so the same responses: the shaped rewards are the verifier's
    plus the hand rule applied to each response's length and ending; evaluation-style
    correctness (what the prefilter sees) is left alone."""
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), tok, seed=0)
    base = {
        "task": {"type": "arithmetic", "digits": 1},
        "rollout": {"max_new_tokens": 6, "samples_per_prompt": 8},
    }
    plain = build_worker(parse_config(base), model, tok, "sync")
    shaped_cfg = parse_config({**base, "reward": {"overlong": {"max_len": 6, "buffer": 3}}})
    shaped = build_worker(shaped_cfg, model, tok, "sync")
    a, _ = plain.produce(4, seed=3)
    b, _ = shaped.produce(4, seed=3)
    stops = set(shaped.engine.stop_token_ids)
    penalised = 0
    for ga, gb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ga.responses, gb.responses)
        for j, k in enumerate(gb.response_lengths.tolist()):
            cut = int(gb.responses[j, k - 1]) not in stops
            rule = -1.0 if cut or k >= 6 else (0.0 if k <= 3 else (3 - k) / 3)
            assert gb.rewards[j] == pytest.approx(ga.rewards[j] + rule, abs=1e-6)
            penalised += rule < 0
    # An untrained policy rambles: the shaping is exercised, and counted.
    assert penalised > 0 and shaped.responses_overlong == penalised
    assert plain.responses_overlong == 0

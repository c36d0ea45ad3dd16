"""Dynamic sampling's counting (selector/dynamic.py) and its config: what a step drew, kept and
dropped, the bound and its error, the size of the next lock-step round."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selector.advantages import flat_groups, group_advantages
from selector.config import DynamicSamplingConfig
from selector.dynamic import DynamicSamplingExhausted, StepDraws, split_flat
from services.run.config import ConfigError, parse_config


def group(rewards: list[float], length: int = 3) -> SimpleNamespace:
    g = len(rewards)
    return SimpleNamespace(
        rewards=np.array(rewards, dtype=np.float32),
        response_lengths=np.full(g, length, dtype=np.int32),
    )


def test_flat_groups_are_the_ones_with_zero_advantages():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.1, 0.1, 0.0], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0]])
    assert flat_groups(rewards).tolist() == [True, False, True, True]
    adv = group_advantages(rewards)
    assert (adv[flat_groups(rewards)] == 0).all() and (adv[1] != 0).any()


def test_split_keeps_the_order_and_takes_any_record():
    gs = [group([1, 1]), group([0, 1]), group([0.1, 0.1]), group([1, 0])]
    signal, flat = split_flat(gs)
    assert signal == [gs[1], gs[3]] and flat == [gs[0], gs[2]]
    boxed = [SimpleNamespace(record=g) for g in gs]  # the selector's deliveries
    assert split_flat(boxed, lambda d: d.record.rewards)[1] == [boxed[0], boxed[2]]
    assert split_flat([]) == ([], [])


def test_draws_metrics_count_what_was_generated_dropped_and_kept():
    d = StepDraws(need=4, max_draws=16, step=2)
    d.keep([group([0, 1], length=5)] * 3)
    d.drop([group([1, 1], length=2)] * 5)
    d.keep([group([0, 1], length=5)] * 2)
    assert d.take(list(range(5))) == [0, 1, 2, 3]  # one kept group too many: surplus
    assert d.metrics() == {
        "groups_generated": 10.0,
        "groups_zero_var_dropped": 5.0,
        "groups_surplus_dropped": 1.0,
        "draws_per_step": 2.5,
        # 5 kept x 2 x 5 tokens + 5 dropped x 2 x 2 tokens, over the 4 groups of the batch
        "gen_tokens_per_kept_group": (50 + 20) / 4,
    }


def test_bound_error_names_the_setting_once_the_batch_cannot_be_filled():
    d = StepDraws(need=4, max_draws=8, step=7)
    d.drop([group([0, 0])] * 4)  # 4 more may still all have variance: not yet
    with pytest.raises(DynamicSamplingExhausted) as err:
        d.drop([group([0, 0])])
    msg = str(err.value)
    assert "algorithm.dynamic_sampling" in msg and "max_draws_factor" in msg
    assert "step 7 dropped 5 groups with no reward variance, more than the 4" in msg


def test_without_dynamic_sampling_nothing_is_bounded():
    d = StepDraws(need=2, max_draws=None, step=0)
    d.drop([group([0, 0])] * 100)
    assert not d.filtering


def test_next_round_is_sized_by_the_share_with_variance_and_the_bound():
    d = StepDraws(need=8, max_draws=32, step=0)
    d.keep([group([0, 1])] * 4)
    d.drop([group([1, 1])] * 4)
    assert d.next_round(kept=4) == 8  # half had variance: 4 missing -> 8
    d2 = StepDraws(need=8, max_draws=16, step=0)
    d2.keep([group([0, 1])])
    d2.drop([group([1, 1])] * 7)
    assert d2.next_round(kept=1) == 8  # 7 missing at 1/8 would be 56: one batch at most
    d3 = StepDraws(need=4, max_draws=16, step=0)
    d3.drop([group([1, 1])] * 4)
    assert d3.next_round(kept=0) == 4  # none had variance: one batch (of 12 left)
    d4 = StepDraws(need=8, max_draws=32, step=0)
    d4.keep([group([0, 1])] * 6)
    d4.drop([group([1, 1])] * 2)
    assert d4.next_round(kept=6) == 3  # 2 missing at 3/4


def test_config_is_off_by_default_and_refuses_unknown_fields():
    cfg = parse_config({})
    assert cfg.algorithm.dynamic_sampling == DynamicSamplingConfig(enabled=False)
    on = parse_config(
        {"algorithm": {"dynamic_sampling": {"enabled": True, "max_draws_factor": 2.5}}}
    )
    assert on.algorithm.dynamic_sampling.max_draws(5) == 13
    assert on.selector_settings().dynamic_sampling == on.algorithm.dynamic_sampling
    for bad, field in [
        ({"enabled": True, "max_draws_factor": 0.5}, "max_draws_factor"),
        ({"enabled": True, "bound": 3}, "bound"),
    ]:
        with pytest.raises(ConfigError, match=field):
            parse_config({"algorithm": {"dynamic_sampling": bad}})

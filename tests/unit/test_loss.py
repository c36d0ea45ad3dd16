from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from learner.config import GRPOLossConfig, GSPOLossConfig, default_loss_config
from learner.loss import POLICY_LOSSES, get_policy_loss

GRPO = get_policy_loss(GRPOLossConfig())
GSPO = get_policy_loss(GSPOLossConfig())


def test_registry():
    assert {"grpo", "gspo"} <= set(POLICY_LOSSES)
    with pytest.raises(ValueError, match="^loss.type:"):
        get_policy_loss("ppo2")
    assert isinstance(get_policy_loss(default_loss_config("gspo")).cfg, GSPOLossConfig)
    with pytest.raises(ValueError, match="^loss:"):
        POLICY_LOSSES["gspo"](GRPOLossConfig())  # a loss refuses another loss's config


def test_grpo_hand_computed():
    # 2 sequences x 2 tokens; ratios: e^0.1, e^-0.5 | e^0.5, 1
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, -0.5], [0.5, 0.0]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = GRPO(logp, old, adv, mask)
    r = [math.exp(0.1), math.exp(-0.5), math.exp(0.5)]
    # A=+1: max(-r, -clip(r,.8,1.28)); A=-2: max(2r, 2clip(r))
    t1 = max(-r[0], -min(max(r[0], 0.8), 1.28))
    t2 = max(-r[1], -min(max(r[1], 0.8), 1.28))
    t3 = max(2 * r[2], 2 * min(max(r[2], 0.8), 1.28))
    assert loss.item() == pytest.approx((t1 + t2 + t3) / 3, rel=1e-6)
    # tokens 2 (ratio .61 < .8 with A>0) and 3 (ratio 1.65 > 1.28, A<0): only token 3 is clipped
    # in the pessimistic max; token 2's unclipped term is larger so it stays.
    assert m["pg_clipfrac"] == pytest.approx(0.0)


def test_grpo_seq_mean_token_mean():
    old = torch.zeros(2, 3)
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, _ = get_policy_loss(GRPOLossConfig(aggregation="seq-mean-token-mean"))(
        logp, old, adv, mask
    )
    assert loss.item() == pytest.approx((-1.0 + -3.0) / 2)
    loss_tm, _ = GRPO(logp, old, adv, mask)
    assert loss_tm.item() == pytest.approx((-3.0 - 3.0) / 4)


def test_gradient_flows_only_through_kept_tokens():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 5, generator=g) * 0.01).requires_grad_()
    old = torch.zeros(3, 5)
    adv = torch.tensor([1.0, -1.0, 0.5])
    mask = torch.rand(3, 5, generator=g) < 0.5
    for cfg in (GRPOLossConfig(), GSPOLossConfig(clip_low=0.2, clip_high=0.28)):
        logp.grad = None
        loss, _ = get_policy_loss(cfg)(logp, old, adv, mask)
        loss.backward()
        assert torch.all(logp.grad[~mask] == 0), cfg.type
        assert torch.all(logp.grad[mask] != 0), cfg.type


def test_clipping_cuts_gradient_where_it_should():
    # A > 0 and ratio above 1 + clip_high: no gradient. A > 0 below 1 - clip_low: gradient stays.
    logp = torch.tensor([[0.5, -0.5, 0.5, -0.5]], requires_grad=True)
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = GRPO(logp, old, torch.tensor([1.0]), mask)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0  # clipped: r = 1.65 > 1.28
    assert logp.grad[0, 1] != 0 and logp.grad[0, 3] != 0  # pessimistic branch keeps the gradient
    assert m["pg_clipfrac"] == pytest.approx(0.5)
    # A < 0: the mirror image
    logp.grad = None
    loss, _ = GRPO(logp, old, torch.tensor([-1.0]), mask)
    loss.backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 0] != 0


def test_grpo_matches_autograd_of_reference_formula():
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(4, 6, generator=g) * 0.3).requires_grad_()
    old = torch.randn(4, 6, generator=g) * 0.3
    behav = old + torch.randn(4, 6, generator=g) * 0.5
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.7
    loss, _ = GRPO(logp, old, adv, mask, behav_logp=behav)
    (grad,) = torch.autograd.grad(loss, logp)
    x = logp.detach().clone().requires_grad_()
    r = torch.exp(x - old)
    w = torch.minimum(torch.exp(old - behav), torch.tensor(2.0))
    a = adv[:, None]
    per = w * torch.maximum(-a * r, -a * torch.clamp(r, 0.8, 1.28))
    ref = per[mask].mean()
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-7)


def test_truncated_is_weight_caps():
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2)
    behav = torch.tensor([[-5.0, 0.5]])  # pi_old/pi_behav = e^5 (capped to 2), e^-0.5
    loss, m = GRPO(
        logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), behav_logp=behav
    )
    assert loss.item() == pytest.approx(-(2.0 + math.exp(-0.5)) / 2)
    assert m["is_weight_mean"] == pytest.approx((2.0 + math.exp(-0.5)) / 2)


def test_gspo_hand_computed():
    logp = torch.tensor([[0.0002, 0.0004, 9.0], [0.001, 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, 1.0])
    loss, _ = GSPO(logp, old, adv, mask)
    s1 = math.exp(0.0003)  # inside [1-3e-4, 1+4e-4]
    s2 = math.exp(0.001 / 3)  # 1.000333 < 1.0004, inside
    assert loss.item() == pytest.approx(-(s1 + s2) / 2, rel=1e-7)
    loss.backward()
    assert logp.grad[0, 2] == 0  # masked token: no gradient even with a wild logp
    logp2 = torch.tensor([[0.01, 0.01, 0.0]], requires_grad=True)  # s = e^0.01 > 1 + 4e-4
    loss2, m = GSPO(
        logp2, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool)
    )
    loss2.backward()
    assert torch.all(logp2.grad == 0) and m["pg_clipfrac"] == 1.0


def test_empty_mask_gives_zero_loss_with_graph():
    logp = torch.zeros(2, 3, requires_grad=True)
    for name in ("grpo", "gspo"):
        loss, _ = get_policy_loss(default_loss_config(name))(
            logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool)
        )
        assert loss.item() == 0.0
        loss.backward()


@pytest.mark.parametrize(
    "cls, kwargs, arg",
    [
        (GRPOLossConfig, {"clip_low": 0.0}, "clip_low"),
        (GRPOLossConfig, {"clip_low": 1.0}, "clip_low"),
        (GSPOLossConfig, {"clip_high": -1}, "clip_high"),
        (GRPOLossConfig, {"aggregation": "sum"}, "aggregation"),
        (GSPOLossConfig, {"aggregation": "token-mean"}, "aggregation"),  # not a GSPO field
        (GRPOLossConfig, {"is_cap": 0}, "is_cap"),
        (GRPOLossConfig, {"kl_coef": -0.1}, "kl_coef"),
        (GSPOLossConfig, {"kl_coef": 0.1}, "kl_coef"),  # no reference model: refused
    ],
)
def test_invalid_config(cls, kwargs, arg):
    with pytest.raises(ValidationError) as err:
        cls(**kwargs)
    assert err.value.errors()[0]["loc"] == (arg,)


def test_shape_errors():
    f = get_policy_loss(default_loss_config("grpo"))
    with pytest.raises(ValueError, match="^adv:"):
        f(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="^mask:"):
        f(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="^old_logp:"):
        f(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    "cfg",
    [
        GRPOLossConfig(),
        GRPOLossConfig(aggregation="seq-mean-token-mean"),
        GSPOLossConfig(clip_low=0.1, clip_high=0.1),
    ],
)
def test_micro_batch_sums_give_the_whole_batch_loss_and_gradient(cfg):
    # Whole rows split into micro-batches, each summed loss divided by the whole batch's units:
    # the sum of those is the batch loss, and so is the sum of their gradients.
    g = torch.Generator().manual_seed(2)
    n, t = 9, 7
    logp = (torch.randn(n, t, generator=g) * 0.2).requires_grad_()
    old = torch.randn(n, t, generator=g) * 0.2
    behav = old + torch.randn(n, t, generator=g) * 0.3
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, t, generator=g) < 0.5
    mask[3] = False  # a row with nothing kept
    loss_fn = get_policy_loss(cfg)
    whole, stats = loss_fn(logp, old, adv, mask, behav_logp=behav)
    (g_whole,) = torch.autograd.grad(whole, logp)
    units = loss_fn.units(mask)
    assert units == (
        int(mask.sum()) if cfg.type == "grpo" and cfg.aggregation == "token-mean" else n - 1
    )
    total = torch.zeros(())
    sums: dict[str, list[float]] = {}
    for rows in (
        torch.tensor([0, 5]),
        torch.tensor([1, 2, 3]),
        torch.tensor([4]),
        torch.tensor([6, 7, 8]),
    ):
        part = loss_fn.summed(logp[rows], old[rows], adv[rows], mask[rows], behav[rows])
        total = total + part.total / units
        for k, (s, c) in part.stats.items():
            sums.setdefault(k, [0.0, 0.0])
            sums[k][0] += s
            sums[k][1] += c
    (g_parts,) = torch.autograd.grad(total, logp)
    assert total.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(g_parts, g_whole, atol=1e-7)
    assert g_whole.abs().sum() > 0
    for k, (s, c) in sums.items():
        assert s / c == pytest.approx(stats[k], rel=1e-6, abs=1e-9), k

from __future__ import annotations

import math

import pytest
import torch

from learner.loss import GRPO_CLIP, GSPO_CLIP, POLICY_LOSSES, LossConfig, get_policy_loss


def test_registry():
    assert {"grpo", "gspo"} <= set(POLICY_LOSSES)
    with pytest.raises(ValueError, match="^policy_loss:"):
        get_policy_loss("ppo2")


def test_grpo_hand_computed():
    # 2 sequences x 2 tokens; ratios: e^0.1, e^-0.5 | e^0.5, 1
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, -0.5], [0.5, 0.0]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = get_policy_loss("grpo")(logp, old, adv, mask, GRPO_CLIP)
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
    cfg = LossConfig(aggregation="seq-mean-token-mean")
    loss, _ = get_policy_loss("grpo")(logp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx((-1.0 + -3.0) / 2)
    loss_tm, _ = get_policy_loss("grpo")(logp, old, adv, mask, GRPO_CLIP)
    assert loss_tm.item() == pytest.approx((-3.0 - 3.0) / 4)


def test_gradient_flows_only_through_kept_tokens():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 5, generator=g) * 0.01).requires_grad_()
    old = torch.zeros(3, 5)
    adv = torch.tensor([1.0, -1.0, 0.5])
    mask = torch.rand(3, 5, generator=g) < 0.5
    for name in ("grpo", "gspo"):
        logp.grad = None
        loss, _ = get_policy_loss(name)(logp, old, adv, mask, LossConfig(clip_low=0.2, clip_high=0.28))
        loss.backward()
        assert torch.all(logp.grad[~mask] == 0), name
        assert torch.all(logp.grad[mask] != 0), name


def test_clipping_cuts_gradient_where_it_should():
    # A > 0 and ratio above 1 + clip_high: no gradient. A > 0 below 1 - clip_low: gradient stays.
    logp = torch.tensor([[0.5, -0.5, 0.5, -0.5]], requires_grad=True)
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = get_policy_loss("grpo")(logp, old, torch.tensor([1.0]), mask, GRPO_CLIP)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0  # clipped: r = 1.65 > 1.28
    assert logp.grad[0, 1] != 0 and logp.grad[0, 3] != 0  # pessimistic branch keeps the gradient
    assert m["pg_clipfrac"] == pytest.approx(0.5)
    # A < 0: the mirror image
    logp.grad = None
    loss, _ = get_policy_loss("grpo")(logp, old, torch.tensor([-1.0]), mask, GRPO_CLIP)
    loss.backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 0] != 0


def test_grpo_matches_autograd_of_reference_formula():
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(4, 6, generator=g) * 0.3).requires_grad_()
    old = torch.randn(4, 6, generator=g) * 0.3
    behav = old + torch.randn(4, 6, generator=g) * 0.5
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.7
    loss, _ = get_policy_loss("grpo")(logp, old, adv, mask, GRPO_CLIP, behav_logp=behav)
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
    loss, m = get_policy_loss("grpo")(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), GRPO_CLIP, behav_logp=behav)
    assert loss.item() == pytest.approx(-(2.0 + math.exp(-0.5)) / 2)
    assert m["is_weight_mean"] == pytest.approx((2.0 + math.exp(-0.5)) / 2)


def test_gspo_hand_computed():
    logp = torch.tensor([[0.0002, 0.0004, 9.0], [0.001, 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, 1.0])
    loss, _ = get_policy_loss("gspo")(logp, old, adv, mask, GSPO_CLIP)
    s1 = math.exp(0.0003)  # inside [1-3e-4, 1+4e-4]
    s2 = math.exp(0.001 / 3)  # 1.000333 < 1.0004, inside
    assert loss.item() == pytest.approx(-(s1 + s2) / 2, rel=1e-7)
    loss.backward()
    assert logp.grad[0, 2] == 0  # masked token: no gradient even with a wild logp
    logp2 = torch.tensor([[0.01, 0.01, 0.0]], requires_grad=True)  # s = e^0.01 > 1 + 4e-4
    loss2, m = get_policy_loss("gspo")(logp2, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool), GSPO_CLIP)
    loss2.backward()
    assert torch.all(logp2.grad == 0) and m["pg_clipfrac"] == 1.0


def test_empty_mask_gives_zero_loss_with_graph():
    logp = torch.zeros(2, 3, requires_grad=True)
    for name in ("grpo", "gspo"):
        loss, _ = get_policy_loss(name)(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool), GRPO_CLIP)
        assert loss.item() == 0.0
        loss.backward()


@pytest.mark.parametrize(
    "kwargs, arg",
    [({"clip_low": 0.0}, "clip_low"), ({"clip_low": 1.0}, "clip_low"), ({"clip_high": -1}, "clip_high"),
     ({"aggregation": "sum"}, "aggregation"), ({"is_cap": 0}, "is_cap"), ({"kl_coef": -0.1}, "kl_coef")],
)
def test_invalid_config(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        LossConfig(**kwargs)


def test_shape_errors():
    f = get_policy_loss("grpo")
    with pytest.raises(ValueError, match="^adv:"):
        f(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool), GRPO_CLIP)
    with pytest.raises(ValueError, match="^mask:"):
        f(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), GRPO_CLIP)
    with pytest.raises(ValueError, match="^old_logp:"):
        f(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool), GRPO_CLIP)


def test_kl_term_pulls_towards_reference():
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), -1.0)
    cfg = LossConfig(kl_coef=0.5)
    loss, _ = get_policy_loss("grpo")(logp, torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), cfg, ref_logp=ref)
    assert loss.item() == pytest.approx(0.5 * (math.exp(-1) + 1 - 1))

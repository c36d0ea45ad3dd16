"""Micro-batching and gradient checkpointing on the real DeepSpeed learner (CPU, gloo).

A step split into several micro-batches must give the weights of the same step in one
micro-batch: the losses are sums divided by the whole batch's units, and the gradients of all
micro-batches accumulate into one optimizer step.
"""

from __future__ import annotations

import pytest
import torch

from learner.batch import LearnerBatch
from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from learner.launch import spawn_local
from selector.presets import get_preset
from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer

pytestmark = pytest.mark.integration

TOK = CharTokenizer()
WIDTH = 16
BUDGET = 30  # padded tokens: 2-3 rows of this batch per micro-batch


def policy() -> torch.nn.Module:
    return build_policy(PolicySpec(n_layer=2, n_embd=32, n_head=2, n_positions=32), TOK, seed=0)


def make_batch(seed: int, n: int = 24) -> LearnerBatch:
    """Prompts of 5-8 tokens, responses of 1-7: rows of uneven length, so micro-batches differ."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TOK.vocab_size, (n, WIDTH), generator=g)
    prompt = torch.randint(5, 9, (n,), generator=g)
    seq = prompt + torch.randint(1, 8, (n,), generator=g)
    pos = torch.arange(WIDTH).unsqueeze(0)
    resp = (pos >= prompt[:, None]) & (pos < seq[:, None])
    behav = torch.where(resp, -torch.rand(n, WIDTH, generator=g) * 3, 0.0)
    return LearnerBatch(ids, prompt, seq, behav, torch.randn(n, generator=g))


def run_steps(cfg_kwargs: dict, preset: str = "d3s", pool: str = "batch", n_steps: int = 2):
    eng = LearnerEngine(policy(), LearnerConfig(lr=1e-3, **cfg_kwargs), schedule_steps=10)
    p = get_preset(preset, token_pool=pool)
    metrics = [eng.train_step(make_batch(step), p, 0.4) for step in range(n_steps)]
    return metrics, eng.state_dict_cpu()


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, float((a[k] - b[k]).abs().max()))


def assert_trained(state: dict) -> None:
    before = policy().state_dict()
    assert not torch.equal(
        before["transformer.h.0.attn.c_attn.weight"], state["transformer.h.0.attn.c_attn.weight"]
    )


@pytest.mark.parametrize("loss", ["grpo", "gspo"])
@pytest.mark.parametrize("pool", ["batch", "sequence"])
def test_micro_batches_give_the_weights_of_one_batch(loss, pool):
    # GSPO's own clip (3e-4) would clip nearly every sequence at lr 1e-3; a wider one keeps
    # gradients flowing so the comparison means something.
    loss_cfg = (
        {"type": loss} if loss == "grpo" else {"type": loss, "clip_low": 0.2, "clip_high": 0.2}
    )
    whole_m, whole = run_steps({"loss": loss_cfg}, pool=pool)
    split_m, split = run_steps({"loss": loss_cfg, "micro_batch_tokens": BUDGET}, pool=pool)
    assert [m["micro_batches"] for m in whole_m] == [1.0, 1.0]
    assert all(m["micro_batches"] >= 4 for m in split_m)
    assert_trained(whole)
    assert_same_weights(whole, split)
    for a, b in zip(whole_m, split_m, strict=True):
        for k in ("loss", "grad_norm", "tokens_kept", "pg_clipfrac", "ratio_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
        # each micro-batch is cut after its own last kept token, not the batch's
        assert b["tokens_forward"] <= a["tokens_forward"]


def test_micro_batches_with_the_full_pass_and_seq_mean_aggregation():
    cfg = {"token_pass": "full", "loss": {"type": "grpo", "aggregation": "seq-mean-token-mean"}}
    _, whole = run_steps(cfg)
    split_m, split = run_steps({**cfg, "micro_batch_tokens": BUDGET})
    assert all(m["micro_batches"] >= 8 for m in split_m)  # full: all 24 rows, <= 3 per micro-batch
    assert_same_weights(whole, split)


def test_every_forward_stays_within_the_token_budget():
    eng = LearnerEngine(policy(), LearnerConfig(micro_batch_tokens=BUDGET), schedule_steps=10)
    shapes: list[tuple[int, int]] = []
    eng.module.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    batch = make_batch(0)
    eng.train_step(batch, get_preset("grpo"), 1.0)
    assert all(rows * width <= BUDGET for rows, width in shapes), shapes
    # grpo keeps every token: no no-grad pass, the gradient pass runs each row once
    assert sum(rows for rows, _ in shapes) == batch.size


def test_gradient_checkpointing_gives_the_same_weights():
    cfg = {"micro_batch_tokens": BUDGET}
    _, plain = run_steps(cfg)
    metrics, ckpt = run_steps({**cfg, "gradient_checkpointing": True})
    assert_trained(ckpt)
    assert_same_weights(plain, ckpt)
    assert all(m["micro_batches"] >= 4 for m in metrics)


def block_calls_in_one_step(gradient_checkpointing: bool) -> tuple[int, float]:
    cfg = LearnerConfig(micro_batch_tokens=BUDGET, gradient_checkpointing=gradient_checkpointing)
    eng = LearnerEngine(policy(), cfg, schedule_steps=10)
    calls = [0]
    # A pre-hook inside the block: hooks on the block itself stay outside the checkpoint, and
    # the recompute stops (early) before the inner module's forward returns.
    eng.module.transformer.h[0].mlp.register_forward_pre_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1)
    )
    metrics = eng.train_step(make_batch(0), get_preset("grpo"), 1.0)
    return calls[0], metrics["micro_batches"]


def test_gradient_checkpointing_recomputes_each_block_in_backward():
    plain, _ = block_calls_in_one_step(False)
    ckpt, grad_micro_batches = block_calls_in_one_step(True)
    assert ckpt - plain == grad_micro_batches >= 4  # one recompute per gradient micro-batch


def test_gradient_checkpointing_refused_for_a_model_without_it():
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"^learner\.gradient_checkpointing:"):
        LearnerEngine(Plain(), LearnerConfig(gradient_checkpointing=True), schedule_steps=1)


def _rank_worker(micro_batch_tokens: int | None):
    metrics, state = run_steps({"zero_stage": 2, "micro_batch_tokens": micro_batch_tokens})
    return metrics, {k: v.numpy() for k, v in state.items()}


def test_world_size_2_micro_batched_matches_world_size_1_whole():
    # Each rank plans its own micro-batches; counts differ between ranks and are evened out
    # with placeholders, since ZeRO-2 reduces gradients in every backward.
    (m0, s0), (m1, _) = spawn_local(2, _rank_worker, BUDGET)
    single_m, single = _rank_worker(None)
    assert [m["loss"] for m in m0] == pytest.approx(
        [m["loss"] for m in single_m], rel=1e-5, abs=1e-7
    )
    assert [m["loss"] for m in m0] == pytest.approx([m["loss"] for m in m1])
    assert all(m["micro_batches"] >= 2 for m in m0)
    for k, v in single.items():
        assert torch.allclose(torch.from_numpy(s0[k]), torch.from_numpy(v), atol=1e-5, rtol=0), k

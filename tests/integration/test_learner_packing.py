"""Sequence packing on the real DeepSpeed learner (CPU, gloo): packed rows must give the loss
and gradients of padded rows, on GPT-2 (the built-in policy), Llama (SmolLM2's architecture)
and Qwen2, and a model that lets packed rows see each other is refused at start."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from learner.batch import LearnerBatch
from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from selector.presets import get_preset
from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer

pytestmark = pytest.mark.integration

TOK = CharTokenizer()
VOCAB = len(TOK)  # every model gets the built-in policy's vocabulary
WIDTH = 48


def gpt2() -> torch.nn.Module:
    spec = PolicySpec(n_layer=2, n_embd=32, n_head=2, n_positions=256)
    return build_policy(spec, TOK, seed=0)


def _small(cfg_cls, model_cls) -> torch.nn.Module:
    cfg = cfg_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_cls(cfg).float()


MODELS = {
    "gpt2": gpt2,
    "llama": lambda: _small(LlamaConfig, LlamaForCausalLM),
    "qwen2": lambda: _small(Qwen2Config, Qwen2ForCausalLM),
}


def make_batch(seed: int, n: int = 16, width: int = WIDTH, long_tail: bool = False):
    """Prompts of 3-12 tokens and responses of 1-35 (``long_tail``: mostly short, a few up to
    the width, as sampled answers are): rows of very uneven length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, width), generator=g)
    prompt = torch.randint(3, 13, (n,), generator=g)
    if long_tail:
        resp = (-30 * torch.rand(n, generator=g).log()).long() + 1  # exponential, mean ~30
        resp = torch.minimum(resp, width - prompt)
    else:
        resp = torch.randint(1, 36, (n,), generator=g)
    seq = prompt + resp
    pos = torch.arange(width).unsqueeze(0)
    in_resp = (pos >= prompt[:, None]) & (pos < seq[:, None])
    behav = torch.where(in_resp, -torch.rand(n, width, generator=g) * 3, 0.0)
    return LearnerBatch(ids, prompt, seq, behav, torch.randn(n, generator=g))


def one_step(model: str, preset: str, **cfg) -> tuple[dict, dict[str, torch.Tensor]]:
    """One step's metrics and the gradients it applied (ZeRO-0 keeps them on the parameters
    until the optimizer step, which is wrapped to copy them first)."""
    eng = LearnerEngine(MODELS[model](), LearnerConfig(zero_stage=0, **cfg), schedule_steps=10)
    grads: dict[str, torch.Tensor] = {}
    step = eng.engine.step

    def capture() -> None:
        for name, p in eng.module.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()
        step()

    eng.engine.step = capture
    metrics = eng.train_step(make_batch(0), get_preset(preset), 0.4)
    return metrics, grads


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize(
    ("preset", "cfg"),
    [
        ("d3s", {}),  # the compact pass: kept rows, each cut after its last kept token
        ("grpo", {"micro_batch_tokens": 96, "token_pass": "full"}),  # several micro-batches
        ("d3s", {"micro_batch_tokens": 96, "loss": {"type": "gspo", "clip_high": 0.2}}),
    ],
)
def test_packing_gives_the_loss_and_gradients_of_padded_rows(model, preset, cfg):
    pad_m, pad_g = one_step(model, preset, **cfg)
    pack_m, pack_g = one_step(model, preset, packing=True, **cfg)
    assert pad_g.keys() == pack_g.keys() and len(pad_g) > 0
    worst = max(float((pad_g[k] - pack_g[k]).abs().max()) for k in pad_g)
    scale = max(float(g.abs().max()) for g in pad_g.values())
    assert scale > 1e-4  # there is a gradient to compare
    assert worst <= 1e-5 * scale, (worst, scale)
    for k in ("loss", "grad_norm", "tokens_kept", "ratio_mean", "entropy"):
        assert pack_m[k] == pytest.approx(pad_m[k], rel=1e-5, abs=1e-7), k
    assert pack_m["padded_token_share"] < pad_m["padded_token_share"]


def test_padded_token_share_with_and_without_packing():
    batch = make_batch(1, n=64, width=160, long_tail=True)
    shares = {}
    for packing in (False, True):
        for budget in (None, 1024):
            cfg = LearnerConfig(micro_batch_tokens=budget, packing=packing)
            eng = LearnerEngine(gpt2(), cfg, schedule_steps=10)
            m = eng.train_step(batch, get_preset("grpo"), 1.0)
            shares[packing, budget] = m["padded_token_share"]
    lengths = batch.seq_lengths.float()
    # one micro-batch, every row padded to the widest: the share the shapes alone give
    assert shares[False, None] == pytest.approx(float(1 - lengths.mean() / lengths.max()), rel=1e-6)
    assert shares[False, 1024] < shares[False, None]  # length-sorted micro-batches pad less
    assert shares[True, None] < 0.1 and shares[True, 1024] < 0.1, shares


def test_a_model_that_lets_packed_rows_see_each_other_is_refused():
    # OPT derives nothing from position restarts: its packed forward attends across rows.
    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"^learner\.packing: OPTForCausalLM does not keep"):
        LearnerEngine(OPTForCausalLM(cfg), LearnerConfig(packing=True), schedule_steps=1)
    LearnerEngine(OPTForCausalLM(cfg), LearnerConfig(), schedule_steps=1)  # unpacked: fine

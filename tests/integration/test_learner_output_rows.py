"""The learner computes logits only where a loss or a selection reads them (learner/forward.py),
and runs no no-grad pass when every response token is kept (GRPO): its step must equal the plain
computation that scores every position with full logits, on GPT-2 (the built-in policy) and
Llama (SmolLM2's architecture), padded and packed, in the compact and full gradient passes, and
on the fallback for a model whose output layer the learner cannot reach."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learner.batch import LearnerBatch
from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from learner.logits import logprobs_and_entropy
from learner.loss import get_policy_loss
from selector.presets import get_preset, select_tokens
from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer

pytestmark = pytest.mark.integration

TOK = CharTokenizer()
VOCAB = len(TOK)
WIDTH = 40
TEMPERATURE = 0.7
RATIO = 0.3


def gpt2() -> torch.nn.Module:
    return build_policy(PolicySpec(n_layer=2, n_embd=32, n_head=2, n_positions=64), TOK, seed=0)


def llama() -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,  # as SmolLM2: the output layer is the embedding
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).float()


MODELS = {"gpt2": gpt2, "llama": llama}


def make_batch(n: int = 12) -> LearnerBatch:
    """Prompts of 4-14 tokens (longer than most responses, as real prompts are) and responses
    of 1-24: most positions are prompt positions."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (n, WIDTH), generator=g)
    prompt = torch.randint(4, 15, (n,), generator=g)
    seq = prompt + torch.randint(1, 25, (n,), generator=g)
    pos = torch.arange(WIDTH)[None]
    resp = (pos >= prompt[:, None]) & (pos < seq[:, None])
    # behaviour log-probs far below the learner's: a large gap at unkept targets must not
    # overflow exp() in the ratio
    behav = torch.where(resp, -40 * torch.rand(n, WIDTH, generator=g), 0.0)
    return LearnerBatch(ids, prompt, seq, behav, torch.randn(n, generator=g))


def reference(model: torch.nn.Module, batch: LearnerBatch, preset: str, cfg: LearnerConfig):
    """The step's loss and gradients the plain way: one padded forward, every position's full
    logits, entropies and old log-probs of all of them, then the same selection and loss."""
    model.eval()  # dropout off, as the learner turns it off
    labels = batch.input_ids[:, 1:]
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask()}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        old_logp, ent = logprobs_and_entropy(logits, labels, TEMPERATURE)
    resp = batch.target_mask()
    mask = select_tokens(get_preset(preset), batch.advantages, ent, resp, RATIO) & resp
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    logp, _ = logprobs_and_entropy(logits, labels, TEMPERATURE, with_entropy=False)
    loss, _ = get_policy_loss(cfg.loss)(
        logp, old_logp, batch.advantages, mask, batch.behav_logp[:, 1:]
    )
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, float((ent * resp).sum() / resp.sum())


def learner_step(model: torch.nn.Module, batch: LearnerBatch, preset: str, cfg: LearnerConfig):
    """The learner's loss, the gradients it applied (ZeRO-0 keeps them on the parameters until
    the optimizer step, wrapped to copy them first), and its metrics."""
    eng = LearnerEngine(model, cfg, schedule_steps=10)
    grads: dict[str, torch.Tensor] = {}
    step = eng.engine.step

    def capture() -> None:
        grads.update({k: p.grad.clone() for k, p in eng.module.named_parameters()})
        step()

    eng.engine.step = capture
    score, scored = eng._score, []
    eng._score = lambda *a: scored.append(1) or score(*a)
    metrics = eng.train_step(batch, get_preset(preset), RATIO)
    return {**metrics, "no_grad_passes": len(scored)}, grads


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("d3s", {}),  # compact pass, one padded micro-batch
        ("d3s", {"packing": True, "micro_batch_tokens": 160}),
        ("grpo", {"token_pass": "full", "micro_batch_tokens": 100}),  # no no-grad pass
        ("grpo", {"packing": True}),
        ("d3s", {"loss": {"type": "gspo", "clip_low": 0.2, "clip_high": 0.2}}),
    ],
)
def test_the_step_equals_full_logits_scoring(model, preset, extra):
    cfg = LearnerConfig(zero_stage=0, temperature=TEMPERATURE, grad_clip=1e9, **extra)
    batch = make_batch()
    want_loss, want_grads, want_ent = reference(MODELS[model](), batch, preset, cfg)
    metrics, grads = learner_step(MODELS[model](), batch, preset, cfg)
    assert metrics["loss"] == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    assert metrics["entropy"] == pytest.approx(want_ent, rel=1e-5)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    # GRPO keeps every response token: nothing to rank, so no no-grad pass
    assert metrics["no_grad_passes"] == (0 if preset == "grpo" else 1)
    assert want_grads.keys() <= grads.keys() and want_grads
    scale = max(float(g.abs().max()) for g in want_grads.values())
    assert scale > 1e-4  # a gradient to compare
    worst = max(float((grads[k] - g).abs().max()) for k, g in want_grads.items())
    assert worst <= 1e-5 * scale, (worst, scale)


def test_a_model_without_reachable_output_embeddings_falls_back_to_all_logits():
    cfg = LearnerConfig(zero_stage=0, temperature=TEMPERATURE, grad_clip=1e9)
    batch = make_batch()
    want_loss, want_grads, _ = reference(llama(), batch, "d3s", cfg)
    model = llama()
    model.get_output_embeddings = lambda: None  # the learner cannot hook its output layer
    metrics, grads = learner_step(model, batch, "d3s", cfg)
    assert metrics["loss"] == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    scale = max(float(g.abs().max()) for g in want_grads.values())
    worst = max(float((grads[k] - g).abs().max()) for k, g in want_grads.items())
    assert worst <= 1e-5 * scale, (worst, scale)

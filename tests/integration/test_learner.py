"""The DeepSpeed learner on CPU (gloo): world size 1 and 2, checkpoint resume."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from learner.batch import LearnerBatch
from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from learner.launch import spawn_local
from selector.presets import get_preset

pytestmark = pytest.mark.integration


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=15,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(cfg)


def make_batch(seed: int, n: int = 24) -> LearnerBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 15, (n, 13), generator=g)
    prompt = torch.full((n,), 8)
    seq = torch.randint(9, 14, (n,), generator=g)
    pos = torch.arange(13).unsqueeze(0)
    behav = torch.where(
        (pos >= prompt[:, None]) & (pos < seq[:, None]), -torch.rand(n, 13, generator=g) * 3, 0.0
    )
    return LearnerBatch(ids, prompt, seq, behav, torch.randn(n, generator=g))


def run_steps(
    n_steps: int, preset: str, cfg_kwargs: dict, ckpt_dir: str | None = None, resume: bool = False
):
    eng = LearnerEngine(tiny_model(), LearnerConfig(**cfg_kwargs), schedule_steps=10)
    start = 0
    if resume:
        state = eng.load_checkpoint(ckpt_dir)
        start = state["step"]
    out = []
    for step in range(start, start + n_steps):
        out.append(eng.train_step(make_batch(step), get_preset(preset), 0.3))
        if ckpt_dir and not resume:
            eng.save_checkpoint(ckpt_dir, step + 1, {"note": "test"})
    return out, eng.state_dict_cpu()


@pytest.mark.parametrize(
    "preset,token_pass", [("grpo", "compact"), ("d3s", "compact"), ("d3s", "full")]
)
def test_world_size_1_steps_change_weights(preset, token_pass):
    before = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    metrics, after = run_steps(3, preset, {"token_pass": token_pass, "lr": 1e-3})
    for m in metrics:
        assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
        assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # old_logp is the step's own policy
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "transformer.h.0.attn.c_attn.weight" in changed
    if preset == "d3s":
        assert metrics[0]["tokens_kept"] == pytest.approx(
            round(0.3 * metrics[0]["tokens_valid"] + 0.5), abs=1
        )
        if token_pass == "compact":
            assert metrics[0]["tokens_forward"] < 0.8 * make_batch(0).seq_lengths.sum()


def test_compact_and_full_passes_give_the_same_update():
    _, w_compact = run_steps(2, "d3s", {"token_pass": "compact", "lr": 1e-3})
    _, w_full = run_steps(2, "d3s", {"token_pass": "full", "lr": 1e-3})
    for k in w_full:
        assert torch.allclose(w_compact[k], w_full[k], atol=1e-6), k


def _rank_worker(preset: str, zero_stage: int):
    metrics, state = run_steps(2, preset, {"zero_stage": zero_stage, "lr": 1e-3})
    return [m["loss"] for m in metrics], {k: v.numpy() for k, v in state.items()}


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_world_size_2_matches_world_size_1(zero_stage):
    results = spawn_local(2, _rank_worker, "d3s", zero_stage)
    single_losses, single_state = _rank_worker("d3s", zero_stage)
    (l0, s0), (l1, s1) = results
    assert l0 == pytest.approx(l1)  # every rank reports the global loss
    assert l0 == pytest.approx(single_losses, rel=1e-4, abs=1e-6)
    for k, v in single_state.items():
        assert torch.allclose(torch.from_numpy(s0[k]), torch.from_numpy(v), atol=1e-5), k
        assert torch.allclose(torch.from_numpy(s0[k]), torch.from_numpy(s1[k])), k


def test_checkpoint_resume_gives_same_next_step_loss(tmp_path):
    straight, _ = run_steps(3, "d3s", {"lr": 1e-3})
    run_steps(2, "d3s", {"lr": 1e-3}, ckpt_dir=str(tmp_path))
    resumed, _ = run_steps(1, "d3s", {"lr": 1e-3}, ckpt_dir=str(tmp_path), resume=True)
    assert resumed[0]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-6, abs=1e-9)
    assert resumed[0]["grad_norm"] == pytest.approx(straight[2]["grad_norm"], rel=1e-5)


def test_gspo_loss_runs():
    metrics, _ = run_steps(2, "d3s", {"loss": {"type": "gspo"}})
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


def test_invalid_config_names_field():
    with pytest.raises(ValueError, match="lr"):
        LearnerConfig(lr=-1)
    with pytest.raises(ValueError, match="zero_stage"):
        LearnerConfig(zero_stage=4)
    with pytest.raises(ValueError, match="unknown_field"):
        LearnerConfig(unknown_field=1)

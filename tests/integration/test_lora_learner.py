"""LoRA on the real DeepSpeed learner (CPU, gloo), tiny Llama: the base stays frozen and out of
the optimizer at every ZeRO stage, a version carries the adapter alone (PEFT's saved names, the
engines' dtype), packing gives the padded loss, and a checkpoint holds the adapter only."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import get_peft_model_state_dict

from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from learner.launch import spawn_local
from selector.presets import get_preset
from services.policy.lora import LoraConfig, adapter_params
from tests.integration.test_learner_packing import MODELS, make_batch

pytestmark = pytest.mark.integration

LORA = LoraConfig(rank=4, alpha=8.0)


def base_digest(module: torch.nn.Module) -> str:
    """sha256 of every frozen (base) parameter, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if not p.requires_grad:
            h.update(name.encode() + p.detach().float().numpy().tobytes())
    return h.hexdigest()


def optimizer_numel(eng: LearnerEngine) -> int:
    """Elements of the parameters the optimizer updates (ZeRO-3's are partitioned: their whole
    size is ds_numel)."""
    opt = eng.engine.optimizer
    flat = getattr(opt, "fp32_partitioned_groups_flat", None)
    if flat is not None:  # ZeRO-3 steps flat fp32 partitions (one rank: the whole)
        return sum(p.numel() for p in flat)
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the AdamW it was given
    return sum(
        int(getattr(p, "ds_numel", p.numel())) for g in inner.param_groups for p in g["params"]
    )


def _step_at_stage(stage: int) -> dict:
    torch.manual_seed(0)
    eng = LearnerEngine(MODELS["llama"](), LearnerConfig(zero_stage=stage, lr=1e-2, lora=LORA), 10)
    module = eng.module
    adapter = adapter_params(module)
    adapter_numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in adapter.values())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    before = eng.state_dict_cpu()
    metrics = eng.train_step(make_batch(0), get_preset("d3s"), 0.5)
    after = eng.state_dict_cpu()
    return {
        "adapter_numel": adapter_numel,
        "optimizer_numel": optimizer_numel(eng),
        "trainable_are_adapter": all(".lora_" in n for n in trainable) and len(trainable) > 0,
        "wire_names": sorted(after),
        "peft_names": sorted(get_peft_model_state_dict(module)),
        "changed": sum(not torch.equal(before[k], after[k]) for k in after),
        "count": len(after),
        "loss": metrics["loss"],
    }


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_only_the_adapter_trains_and_is_published(stage):
    r = spawn_local(1, _step_at_stage, stage)[0] if stage == 3 else _step_at_stage(stage)
    assert r["trainable_are_adapter"]
    assert r["optimizer_numel"] == r["adapter_numel"] > 0
    assert r["wire_names"] == r["peft_names"]  # the contract: PEFT's saved names
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in r["wire_names"])
    # lora_B starts at zero and moves; lora_A moves once B is nonzero: at least every B changed
    assert r["changed"] >= r["count"] // 2


def test_the_base_does_not_move_and_the_adapter_is_cast_to_the_engines_dtype():
    eng = LearnerEngine(MODELS["llama"](), LearnerConfig(zero_stage=1, lr=1e-2, lora=LORA), 10)
    digest = base_digest(eng.module)
    for seed in range(2):
        eng.train_step(make_batch(seed), get_preset("grpo"), 1.0)
    assert base_digest(eng.module) == digest
    eng.set_sync_dtype(torch.bfloat16)
    host = eng.state_dict_cpu()
    live = eng.device_weights()
    assert {t.dtype for t in host.values()} == {torch.bfloat16}
    assert {t.dtype for t in live.values()} == {torch.bfloat16}
    assert host.keys() == live.keys()
    master = adapter_params(eng.module)
    assert all(torch.equal(host[k], master[k].detach().to(torch.bfloat16)) for k in host)


def test_packing_with_lora_gives_the_padded_loss():
    losses = {}
    for packing in (False, True):
        cfg = LearnerConfig(zero_stage=0, lora=LORA, packing=packing, micro_batch_tokens=96)
        torch.manual_seed(0)
        eng = LearnerEngine(MODELS["llama"](), cfg, 10)
        losses[packing] = eng.train_step(make_batch(0), get_preset("d3s"), 0.4)
    for k in ("loss", "grad_norm", "tokens_kept", "entropy"):
        assert losses[True][k] == pytest.approx(losses[False][k], rel=1e-5, abs=1e-7), k


def test_target_modules_that_match_nothing_fail_at_start():
    bad = LoraConfig(target_modules=["q_proj", "c_attn"])  # c_attn is GPT-2's, not Llama's
    with pytest.raises(ValueError, match=r"learner\.lora\.target_modules: \['c_attn'\]"):
        LearnerEngine(MODELS["llama"](), LearnerConfig(lora=bad), 10)


def _learner(stage: int) -> LearnerEngine:
    torch.manual_seed(0)
    cfg = LearnerConfig(zero_stage=stage, lr=1e-2, lora=LORA)
    if stage != 3:
        return LearnerEngine(MODELS["llama"](), cfg, 10)
    with _sharding_every_parameter():
        return LearnerEngine(MODELS["llama"](), cfg, 10)


@contextlib.contextmanager
def _sharding_every_parameter() -> Iterator[None]:
    """ZeRO-3 keeps a parameter under ``stage3_param_persistence_threshold`` (1e5 elements)
    whole on every rank, so this tiny adapter would never be partitioned; at threshold 0 it
    is, as a large model's adapter is (SmolLM2's rank-32 lora_A is 18k elements; a 7B's
    lora_B 131k), and every read of it must gather."""
    import deepspeed

    real = deepspeed.initialize

    def initialize(*args: Any, config: dict, **kwargs: Any) -> Any:
        zero = {**config["zero_optimization"], "stage3_param_persistence_threshold": 0}
        return real(*args, config={**config, "zero_optimization": zero}, **kwargs)

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = real


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_a_resumed_lora_run_continues_from_the_adapter_checkpoint_with_the_base_untouched(
    tmp_path, stage
):
    """ZeRO-3 runs in a spawned rank, like the other ZeRO-3 tests (its partitioned parameters
    and hooks stay out of the test process)."""
    if stage == 3:
        spawn_local(1, _resume_and_export, str(tmp_path), stage)
    else:
        _resume_and_export(str(tmp_path), stage)


def _base_digest_at(module: torch.nn.Module, stage: int) -> str:
    """:func:`base_digest`, gathering ZeRO-3's partitioned base first."""
    if stage != 3:
        return base_digest(module)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return base_digest(module)


def _resume_and_export(tmp: str, stage: int) -> None:
    from pathlib import Path

    from safetensors.torch import load_file

    from learner.export import export_checkpoint
    from learner.export_lora import save_final_adapter
    from services.policy.lora import load_adapter_dir
    from services.policy.model import save_policy
    from services.policy.tokenizer import CharTokenizer

    tmp_path = Path(tmp)
    first = _learner(stage)
    base = _base_digest_at(first.module, stage)
    if stage == 3:  # the adapter is partitioned: reading it whole needs a gather
        assert all(p.numel() == 0 for p in adapter_params(first.module).values())
    first.train_step(make_batch(0), get_preset("d3s"), 0.5)
    first.save_checkpoint(tmp_path / "ckpt", 1, {})
    saved = {p.name for p in (tmp_path / "ckpt" / "step0000001").iterdir()}
    assert "adapter_config.json" in saved
    # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt
    states_file = next((tmp_path / "ckpt" / "step0000001").glob("*mp_rank_00_model_states.pt"))
    states = torch.load(states_file, weights_only=False)
    assert all(".lora_" in k for k in states["module"])  # the adapter alone, no frozen base
    first.train_step(make_batch(1), get_preset("d3s"), 0.5)
    expected = first.state_dict_cpu()
    assert any(float(t.abs().max()) > 0 for k, t in expected.items() if "lora_B" in k)

    resumed = _learner(stage)  # a fresh adapter on the same base, then the checkpoint's
    assert resumed.load_checkpoint(tmp_path / "ckpt")["step"] == 1
    assert _base_digest_at(resumed.module, stage) == base
    resumed.train_step(make_batch(1), get_preset("d3s"), 0.5)
    after = resumed.state_dict_cpu()
    assert _base_digest_at(resumed.module, stage) == base
    for k in expected:  # the optimizer's state came back too: the same second step
        torch.testing.assert_close(after[k], expected[k], rtol=1e-5, atol=1e-6)

    # The learner's final_policy (what d3s run writes at the end): the adapter gathered from
    # the engine in PEFT's format, which scores as the learner does.
    model_dir = save_policy(MODELS["llama"](), CharTokenizer(), tmp_path / "base")
    final = save_final_adapter(resumed, CharTokenizer(), tmp_path / "final_policy")
    assert sorted(load_file(final / "adapter_model.safetensors")) == sorted(after)
    ids = make_batch(2).input_ids[:2]
    with torch.no_grad():
        want = resumed.module.eval()(input_ids=ids).logits
        got = load_adapter_dir(final, base=model_dir)(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # The export of the checkpoint: PEFT's format by default, and it scores as the learner does.
    out = export_checkpoint(tmp_path / "ckpt", model_dir, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert sorted(load_file(out / "adapter_model.safetensors")) == sorted(expected)
    exported = load_adapter_dir(out, base=model_dir)
    learner_at_1 = _learner(stage)
    learner_at_1.load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        want = learner_at_1.module.eval()(input_ids=ids).logits
        torch.testing.assert_close(exported(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def _two_steps(stage: int) -> tuple[list[float], dict, str]:
    """Two LoRA steps at ``stage``: the losses, the published adapter and the base's digest
    (every parameter partitioned at stage 3, so both ranks hold half of each tensor)."""
    eng = _learner(stage)
    digest = _base_digest_at(eng.module, stage)
    losses = [eng.train_step(make_batch(s), get_preset("d3s"), 0.4)["loss"] for s in range(2)]
    assert _base_digest_at(eng.module, stage) == digest
    adapter = {k: v.numpy() for k, v in eng.state_dict_cpu().items()}
    return losses, adapter, digest


def test_two_zero3_ranks_train_the_adapter_as_one_does():
    """Data parallel over two gloo ranks at ZeRO-3 (the stage where each rank holds half of
    every adapter tensor): each rank takes half the batch, and both ranks publish the whole
    adapter one rank would have trained, with the base untouched on both. Stages 1-2 shard
    only the optimizer; their two-rank path is the full-weight one (test_learner.py)."""
    (l0, a0, d0), (l1, a1, d1) = spawn_local(2, _two_steps, 3)
    single_losses, single, digest = _two_steps(0)  # one rank, nothing sharded
    assert l0 == pytest.approx(l1) and l0 == pytest.approx(single_losses, rel=1e-4, abs=1e-6)
    assert d0 == d1 == digest
    assert a0.keys() == a1.keys() == single.keys() and len(single) > 0
    for k, v in single.items():
        assert torch.allclose(torch.from_numpy(a0[k]), torch.from_numpy(v), atol=1e-5), k
        assert torch.equal(torch.from_numpy(a0[k]), torch.from_numpy(a1[k])), k

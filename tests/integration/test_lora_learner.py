"""LoRA on the real DeepSpeed learner (CPU, gloo), tiny Llama: the base stays frozen and out of
the optimizer at every ZeRO stage, a version carries the adapter alone (PEFT's saved names, the
engines' dtype), packing gives the padded loss, and a checkpoint holds the adapter only."""

from __future__ import annotations

import hashlib

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

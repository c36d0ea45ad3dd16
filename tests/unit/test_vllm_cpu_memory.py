"""vLLM on CPU: the KV cache size derived from the model and the batch, which setting wins, and
``d3s validate`` refusing a size that cannot fit in RAM beside the rest of the run (naming the
setting). No vLLM needed: the config's vLLM check is told vLLM is installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from services.rollout import vllm_memory
from services.rollout.config import RolloutConfig
from services.rollout.vllm_memory import (
    GIB,
    ModelMemory,
    check_cpu_fit,
    cpu_kv_cache,
    derived_kv_cache_gib,
    kv_bytes_per_token,
    read_model_memory,
)
from services.run.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
# SmolLM2-135M-Instruct's shape, as `d3s prepare-model` writes it (float32).
SMOLLM2 = ModelMemory(
    params=134_515_008,
    vocab_size=49_152,
    num_layers=30,
    num_kv_heads=3,
    head_dim=64,
    max_positions=8192,
    checkpoint_dtype_bytes=4,
)
# The README's vLLM command line on configs/smollm2.yaml.
README_SETS = [
    "rollout.engine=vllm",
    "rollout.vllm.dtype=float32",
    "rollout.vllm.enforce_eager=true",
    "weight_sync.transport=collective",
    "weight_sync.path=runs/smollm2-weights",
]


@pytest.fixture(autouse=True)
def _vllm_here(monkeypatch):
    monkeypatch.setattr("services.rollout.config.vllm_installed", lambda: True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _rollout(**kw) -> RolloutConfig:
    base = {
        "engine": "vllm",
        "prompts_per_step": 4,
        "samples_per_prompt": 8,
        "max_new_tokens": 40,
        "max_prompt_tokens": 96,
        "vllm": {"dtype": "float32"},
    }
    return RolloutConfig.model_validate({**base, **kw})


def _smollm2(model_dir: Path, *sets: str):
    data = yaml.safe_load((REPO / "configs" / "smollm2.yaml").read_text())
    data["policy"]["path"] = str(model_dir)
    data["task"]["train_path"] = str(REPO / "bench/data/sums/train.jsonl")
    data["task"]["eval_path"] = str(REPO / "bench/data/sums/test.jsonl")
    return parse_config(data, [*README_SETS, *sets])


def test_model_memory_from_config_and_from_safetensors(smollm2_dir, tmp_path):
    # From config.json alone, the count of SmolLM2's own weights (tied embeddings).
    assert read_model_memory(smollm2_dir) == SMOLLM2
    # With weights, the exact count from the safetensors headers.
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    ).to(torch.bfloat16)
    tiny.save_pretrained(tmp_path, safe_serialization=True)
    model = read_model_memory(tmp_path)
    assert model.params == sum(p.numel() for p in tiny.parameters())
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 2, 4)
    assert model.checkpoint_dtype_bytes == 2


def test_derived_kv_cache_follows_the_model_and_the_batch():
    # SmolLM2 in float32: 2 (K, V) x 30 layers x 3 heads x 64 dims x 4 bytes per token.
    assert kv_bytes_per_token(SMOLLM2, "float32") == 46_080
    assert kv_bytes_per_token(SMOLLM2, "bfloat16") == 23_040
    assert kv_bytes_per_token(SMOLLM2, "auto") == 46_080  # the checkpoint's float32
    # configs/smollm2.yaml: 64 sequences of 136 tokens (two 128-token blocks) = 0.70 GiB; one
    # 8192-token sequence (vLLM's minimum) 0.35 GiB; +25% is under the 1 GiB floor.
    assert derived_kv_cache_gib(_rollout(), SMOLLM2) == 1.0
    # 64 x 16 sequences of 496 tokens (512: 4 blocks) x 46,080 B = 22.5 GiB, +25%.
    big = _rollout(prompts_per_step=64, samples_per_prompt=16, max_new_tokens=400)
    assert derived_kv_cache_gib(big, SMOLLM2) == 28.25
    # Half the bytes in bfloat16; max_model_len bounds every sequence (2 x 128-token blocks).
    bf16 = big.model_copy(update={"vllm": big.vllm.model_copy(update={"dtype": "bfloat16"})})
    assert derived_kv_cache_gib(bf16, SMOLLM2) == 14.25
    capped = _rollout(
        prompts_per_step=64,
        samples_per_prompt=16,
        max_new_tokens=200,
        max_prompt_tokens=56,
        vllm={"dtype": "float32", "max_model_len": 256},
    )
    assert derived_kv_cache_gib(capped, SMOLLM2) == 14.25
    # Without max_prompt_tokens every request may be as long as the model's context.
    unbounded = _rollout(max_prompt_tokens=None)
    assert derived_kv_cache_gib(unbounded, SMOLLM2) == 14.25  # 32 x 8192 x 46,080 B x 1.25


def test_environment_then_field_then_derived():
    given = _rollout(vllm={"dtype": "float32", "cpu_kv_cache_gib": 3})
    assert cpu_kv_cache(_rollout(), SMOLLM2, {}).source == "derived"
    kv = cpu_kv_cache(given, SMOLLM2, {})
    assert (kv.gib, kv.source, kv.field, kv.derived_gib) == (
        3.0,
        "rollout.vllm.cpu_kv_cache_gib",
        "rollout.vllm.cpu_kv_cache_gib",
        1.0,
    )
    kv = cpu_kv_cache(given, SMOLLM2, {"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert (kv.gib, kv.field) == (2.0, "VLLM_CPU_KVCACHE_SPACE")
    assert cpu_kv_cache(given, SMOLLM2, {"VLLM_CPU_KVCACHE_SPACE": ""}).gib == 3.0
    for bad in ("1.5", "0", "lots"):
        with pytest.raises(ValueError, match="VLLM_CPU_KVCACHE_SPACE: .* positive whole number"):
            cpu_kv_cache(given, SMOLLM2, {"VLLM_CPU_KVCACHE_SPACE": bad})


def test_fit_check_counts_every_engine_and_the_rest_of_the_run():
    rollout = _rollout(num_actors=2, vllm={"dtype": "float32", "cpu_kv_cache_gib": 4})
    # What SmolLM2's run holds besides the KV caches, at least: the learner's weights, gradients
    # and Adam moments (16 B/param) and its process; its logits and their gradient at one step's
    # 32 x 40 response targets (none at prompt positions) in one micro-batch; each engine's
    # float32 weights and its processes; the background evaluator's float32 copy and its process.
    rest = (
        SMOLLM2.params * 16
        + GIB // 2
        + 32 * 40 * 49_152 * 8
        + 2 * (SMOLLM2.params * 4 + 2 * GIB)
        + SMOLLM2.params * 4
        + GIB // 2
    )
    fit = {"learner_ranks": 1, "micro_batch_tokens": None, "background_eval": True, "environ": {}}
    assert check_cpu_fit(rollout, SMOLLM2, available=rest + 8 * GIB, **fit).gib == 4
    with pytest.raises(ValueError) as err:
        check_cpu_fit(rollout, SMOLLM2, available=rest + 8 * GIB - 1, **fit)
    message = str(err.value)
    assert message.startswith("rollout.vllm.cpu_kv_cache_gib: 4 GiB of KV cache (as configured)")
    assert "for each of 2 vLLM engine(s)" in message
    assert message.endswith("set rollout.vllm.cpu_kv_cache_gib to at most 3.75")
    # A smaller learner micro-batch leaves room (its logits: 512 tokens instead of 1,280).
    small = {**fit, "micro_batch_tokens": 512}
    assert check_cpu_fit(rollout, SMOLLM2, available=rest + 8 * GIB - 1, **small).gib == 4
    # Not checkable (no /proc/meminfo): passes, the engine reports its own refusal.
    assert check_cpu_fit(rollout, SMOLLM2, available=None, **fit).gib == 4
    # Where not even the floor fits, no size is proposed.
    with pytest.raises(ValueError, match="free memory, or lower learner.micro_batch_tokens"):
        check_cpu_fit(rollout, SMOLLM2, available=rest + GIB, **fit)


def test_validate_takes_the_readme_command_and_refuses_what_cannot_fit(smollm2_dir, monkeypatch):
    # The 24 GiB box the README's command failed on had 19.1 GiB available.
    monkeypatch.setattr(vllm_memory, "available_ram_bytes", lambda: int(19.1 * GIB))
    cfg = _smollm2(smollm2_dir)
    assert cfg.rollout.vllm_settings.cpu_kv_cache_gib is None
    assert cpu_kv_cache(cfg.rollout, SMOLLM2, {}).gib == 1.0
    with pytest.raises(ConfigError) as err:
        _smollm2(smollm2_dir, "rollout.vllm.cpu_kv_cache_gib=18")
    assert "rollout.vllm.cpu_kv_cache_gib: 18 GiB of KV cache" in str(err.value)
    assert "does not fit in the 19.1 GiB of RAM available here" in str(err.value)
    # The environment's size is the one vLLM would take, so it is the one checked and named.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "20")
    with pytest.raises(
        ConfigError, match=r"VLLM_CPU_KVCACHE_SPACE: 20 GiB of KV cache \(from the environment\)"
    ):
        _smollm2(smollm2_dir)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    _smollm2(smollm2_dir, "rollout.vllm.cpu_kv_cache_gib=18")  # the environment wins
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    # A derived size that cannot fit names the same field, with the size that would.
    with pytest.raises(ConfigError, match=r"\(derived from the model and the batch\)"):
        _smollm2(
            smollm2_dir,
            "rollout.prompts_per_step=64",
            "rollout.samples_per_prompt=16",
            "rollout.max_new_tokens=400",
        )
    # Engines on another machine (a Ray cluster) are not checked against this one's RAM.
    _smollm2(smollm2_dir, "rollout.vllm.cpu_kv_cache_gib=18", "service.ray_address=auto")


def test_cpu_kv_cache_only_read_on_cpu():
    with pytest.raises(ConfigError, match=r"vllm.cpu_kv_cache_gib: only read on CPU"):
        parse_config(
            {"rollout": {"engine": "vllm", "num_gpus": 1, "vllm": {"cpu_kv_cache_gib": 2}}}
        )
    with pytest.raises(ConfigError, match="cpu_kv_cache_gib"):
        parse_config({"rollout": {"engine": "vllm", "vllm": {"cpu_kv_cache_gib": 0}}})

"""End to end: ``d3s run`` training a LoRA adapter (HF engine, object store; real Redis, Ray,
DeepSpeed): every sync moves the adapter alone, the books balance, and the adapter the run ends
with, loaded into an engine as a sync loads it, samples what the base with that adapter merged
in samples; ``d3s export`` writes it in PEFT's format or merged."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import peft
import pytest
import redis
import torch
from fault_books import audit

from learner.export import export_checkpoint
from services.policy.lora import LoraConfig, adapter_bytes, apply_lora, base_path
from services.policy.model import load_policy
from services.rollout.actor import EngineLoader
from services.rollout.hf_engine import HFRolloutEngine
from services.run.config import parse_config
from services.run.orchestrator import run_service
from services.telemetry.run_log import read_metrics
from services.transport.redis_server import EmbeddedRedis
from services.weightsync.base import WeightReceiver

pytestmark = pytest.mark.integration

STEPS = 3
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["c_attn", "c_proj", "c_fc"]}


class _Given(WeightReceiver):
    """A receiver handing over one version held in memory (as a transport delivers it)."""

    def __init__(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.latest = tensors, version

    def latest_version(self) -> int:
        return self.latest

    def receive(self, into):
        self._load_version(into, self.latest, [dict(self.tensors)])
        return self.latest


def _check_version_directories(weights: Path, final: Path) -> None:
    """The files transport's versions of a LoRA run: the adapter alone, each also a PEFT
    directory naming the run's base; the last one is the adapter the run ended with."""
    from safetensors.torch import load_file

    from services.weightsync.files import adapter_dir, list_versions, read_version

    versions = list_versions(weights)
    assert versions[-1] == STEPS and len(versions) <= 2  # keep_last
    last = adapter_dir(weights, STEPS)
    config = json.loads((last / "adapter_config.json").read_text())
    assert config["r"] == LORA["rank"]
    assert config["base_model_name_or_path"] == str(base_path(final))
    tensors, _, _ = read_version(weights, STEPS)
    assert all(".lora_A." in n or ".lora_B." in n for n in tensors)
    final_adapter = load_file(final / "adapter_model.safetensors")
    assert tensors.keys() == final_adapter.keys()
    for name, t in tensors.items():  # float32 engines: the version is the master copy
        assert torch.equal(t, final_adapter[name]), name
    loaded = peft.PeftModel.from_pretrained(load_policy(base_path(last))[0], str(last))
    assert loaded.peft_config["default"].r == LORA["rank"]


def _greedy(engine: HFRolloutEngine, prompts: list[list[int]]) -> list[list[int]]:
    return engine._sample(prompts, 1, engine._rule(None), None).responses.tolist()


# Over files the run repeats the object store's checks (30 s); the files transport's LoRA versions
# are covered in tests/integration/test_lora_weight_sync.py, so this one runs with -m slow.
@pytest.mark.parametrize(
    "transport", ["object_store", pytest.param("files", marks=pytest.mark.slow)]
)
def test_a_lora_run_syncs_only_the_adapter_and_its_adapter_samples_like_the_merged_model(
    tmp_path: Path, tiny_config, transport: str
) -> None:
    run_dir = tmp_path / "run"
    weights = tmp_path / "weights"
    sync = {"transport": transport, **({"path": str(weights)} if transport == "files" else {})}
    cfg = parse_config(
        tiny_config(
            run_dir,
            tmp_path / "cache",
            name="e2e-lora",
            learner={"lora": LORA, "lr": 1e-3},
            train={"total_steps": STEPS, "eval_every": 100, "checkpoint_every": STEPS, "seed": 1},
            service={
                "namespace": f"e2e{uuid.uuid4().hex[:8]}",
                "max_group_backlog": 8,
                "wait_timeout_s": 300,
            },
            weight_sync=sync,
        )
    )
    summary = run_service(cfg)
    assert summary["steps"] == STEPS
    if transport == "files":
        _check_version_directories(weights, run_dir / "final_policy")

    final = run_dir / "final_policy"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    base_dir = base_path(final)
    base, tokenizer = load_policy(base_dir)
    full_bytes = sum(p.numel() * 4 for p in {id(p): p for p in base.parameters()}.values())
    adapter_size = adapter_bytes(apply_lora(base, LoraConfig(**LORA)), torch.float32)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:  # every sync moved the adapter alone (at most 2x its size: exactly it)
        assert r["weight_sync_bytes"] == adapter_size < full_bytes / 5, r  # float32 engine
    print(f"\nsync bytes {rows[-1]['weight_sync_bytes']:.0f} vs the full model's {full_bytes}")
    with EmbeddedRedis(run_dir / "redis") as server:
        client = redis.Redis.from_url(server.url)
        audit(client, cfg)
        client.close()

    # The adapter of the last version, delivered into a LoRA engine the way a sync loads it.
    out = export_checkpoint(run_dir / "checkpoints", final, tmp_path / "adapter")
    merged_dir = export_checkpoint(run_dir / "checkpoints", final, tmp_path / "merged", merge=True)
    trained = peft.PeftModel.from_pretrained(load_policy(base_dir)[0], str(out))
    adapter = {k: v for k, v in peft.get_peft_model_state_dict(trained).items() if ".lora_" in k}
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    engine_model = apply_lora(load_policy(base_dir)[0], LoraConfig(**LORA))
    engine = HFRolloutEngine(engine_model, tokenizer, max_new_tokens=8)
    _Given(STEPS, adapter).receive(EngineLoader(engine))
    assert engine.version == STEPS
    merged = HFRolloutEngine(load_policy(merged_dir)[0], tokenizer, max_new_tokens=8)
    prompts = [tokenizer.encode(f"{a}+{b}=") for a, b in [(1, 2), (3, 4), (5, 5), (9, 0)]]
    assert _greedy(engine, prompts) == _greedy(merged, prompts)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(
            engine.model(input_ids=ids).logits,
            merged.model(input_ids=ids).logits,
            atol=1e-4,
            rtol=1e-4,
        )

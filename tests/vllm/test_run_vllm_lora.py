"""``d3s run`` with ``rollout.engine: vllm`` and ``learner.lora`` on the tiny Llama of
``test_run_vllm`` (Redis, Ray, DeepSpeed, the collective transport received inside vLLM's
workers, in-flight updates on).

What must hold:

* every sync moves the adapter alone: the learner's ``weight_sync_bytes`` per step is at most
  twice the adapter's size, and each version's catch-up file holds only adapter tensors;
* vLLM loads each version as an adapter id of its own and the tokens of a round come from the
  version it records: the first response of the first round under each version (kept in the
  engine's audit) has the log-probs of the base model with that version's adapter merged in
  (PEFT's ``merge_and_unload``), and each version's adapter in vLLM hashes like the one a fresh
  reference engine loads from that version's catch-up file;
* no round ever ran under an adapter id that was removed, and every id but the newest went;
* the books balance.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import redis
import torch
from fault_books import audit
from test_run_vllm import (  # noqa: F401
    MAX_NEW_TOKENS,
    STEPS,
    _config,
    llama_dir,
    run_d3s,
    task_dir,
)
from test_vllm_engine import hf_logp

from services.policy.lora import LoraConfig, adapter_bytes, apply_lora
from services.policy.model import load_policy
from services.telemetry.run_log import read_metrics
from services.transport.bundle import Transport
from services.transport.redis_server import EmbeddedRedis
from services.weightsync.files import read_version

LORA = {"rank": 4, "alpha": 16.0}  # every attention and MLP projection


def _merged(base_dir: Path, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base model with the adapter ``tensors`` (PEFT's saved names) merged into it."""
    base, _ = load_policy(base_dir)
    wrapped = apply_lora(base.float(), LoraConfig(**LORA))
    result = peft.set_peft_model_state_dict(wrapped, tensors)
    assert not [k for k in result.unexpected_keys if "lora_" in k], result
    return wrapped.merge_and_unload().eval()


@pytest.mark.timeout(1800)
def test_d3s_run_on_vllm_with_lora_syncs_adapters_and_samples_each_version(
    llama_dir,  # noqa: F811
    task_dir,  # noqa: F811
    tmp_path,
):
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        run_dir = tmp_path / "run"
        data = _config(llama_dir, task_dir, run_dir, server.url)
        data["name"] = "vllm-lora-e2e"
        data["learner"]["lora"] = LORA
        # The tiny head is near uniform: the adapter must move far for versions to differ visibly.
        data["learner"]["lr"] = 5e-2
        data["rollout"]["inflight_updates"] = True
        summary, cfg = run_d3s(tmp_path, task_dir, data)
        client = redis.Redis.from_url(server.url)
        books = audit(client, cfg)
        loaded = books["loaded"]["rollout-0"]
        digests = Transport.open(client, cfg.service.namespace).state.engine_digests("rollout-0")
        actor = summary["result"]["components"]["rollout-0"]
    finally:
        server.stop()

    catchup = run_dir.parent / "catchup"
    adapters = {v: read_version(catchup, v)[0] for v in range(STEPS + 1)}
    _check_adapter_bytes(llama_dir, run_dir, adapters)
    _check_audit(actor["lora_audit"], loaded)
    # Versions arrived while rounds ran (in flight) and those rounds kept their adapter.
    assert actor["inflight_loads"] >= 1
    _check_samples(llama_dir, actor["lora_audit"], adapters)
    assert set(digests) == set(loaded) and len(loaded) >= 2
    assert _reference_digests(llama_dir, adapters, loaded) == {v: digests[v] for v in loaded}


def _check_adapter_bytes(model_dir: Path, run_dir: Path, adapters: dict) -> None:
    base, _ = load_policy(model_dir)
    full = sum(p.numel() * 4 for p in {id(p): p for p in base.parameters()}.values())
    size = adapter_bytes(apply_lora(base, LoraConfig(**LORA)), torch.float32)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "weight_sync_bytes" in r]
    assert len(rows) >= STEPS
    for r in rows:
        assert 0 < r["weight_sync_bytes"] <= 2 * size, (r["weight_sync_bytes"], size)
    for v, tensors in adapters.items():
        assert all(".lora_A." in n or ".lora_B." in n for n in tensors), v
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == size
    print(f"\nadapter {size} B per sync; the full model is {full} B ({size / full:.3f}x)")


def _check_audit(events: list[dict], loaded: list[int]) -> None:
    from services.rollout.vllm_lora import audit_errors

    assert not audit_errors(events)
    added = {e["adapter_id"]: e["version"] for e in events if e["event"] == "add"}
    removed = [e["adapter_id"] for e in events if e["event"] == "remove"]
    assert sorted(added.values()) == sorted(loaded)  # one id per version loaded
    newest = max(added)
    assert sorted(removed) == sorted(set(added) - {newest})  # every id but the newest went
    rounds = [e for e in events if e["event"] == "round"]
    assert rounds and all(e["adapter_id"] in added for e in rounds)
    assert all(added[e["adapter_id"]] == e["version"] for e in rounds)
    print(f"\n{len(added)} adapter ids, {len(removed)} removed, {len(rounds)} rounds under them")


def _check_samples(model_dir: Path, events: list[dict], adapters: dict) -> None:
    """The first response under each version has that version's merged log-probs, and no
    other version's (the versions differ enough to tell)."""
    samples = [e["sample"] for e in events if e["event"] == "round" and e["sample"]]
    assert len({s["version"] for s in samples}) >= 2
    merged = {v: _merged(model_dir, adapters[v]) for v in {s["version"] for s in samples}}
    told_apart = False
    for s in samples:
        assert len(s["tokens"]) <= MAX_NEW_TOKENS
        got = torch.tensor(s["logps"])
        ref = hf_logp(merged[s["version"]], s["prompt"], s["tokens"])
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
        for v, other in merged.items():
            if v != s["version"]:
                told_apart |= bool(
                    (hf_logp(other, s["prompt"], s["tokens"]) - got).abs().max() > 1e-3
                )
    assert told_apart


def _reference_digests(model_dir: Path, adapters: dict, versions: list[int]) -> dict[int, str]:
    """sha256 of each version's adapter in a fresh LoRA vLLM engine that loaded it from the
    catch-up file through the bytes path."""
    from services.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(
        model_dir,
        load_policy(model_dir)[1],
        max_new_tokens=MAX_NEW_TOKENS,
        dtype="float32",
        enforce_eager=True,
        max_model_len=160,
        lora=LoraConfig(**LORA),
    )
    try:
        out = {}
        for v in versions:
            engine.load_state_dict(adapters[v], version=v)
            out[v] = engine.weights_digest()
        return out
    finally:
        engine.shutdown()

"""Lock-step ``d3s train`` with ``rollout.engine: vllm`` and ``learner.lora``: the in-process
vLLM engine takes each step's adapter as a new adapter id (the base never reloaded), and the run
ends with the trained adapter in ``final_policy``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_train_vllm import _config

from services.policy.lora import base_path
from services.run.config import parse_config
from services.run.trainer import SyncTrainer
from services.weightsync.checksum import state_checksum

STEPS = 2


@pytest.mark.timeout(1800)
def test_d3s_train_on_vllm_with_lora_trains_and_saves_the_adapter(tmp_path: Path, monkeypatch):
    from services.rollout import vllm_engine

    engines = []
    init = vllm_engine.VLLMRolloutEngine.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(vllm_engine.VLLMRolloutEngine, "__init__", keep)
    sys.path.insert(0, str(tmp_path))
    data = _config(tmp_path, steps=STEPS)
    data["learner"]["lora"] = {"rank": 4, "alpha": 8.0}
    data["learner"]["lr"] = 5e-2
    # A small KV cache: the run's memory check then passes on a box others share.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    data["rollout"]["vllm"]["cpu_kv_cache_gib"] = 0.25
    SyncTrainer(parse_config(data)).run()

    (engine,) = engines
    events = engine.report()["lora_audit"]
    added = [(e["version"], e["adapter_id"]) for e in events if e["event"] == "add"]
    assert [v for v, _ in added] == list(range(STEPS + 1))  # every version an adapter of its own
    rounds = [e for e in events if e["event"] == "round"]
    assert [e["version"] for e in rounds[:STEPS]] == list(range(STEPS))  # lock-step
    final = tmp_path / "run" / "final_policy"
    assert (final / "adapter_config.json").is_file()
    from services.policy.model import load_policy

    trained, _ = load_policy(final)  # base plus the trained adapter
    start, _ = load_policy(base_path(final))
    merged = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
    assert state_checksum(merged.state_dict()) != state_checksum(start.state_dict())

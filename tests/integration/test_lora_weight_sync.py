"""The files transport with a real LoRA learner (DeepSpeed, CPU, tiny Llama): each version is
the adapter alone (PEFT's saved names, at most 2x the adapter's bytes on disk) and also a PEFT
adapter directory that loads with ``peft`` and scores as the learner does; an HF engine fills its
adapter from it with the base untouched; the version, checksum, late-joiner and rewind rules
hold as for full weights. The collective transport's LoRA case is parametrised in
test_weight_sync.py (broadcast, catch-up, restart, corruption; ZeRO-3 gathered buckets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from learner.export_lora import adapter_config
from selector.presets import get_preset
from services.policy.lora import LoraConfig, adapter_bytes, apply_lora, load_adapter_dir
from services.policy.model import save_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.actor import EngineLoader
from services.rollout.hf_engine import HFRolloutEngine
from services.weightsync.checksum import WeightSyncError, state_checksum
from services.weightsync.files import (
    FilesPublisher,
    FilesReceiver,
    adapter_dir,
    read_version,
    version_file,
)
from tests.integration.test_learner_packing import MODELS, make_batch

pytestmark = pytest.mark.integration

LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return save_policy(MODELS["llama"](), CharTokenizer(), tmp_path / "base")


def _base(base_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        base_dir, local_files_only=True, dtype=torch.float32
    )


def _engine(base_dir: Path, adapter_seed: int) -> HFRolloutEngine:
    """An HF engine as the rollout actor builds it: the base plus a fresh adapter (lora_A drawn
    from ``adapter_seed``, so it differs from the learner's until a version arrives)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapter_seed)
        return HFRolloutEngine(apply_lora(_base(base_dir), LORA), CharTokenizer())


def _adapter(engine: HFRolloutEngine) -> dict[str, torch.Tensor]:
    from services.policy.lora import synced_state

    return synced_state(engine.model)


def _base_sum(model: torch.nn.Module) -> str:
    return state_checksum({n: p for n, p in model.named_parameters() if not p.requires_grad})


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_files_versions_of_a_lora_learner_are_the_adapter_and_peft_directories(
    tmp_path: Path, base_dir: Path
) -> None:
    torch.manual_seed(0)
    learner = LearnerEngine(_base(base_dir), LearnerConfig(zero_stage=0, lr=1e-2, lora=LORA), 10)
    config = adapter_config(learner.module)
    assert config is not None and config["base_model_name_or_path"] == str(base_dir)
    size = adapter_bytes(learner.module, torch.float32)
    full = sum(p.numel() * 4 for p in _base(base_dir).parameters())
    assert size < full / 4  # 16,384 B against 78,208 B on this tiny model
    w = tmp_path / "weights"
    pub = FilesPublisher(w, keep_last=2, adapter_config=config)
    early, early_engine = FilesReceiver(w, timeout_s=5), _engine(base_dir, adapter_seed=1)
    base = _base_sum(early_engine.model)
    assert early.receive(EngineLoader(early_engine)) is None  # nothing published yet
    published = {}
    for version in (1, 2, 3):
        learner.train_step(make_batch(version), get_preset("d3s"), 0.5)
        published[version] = learner.state_dict_cpu()  # what the learner hands the files
        pub.publish(version, published[version])
        assert early.receive(EngineLoader(early_engine)) == version == early_engine.version
        assert _same(_adapter(early_engine), published[version])
        assert _base_sum(early_engine.model) == base  # the base is never written
        tensors, _, aliases = read_version(w, version)
        assert _same(tensors, published[version]) and aliases == {}  # the adapter alone
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == size
        assert version_file(w, version).stat().st_size <= 2 * size  # the header included
    assert early.receive(EngineLoader(early_engine)) is None  # nothing new
    names = [adapter_dir(w, v).name for v in (2, 3)] + [version_file(w, v).name for v in (2, 3)]
    assert sorted(p.name for p in w.iterdir()) == sorted(names)  # pruned together
    print(f"\nfiles: {size} adapter bytes per version vs {full} for the model")

    # a version's directory is a PEFT adapter: it loads and scores as the learner does
    d = adapter_dir(w, 3)
    assert json.loads((d / "adapter_config.json").read_text()) == config
    assert (d / "adapter_model.safetensors").stat().st_ino == version_file(w, 3).stat().st_ino
    ids = make_batch(9).input_ids[:2]
    with torch.no_grad():
        want = learner.module.eval()(input_ids=ids).logits
        torch.testing.assert_close(load_adapter_dir(d)(input_ids=ids).logits, want)

    # a late joiner loads the newest version whole
    late, late_engine = FilesReceiver(w, timeout_s=5), _engine(base_dir, adapter_seed=2)
    assert not _same(_adapter(late_engine), published[3])
    assert late.receive(EngineLoader(late_engine)) == 3
    assert _same(_adapter(late_engine), published[3])

    # a resumed learner republishes an older version: receivers follow it back, and the
    # newer version's file and directory go
    pub.publish(2, published[2], rewind=True)
    assert late.receive(EngineLoader(late_engine)) == 2
    assert _same(_adapter(late_engine), published[2])
    assert not adapter_dir(w, 3).exists() and not version_file(w, 3).exists()
    assert _same(load_file(adapter_dir(w, 2) / "adapter_model.safetensors"), published[2])

    # a corrupted adapter tensor under intact metadata: the sampled checksum catches it
    path = version_file(w, 2)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    b = next(n for n in tensors if n.endswith("lora_B.weight"))
    tensors[b] = tensors[b] * 0.5
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(WeightSyncError, match="version 2 arrived corrupted"):
        FilesReceiver(w, timeout_s=5).receive(EngineLoader(_engine(base_dir, adapter_seed=3)))


def test_an_engine_without_the_adapter_is_refused_by_name(tmp_path: Path, base_dir: Path) -> None:
    """A LoRA version into an engine built without ``learner.lora`` (a full model) fails
    naming the adapter tensors, instead of loading nothing."""
    torch.manual_seed(0)
    learner = LearnerEngine(_base(base_dir), LearnerConfig(zero_stage=0, lora=LORA), 10)
    FilesPublisher(tmp_path, adapter_config=adapter_config(learner.module)).publish(
        1, learner.state_dict_cpu()
    )
    engine = HFRolloutEngine(_base(base_dir), CharTokenizer())
    with pytest.raises((WeightSyncError, KeyError), match="lora_A"):
        FilesReceiver(tmp_path, timeout_s=5).receive(EngineLoader(engine))

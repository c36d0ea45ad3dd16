"""Warm starts shipped with the package: found by cache key, used only when every checksum
matches, and the quickstart's start gives the accuracy its metadata records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import zerovar_data
from services.policy import shipped
from services.policy.config import PolicySpec, WarmstartConfig
from services.policy.evaluate import evaluate_greedy
from services.policy.model import load_policy
from services.policy.warmstart import METADATA_FILE, task_identity, warmstart
from services.run.config import load_config
from services.tasks.config import MixedTaskConfig, SyntheticTaskConfig
from services.tasks.source import synthetic_task

TINY = PolicySpec(n_layer=1, n_embd=16, n_head=2, n_positions=16)
REPO = Path(__file__).resolve().parents[2]


def _spec(cache_dir: Path, **kw) -> WarmstartConfig:
    base = dict(
        steps=4, band=None, batch_size=8, lr=1e-3, eval_prompts=16, dev_prompts=16, warmup_steps=2
    )
    return WarmstartConfig(cache_dir=cache_dir, **{**base, **kw})


@pytest.fixture
def starts_dir(tmp_path, monkeypatch) -> Path:
    """An empty shipped-starts directory in place of the package's."""
    directory = tmp_path / "starts"
    monkeypatch.setattr(shipped, "STARTS_DIR", directory)
    return directory


def _trained(tmp_path: Path) -> tuple[WarmstartConfig, Path]:
    spec = _spec(tmp_path / "built")
    return spec, warmstart(spec, TINY, 2)


def test_shipped_start_is_used_before_training_and_the_cache(tmp_path, starts_dir):
    spec, built = _trained(tmp_path)
    key = spec.cache_key(TINY, 2)
    shipped.ship(built, key)
    sums = shipped.read_checksums(starts_dir / key)
    assert {"model.safetensors", "config.json", METADATA_FILE} <= set(sums)

    calls: list[int] = []
    elsewhere = _spec(tmp_path / "empty-cache")  # same spec, nothing cached there
    path = warmstart(elsewhere, TINY, 2, progress=lambda s, t, loss: calls.append(s))
    assert path == starts_dir / key and calls == []
    assert not (tmp_path / "empty-cache").exists()

    # use_shipped: false trains here (into the cache), as does rebuild.
    own = _spec(tmp_path / "own", use_shipped=False)
    assert own.cache_key(TINY, 2) == key  # the switch is not part of what is trained
    path = warmstart(own, TINY, 2, progress=lambda s, t, loss: calls.append(s))
    assert path == tmp_path / "own" / key and calls == [1, 2, 3, 4]


def test_a_shipped_start_whose_bytes_changed_is_refused(tmp_path, starts_dir):
    spec, built = _trained(tmp_path)
    key = spec.cache_key(TINY, 2)
    directory = shipped.ship(built, key)
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one float
    weights.write_bytes(bytes(data))
    with pytest.raises(shipped.ShippedStartError, match=r"model\.safetensors has sha256"):
        warmstart(_spec(tmp_path / "other"), TINY, 2)
    # No silent retrain in the cache either.
    assert not (tmp_path / "other").exists()


def test_checksum_file_must_list_the_weights_and_be_well_formed(tmp_path, starts_dir):
    spec, built = _trained(tmp_path)
    directory = shipped.ship(built, spec.cache_key(TINY, 2))
    sums = directory / shipped.CHECKSUMS_FILE
    lines = sums.read_text().splitlines()
    sums.write_text("\n".join(x for x in lines if not x.endswith("model.safetensors")) + "\n")
    with pytest.raises(shipped.ShippedStartError, match=r"does not list model\.safetensors"):
        shipped.verify(directory)
    sums.write_text("not a checksum line\n")
    with pytest.raises(shipped.ShippedStartError, match=r"SHA256SUMS:1"):
        shipped.verify(directory)
    sums.unlink()
    with pytest.raises(shipped.ShippedStartError, match="has no SHA256SUMS"):
        shipped.verify(directory)


def _shipped_spec(config: str) -> tuple[WarmstartConfig, PolicySpec, SyntheticTaskConfig]:
    """What a config's warm start trains, as the run (or, for the zero-variance benchmark's
    JSONL config, ``bench/pipeline.py``) reads it."""
    if config == "configs/bench_zerovar.yaml":
        data = yaml.safe_load((REPO / config).read_text())
        return (
            WarmstartConfig(**data["warmstart"]),
            PolicySpec(**data.get("policy", {})),
            MixedTaskConfig(levels=list(zerovar_data.LEVELS)),
        )
    cfg = load_config(REPO / config)
    return cfg.warmstart, cfg.policy.spec(), cfg.task


@pytest.mark.parametrize(
    "config",
    [
        "configs/quickstart.yaml",
        "configs/bench.yaml",
        "configs/bench_mixed.yaml",
        "configs/bench_zerovar.yaml",
    ],
)
def test_the_configs_starts_ship_and_score_what_their_metadata_records(config):
    """The shipped start of each CPU config (the learning benchmark shares the quickstart's) is
    found for the config as written, passes its checksums, and its held-out greedy accuracy on
    this machine is the one recorded when it was built, within 0.01."""
    spec, policy, task_config = _shipped_spec(config)
    key = spec.cache_key(policy, task_identity(task_config))
    directory = shipped.find(key)
    assert directory is not None, f"no start ships for {config} (key {key})"
    meta = json.loads((directory / METADATA_FILE).read_text())
    model, tokenizer = load_policy(directory)
    task, _ = synthetic_task(task_config, seed=spec.seed)
    accuracy = evaluate_greedy(
        model, tokenizer, task.heldout(spec.eval_prompts), task.max_answer_len + 1
    )
    assert accuracy == pytest.approx(meta["heldout_accuracy"], abs=0.01)


def test_every_start_seed_of_the_robustness_benchmark_ships():
    """bench/start_seeds.py trains from warm-start seeds 0-4: each must ship, so the benchmark
    starts from the same weights on every machine; a start that landed in the band records it."""
    for seed in range(5):
        cfg = load_config(REPO / "configs/quickstart.yaml", [f"warmstart.seed={seed}"])
        directory = shipped.find(
            cfg.warmstart.cache_key(cfg.policy.spec(), task_identity(cfg.task))
        )
        assert directory is not None, f"no start ships for warmstart.seed={seed}"
        meta = json.loads((directory / METADATA_FILE).read_text())
        assert meta["in_band"] and meta["spec"]["seed"] == seed
        assert meta["probe"]["sample_accuracy"] >= cfg.warmstart.band.min_sample_accuracy

"""The learner service against a real Redis and DeepSpeed: a crash between checkpoints loses no
step (the replay stream), duplicates are acknowledged without training, versions are published
in order."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from learner.engine import LearnerEngine
from learner.service import LearnerService
from selector.curate import curate
from selector.service import batch_record
from services.policy.limits import ModelLimits
from services.run.config import RunConfig, parse_config
from services.transport.bundle import Transport
from services.transport.records import CuratedBatch, ScoredGroup
from services.weightsync.base import WeightPublisher
from services.weightsync.checksum import sample_checksum

pytestmark = pytest.mark.integration

STEPS = 5


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=15,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(cfg)


def make_cfg(run_dir: Path) -> RunConfig:
    return parse_config(
        {
            "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4},
            "algorithm": {"preset": "d3s"},
            "learner": {"lr": 1e-3},
            "train": {
                "total_steps": STEPS,
                "checkpoint_every": 2,
                "eval_every": 100,
                "run_dir": str(run_dir),
            },
            "service": {"wait_timeout_s": 5},
        }
    )


def make_batch(step: int, cfg: RunConfig) -> CuratedBatch:
    rng = np.random.default_rng(step)
    groups = []
    for i in range(4):
        lengths = rng.integers(1, 6, size=4)
        logp = -rng.random((4, 5)).astype(np.float32)
        logp[np.arange(5)[None, :] >= lengths[:, None]] = 0.0
        groups.append(
            ScoredGroup(
                group_id=f"s{step}-g{i}",
                prompt_id=f"p{i}",
                policy_version=step,
                prompt=rng.integers(2, 15, size=6),
                responses=rng.integers(2, 15, size=(4, 5)),
                response_lengths=lengths,
                behav_logp=logp,
                rewards=np.array([1.0, 0.0, 1.0, float(i % 2)], dtype=np.float32),
                created_at=time.time(),
                actor="test",
                task="arithmetic",
            )
        )
    preset = cfg.algorithm.build_preset()
    return batch_record(step, STEPS, preset.name, groups, curate(groups, preset, step, STEPS))


class Published(WeightPublisher):
    """Records what the learner publishes: (version, sampled checksum, rewind)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, bool]] = []

    def publish(self, version: int, named_tensors, *, rewind: bool = False) -> float:
        self.calls.append((version, sample_checksum(dict(named_tensors)), rewind))
        return 0.0


def service(t: Transport, cfg: RunConfig, run_dir: Path, pub: Published) -> LearnerService:
    engine = LearnerEngine(tiny_model(), cfg.learner, STEPS)
    return LearnerService(t, engine, cfg.learner_settings(run_dir), publisher=pub, block_ms=100)


def feed(t: Transport, cfg: RunConfig, steps: range) -> None:
    for s in steps:
        b = make_batch(s, cfg)
        t.queue.commit(t.keys.batches, "", [], outputs=[(t.keys.batches, b.batch_id, b)])


def test_a_crash_between_checkpoints_loses_no_step(
    tmp_path: Path, transport: Transport, redis_client
) -> None:
    # Reference: the five steps straight through, in a namespace of its own.
    ref_t = Transport.open(redis_client, transport.namespace + "ref")
    ref_cfg = make_cfg(tmp_path / "ref")
    feed(ref_t, ref_cfg, range(STEPS))
    ref = service(ref_t, ref_cfg, tmp_path / "ref", Published())
    assert ref.run()["steps"] == STEPS
    reference = ref.engine.state_dict_cpu()

    cfg = make_cfg(tmp_path / "run")
    feed(transport, cfg, range(3))
    # A redelivered copy of an old batch sits in the queue too (the idempotency key is per
    # publish; a copy under another key is possible): acknowledged, never trained twice.
    transport.client.xadd(transport.keys.batches, make_batch(1, cfg).to_fields())
    feed(transport, cfg, range(3, STEPS))
    pub1 = Published()
    first = service(transport, cfg, tmp_path / "run", pub1)
    # "Crash" after step 3: checkpoint at 2, batch 2 already acknowledged (only in the replay).
    out = first.run(should_stop=lambda: first.step >= 3)
    assert out["steps"] == 3
    assert [v for v, _, _ in pub1.calls] == [0, 1, 2, 3]
    assert transport.client.xlen(transport.keys.replay) == 1  # batch 2; 0 and 1 are checkpointed

    transport.control.clear_run_flags()
    pub2 = Published()
    second = service(transport, cfg, tmp_path / "run", pub2)
    out = second.run()

    assert out["steps"] == STEPS
    assert out["batches_replayed"] == 1 and out["batches_duplicate"] == 1
    # The resumed learner republished the checkpoint's version (a rewind), then 3, 4, 5.
    assert [(v, r) for v, _, r in pub2.calls] == [(2, True), (3, False), (4, False), (5, False)]
    # Same weights as the run that never crashed.
    state = second.engine.state_dict_cpu()
    for name, value in reference.items():
        assert torch.allclose(state[name], value, atol=1e-6), name
    assert pub2.calls[1][1] == pub1.calls[3][1]  # version 3 retrained to the same checksum
    stats = transport.state.stats()
    assert stats["batches_consumed"] == STEPS and stats["batches_duplicate"] == 1
    assert transport.state.trained() == {f"step-{s:07d}": s for s in range(STEPS)}
    versions = transport.state.published_versions()
    assert versions == [0, 1, 2, 3, 2, 3, 4, 5]
    assert transport.client.xlen(transport.keys.batches) == 0
    assert transport.client.xlen(transport.keys.replay) == 0  # trimmed at the last checkpoint
    assert transport.control.is_done()
    assert (tmp_path / "run" / "learning_curve.png").is_file()
    # Every step has exactly one metric row, although step 3 was trained (and logged) twice.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(STEPS + 1))
    assert [r["step"] for r in transport.state.history()] == list(range(STEPS + 1))


def test_a_batch_the_model_cannot_take_is_dead_lettered(
    tmp_path: Path, transport: Transport
) -> None:
    cfg = make_cfg(tmp_path / "run")
    bad = make_batch(0, cfg)
    ids = bad.input_ids.copy()
    ids[0, 0] = 99  # the tiny model has 15 tokens
    forged = replace(bad, input_ids=ids)
    transport.client.xadd(transport.keys.batches, forged.to_fields())
    feed(transport, cfg, range(STEPS))
    engine = LearnerEngine(tiny_model(), cfg.learner, STEPS)
    learner = LearnerService(
        transport,
        engine,
        cfg.learner_settings(tmp_path / "run"),
        limits=ModelLimits(vocab_size=15, max_positions=32),
        block_ms=100,
    )
    out = learner.run()
    assert out["steps"] == STEPS and out["batches_rejected"] == 1
    (dead,) = transport.state.dead_letters()
    assert "token id 99 is outside the model's vocabulary of 15" in dead["reason"]
    assert transport.state.trained() == {f"step-{s:07d}": s for s in range(STEPS)}

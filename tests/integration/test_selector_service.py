"""The selector service against a real Redis: dead letters, restart, reclaim, staleness, skips."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from selector.curate import curate
from selector.service import GROUP, SelectorService, SelectorStalled
from services.common.seeding import step_seed
from services.run.config import RunConfig, parse_config
from services.transport.bundle import Transport
from services.transport.records import CuratedBatch, ScoredGroup, decode

pytestmark = pytest.mark.integration

G = 4
PROMPTS = 4


def make_cfg(**service) -> RunConfig:
    return parse_config(
        {
            "rollout": {"prompts_per_step": PROMPTS, "samples_per_prompt": G},
            "train": {"total_steps": 5, "seed": 3},
            "algorithm": {"preset": "d3s"},
            "service": {
                "max_staleness": 1,
                "wait_timeout_s": 5,
                "max_batch_backlog": 10,
                **service,
            },
        }
    )


def make_group(i: int, version: int = 0, rewards: list[float] | None = None) -> ScoredGroup:
    rng = np.random.default_rng(i)
    t = 5
    lengths = rng.integers(1, t + 1, size=G)
    logp = -rng.random((G, t)).astype(np.float32)
    logp[np.arange(t)[None, :] >= lengths[:, None]] = 0.0
    if rewards is None:  # distinct rewards: every group carries signal
        rewards = [1.0, 0.0, float(i % 2), 0.5]
    return ScoredGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        policy_version=version,
        prompt=rng.integers(2, 15, size=6),
        responses=rng.integers(2, 15, size=(G, t)),
        response_lengths=lengths,
        behav_logp=logp,
        rewards=np.array(rewards, dtype=np.float32),
        created_at=time.time(),
        actor="test",
        task="arithmetic",
    )


def publish(t: Transport, group: ScoredGroup) -> str:
    return t.queue.publish(t.keys.groups, group, incr={"groups_written": 1}, key=group.group_id)


def batches(t: Transport) -> list[CuratedBatch]:
    out = []
    for _, fields in t.client.xrange(t.keys.batches, "-", "+"):
        rec = decode(fields)
        assert isinstance(rec, CuratedBatch)
        out.append(rec)
    return out


def selector(t: Transport, cfg: RunConfig, consumer: str = "selector-0", **kw) -> SelectorService:
    kw.setdefault("block_ms", 100)
    return SelectorService(t, cfg.selector_settings(), consumer=consumer, **kw)


# ---- malformed records ---------------------------------------------------------------------------


def _malformed(good: ScoredGroup) -> dict[str, dict[bytes, bytes]]:
    """Broken variants of a valid group's stream entry, by what is wrong with them."""
    fields = good.to_fields()
    meta = json.loads(fields[b"meta"])

    def with_meta(change: dict, **raw: bytes) -> dict[bytes, bytes]:
        m = json.loads(json.dumps(meta))
        for k, v in change.items():
            m[k] = v
        out = dict(fields)
        out[b"meta"] = json.dumps(m).encode()
        out.update({k.encode(): v for k, v in raw.items()})
        return out

    nan_rewards = np.array([1.0, float("nan"), 0.0, 1.0], dtype="<f4").tobytes()
    short_lengths_meta = json.loads(json.dumps(meta["arrays"]))
    short_lengths_meta["response_lengths"]["shape"] = [G - 1]
    return {
        "schema version": with_meta({"schema": 99}),
        "truncated": with_meta({}, responses=fields[b"responses"][:-3]),
        "nan": with_meta({}, rewards=nan_rewards),
        "mismatched": with_meta(
            {"arrays": short_lengths_meta},
            response_lengths=fields[b"response_lengths"][: 4 * (G - 1)],
        ),
        "garbage": {b"meta": b"\xff\xfe\x00not json", b"responses": b"\x01\x02\x03"},
    }


def test_malformed_records_are_dead_lettered_and_a_correct_batch_follows(
    transport: Transport,
) -> None:
    cfg = make_cfg()
    good = [make_group(i) for i in range(PROMPTS)]
    bad = _malformed(make_group(99))
    # Interleaved: the bad ones arrive between the good ones, and one decodes but has G = 3.
    publish(transport, good[0])
    for fields in list(bad.values())[:3]:
        transport.client.xadd(transport.keys.groups, fields)
    publish(transport, good[1])
    for fields in list(bad.values())[3:]:
        transport.client.xadd(transport.keys.groups, fields)
    wrong_g = ScoredGroup(
        **{
            **make_group(50).__dict__,
            "responses": make_group(50).responses[:3],
            "response_lengths": make_group(50).response_lengths[:3],
            "behav_logp": make_group(50).behav_logp[:3],
            "rewards": make_group(50).rewards[:3],
            "group_id": "g-three",
        }
    )
    publish(transport, wrong_g)
    publish(transport, good[2])
    publish(transport, good[3])

    summary = selector(transport, cfg).run(max_batches=1)

    assert summary["batches_written"] == 1
    dead = transport.client.xrange(transport.keys.dead, "-", "+")
    reasons = [f[b"reason"].decode() for _, f in dead]
    assert transport.state.stats()["dead"] == len(bad) + 1
    expected_reasons = [
        "unsupported schema version 99",
        "array 'responses' has 77 bytes, but shape [4, 5] of int32 needs 80",  # truncated
        "array 'rewards' has a non-finite value",  # NaN reward
        "inconsistent shapes: 'response_lengths' is (3,), 'responses' is (4, 5)",
        "meta is not valid UTF-8",  # garbage bytes
        "group has 3 samples; this run uses samples_per_prompt=4",  # decodes, wrong G
    ]
    assert len(reasons) == len(expected_reasons)
    for reason, expected_reason in zip(reasons, expected_reasons, strict=True):
        assert expected_reason in reason
    # The batch holds exactly the four good groups and equals what curate() makes of them.
    (batch,) = batches(transport)
    assert batch.group_ids == [g.group_id for g in good]
    expected = curate(
        good,
        cfg.algorithm.build_preset(),
        0,
        cfg.train.total_steps,
        cfg.algorithm.adv_eps,
        torch.Generator().manual_seed(step_seed(3, 0)),
    ).rows
    assert expected is not None
    np.testing.assert_array_equal(batch.input_ids, expected.input_ids)
    np.testing.assert_array_equal(batch.advantages, expected.advantages)
    # Nothing is left pending or queued in the groups stream: all good ones used, bad ones dead.
    assert transport.queue.backlog(transport.keys.groups) == 0
    ledger = transport.state.ledger()
    assert ledger == {g.group_id: "used:step-0000000" for g in good}


# ---- restart -------------------------------------------------------------------------------------


def test_schedule_state_survives_a_selector_restart(transport: Transport) -> None:
    cfg = make_cfg()
    preset = cfg.algorithm.build_preset()
    for i in range(PROMPTS + 2):
        publish(transport, make_group(i))
    first = selector(transport, cfg)
    assert first.run(max_batches=1)["batches_written"] == 1
    # It reads the next two groups and dies before committing them.
    first.inbox.read(2)
    assert len(first.inbox) == 2
    del first

    sched = transport.state.schedule()
    assert int(sched["step"]) == 1
    for i in range(PROMPTS + 2, PROMPTS + 4):
        publish(transport, make_group(i))
    second = selector(transport, cfg)  # same consumer name: takes back its own pending groups
    second.start()
    assert second.step == 1
    assert len(second.inbox) == 2
    assert second.run(max_batches=1)["batches_written"] == 1

    b0, b1 = batches(transport)
    assert (b0.step, b1.step) == (0, 1)
    assert b1.group_ids == [f"g{i}" for i in range(PROMPTS, PROMPTS + 4)]
    sched = transport.state.schedule()
    sample_ratio, token_ratio = preset.ratios(2, cfg.train.total_steps)
    assert int(sched["step"]) == 2
    assert float(sched["sample_ratio"]) == pytest.approx(sample_ratio)
    assert float(sched["token_ratio"]) == pytest.approx(token_ratio)
    assert float(sched["progress"]) == pytest.approx(2 / cfg.train.total_steps)
    assert transport.state.stats()["batches_written"] == 2
    assert set(transport.state.batch_groups()["step-0000001"]) == set(b1.group_ids)


# ---- reclaim -------------------------------------------------------------------------------------


def test_pending_groups_of_a_killed_consumer_are_reclaimed(transport: Transport) -> None:
    cfg = make_cfg()
    for i in range(PROMPTS):
        publish(transport, make_group(i))
    dead = selector(transport, cfg, consumer="selector-a")
    dead.start()
    dead.inbox.read(PROMPTS)  # read, never acknowledged: then the process "dies"
    assert len(dead.inbox) == PROMPTS
    pending = transport.client.xpending(transport.keys.groups, GROUP)
    assert pending["pending"] == PROMPTS

    time.sleep(0.3)
    standby = selector(transport, cfg, consumer="selector-b", reclaim_idle_ms=200)
    assert standby.run(max_batches=1)["batches_written"] == 1

    (batch,) = batches(transport)
    assert batch.group_ids == [f"g{i}" for i in range(PROMPTS)]
    assert transport.client.xpending(transport.keys.groups, GROUP)["pending"] == 0
    # The dead consumer coming back finds them accounted for, and cannot acknowledge or use
    # them again: every commit on entries it no longer holds is fenced.
    held = dead.inbox.sort(dead.step)
    assert (len(held.usable), len(held.duplicate)) == (0, PROMPTS)
    dup = held.duplicate
    dead._commit(held.stale, dup, [], None)
    assert dead.summary["commits_refused"] == 1
    refused = transport.queue.commit(
        transport.keys.groups,
        GROUP,
        [d.entry_id for d in dup],
        outputs=[(transport.keys.batches, "step-0000000-again", batch)],
        consumer="selector-a",
    )
    assert not refused.committed
    assert len(batches(transport)) == 1
    stats = transport.state.stats()
    assert stats["groups_used"] == PROMPTS and stats.get("groups_duplicate", 0) == 0


# ---- staleness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_staleness_is_measured_against_the_step_being_built(
    transport: Transport, max_staleness: int
) -> None:
    cfg = make_cfg(max_staleness=max_staleness)
    # The learner has trained step 0; the selector builds step 1, with weights version 1 out.
    transport.client.hset(transport.keys.schedule, mapping={"step": 1})
    versions = [0, 1, 0, 1, 0, 1, 1]
    for i, v in enumerate(versions):
        publish(transport, make_group(i, version=v))

    summary = selector(transport, cfg).run(max_batches=1)

    (batch,) = batches(transport)
    assert batch.step == 1
    stats = transport.state.stats()
    if max_staleness == 0:
        # Strictly on-policy: only version-1 groups; every version-0 group dropped and counted.
        assert set(batch.policy_versions.tolist()) == {1}
        assert batch.group_ids == ["g1", "g3", "g5", "g6"]
        assert summary["groups_stale"] == stats["groups_stale"] == 3
        ledger = transport.state.ledger()
        assert {g for g, v in ledger.items() if v == "stale"} == {"g0", "g2", "g4"}
        assert transport.queue.backlog(transport.keys.groups) == 0
    else:
        # One step behind is allowed: the first four in arrival order, none dropped.
        assert batch.group_ids == ["g0", "g1", "g2", "g3"]
        assert stats.get("groups_stale", 0) == 0
        assert transport.queue.backlog(transport.keys.groups) == 3  # held for the next step


# ---- zero-signal batches -------------------------------------------------------------------------


def test_a_batch_without_signal_is_skipped_and_counted_never_a_crash(transport: Transport) -> None:
    cfg = make_cfg()
    for i in range(PROMPTS):  # every group's rewards equal: all advantages zero
        publish(transport, make_group(i, rewards=[1.0] * G if i % 2 else [0.0] * G))
    for i in range(PROMPTS, 2 * PROMPTS):
        publish(transport, make_group(i))

    summary = selector(transport, cfg).run(max_batches=1)

    assert summary["batches_skipped"] == 1 and summary["batches_written"] == 1
    (batch,) = batches(transport)
    assert batch.step == 0  # the skip did not use up a learner step
    assert batch.group_ids == [f"g{i}" for i in range(PROMPTS, 2 * PROMPTS)]
    ledger = transport.state.ledger()
    assert all(ledger[f"g{i}"] == "skipped:step-0000000" for i in range(PROMPTS))
    stats = transport.state.stats()
    assert stats["batches_skipped"] == 1 and stats["groups_skipped"] == PROMPTS


def test_no_groups_fails_with_a_clear_message(transport: Transport) -> None:
    cfg = make_cfg(wait_timeout_s=0.5)
    with pytest.raises(SelectorStalled, match="are the rollout actors running"):
        selector(transport, cfg).run(max_batches=1)


# ---- records that are well-formed but wrong in meaning -------------------------------------------


def test_groups_wrong_in_meaning_are_dead_lettered_and_the_run_goes_on(
    transport: Transport,
) -> None:
    cfg = make_cfg()
    settings = replace(cfg.selector_settings(), vocab_size=15, max_positions=11)
    good = [make_group(i) for i in range(PROMPTS)]

    def variant(i: int, **changes) -> ScoredGroup:
        base = make_group(100 + i)
        fields = {
            f: getattr(base, f)
            for f in (
                "group_id",
                "prompt_id",
                "policy_version",
                "prompt",
                "responses",
                "response_lengths",
                "behav_logp",
                "rewards",
                "created_at",
                "actor",
                "task",
            )
        }
        return ScoredGroup(**{**fields, **changes})

    hostile = {
        "outside the model's vocabulary": variant(0, prompt=np.array([3, 4, 99], dtype=np.int32)),
        "beyond the model's context": variant(1, prompt=np.arange(2, 13, dtype=np.int32)),
        "beyond service.max_abs_reward": variant(
            2, rewards=np.array([3e38, 0, 1, 0], dtype=np.float32)
        ),
        "ahead of the learner": variant(3, policy_version=10**9),
    }
    for g in [*hostile.values(), *good]:
        publish(transport, g)
    summary = SelectorService(transport, settings, block_ms=100).run(max_batches=1)
    assert summary["batches_written"] == 1 and summary["groups_rejected"] == len(hostile)
    (batch,) = batches(transport)
    assert batch.group_ids == [g.group_id for g in good]
    reasons = [r["reason"] for r in transport.state.dead_letters()]
    for expected in hostile:
        assert sum(expected in r for r in reasons) == 1, (expected, reasons)
    assert transport.state.stats()["dead"] == len(hostile)
    assert transport.queue.backlog(transport.keys.groups) == 0


def test_large_finite_rewards_do_not_overflow_the_advantages(transport: Transport) -> None:
    cfg = make_cfg()
    huge = [make_group(i, rewards=[3e38, -3e38, 1e38, 0.0]) for i in range(PROMPTS)]
    for g in huge:
        publish(transport, g)
    settings = replace(cfg.selector_settings(), max_abs_reward=1e39)  # let them through
    assert (
        SelectorService(transport, settings, block_ms=100).run(max_batches=1)["batches_written"]
        == 1
    )
    (batch,) = batches(transport)
    assert np.isfinite(batch.advantages).all() and np.abs(batch.advantages).max() < 3

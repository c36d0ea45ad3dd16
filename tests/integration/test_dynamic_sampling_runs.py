"""Dynamic sampling in both drivers: the selector service against a real Redis (zero-variance
groups dropped into the ledger and counters, the batch filled with groups that have variance, the
bound's error), and ``d3s train``'s lock-step trainer generating rounds until each batch is full
(and stopping with the bound's error on a policy that gives no variance)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_selector_service import PROMPTS, G, batches, make_group, publish, selector

from selector.dynamic import DynamicSamplingExhausted
from services.run.config import RunConfig, parse_config
from services.run.trainer import SyncTrainer
from services.telemetry.run_log import read_metrics
from services.transport.bundle import Transport

pytestmark = pytest.mark.integration


def ds_cfg(factor: float = 3) -> RunConfig:
    return parse_config(
        {
            "rollout": {"prompts_per_step": PROMPTS, "samples_per_prompt": G},
            "train": {"total_steps": 5, "seed": 3},
            "algorithm": {
                "preset": "d3s",
                "dynamic_sampling": {"enabled": True, "max_draws_factor": factor},
            },
            "service": {"max_staleness": 1, "wait_timeout_s": 5, "max_batch_backlog": 10},
        }
    )


def flat(i: int) -> list[float]:
    return [float(i % 2)] * G  # all right or all wrong


def test_selector_fills_the_batch_with_variance_and_books_every_drop(transport: Transport):
    # Arrival order mixes them: 3 flat, 2 with signal, 2 flat, 3 with signal.
    order = [("f", 0), ("f", 1), ("f", 2), ("s", 3), ("s", 4), ("f", 5), ("f", 6)]
    order += [("s", 7), ("s", 8), ("s", 9)]
    for kind, i in order:
        publish(transport, make_group(i, rewards=flat(i) if kind == "f" else None))

    summary = selector(transport, ds_cfg()).run(max_batches=1)

    (batch,) = batches(transport)
    assert batch.step == 0 and batch.group_ids == ["g3", "g4", "g7", "g8"]
    assert batch.stats["groups_zero_var"] == 0  # curate saw no flat group
    assert batch.stats["groups_zero_var_dropped"] == 5
    assert batch.stats["groups_generated"] == 9 and batch.stats["draws_per_step"] == 9 / PROMPTS
    assert batch.stats["gen_tokens_per_kept_group"] > 0
    ledger = transport.state.ledger()
    dropped = {f"g{i}" for kind, i in order if kind == "f"}
    assert {g for g, v in ledger.items() if v == "filtered:step-0000000"} == dropped
    stats = transport.state.stats()
    assert stats["groups_filtered"] == summary["groups_filtered"] == 5
    assert stats["groups_used"] == PROMPTS and stats.get("batches_skipped", 0) == 0
    # g9 (signal, beyond this batch) is still queued for the next step: nothing else is.
    assert transport.client.xlen(transport.keys.groups) == 1


def test_selector_stops_with_the_bounds_error_when_no_group_has_variance(transport: Transport):
    cfg = ds_cfg(factor=2)  # at most 8 groups per step: the 5th flat one leaves < 4 to fill it
    for i in range(6):
        publish(transport, make_group(i, rewards=flat(i)))
    with pytest.raises(DynamicSamplingExhausted, match=r"max_draws_factor.*\b8\b"):
        selector(transport, cfg).run(max_batches=1)
    assert batches(transport) == []
    # Every drop was committed and booked before the error (drops come a read at a time).
    filtered = [g for g, v in transport.state.ledger().items() if v.startswith("filtered:")]
    assert transport.state.stats()["groups_filtered"] == len(filtered) >= 5


def _train_cfg(tiny_config, tmp_path: Path, **sections: dict) -> RunConfig:
    return parse_config(
        tiny_config(
            tmp_path / "run",
            tmp_path / "cache",
            train={"total_steps": 3, "eval_every": 100, "seed": 1},
            **sections,
        )
    )


@pytest.mark.parametrize("prefilter", [False, True])
def test_lock_step_generates_rounds_until_every_batch_has_variance(
    tiny_config, tmp_path, prefilter
):
    ds = {"dynamic_sampling": {"enabled": True, "max_draws_factor": 6}}
    greso = {"prefilter": {"enabled": prefilter}}
    cfg = _train_cfg(tiny_config, tmp_path, algorithm=ds, rollout=greso)
    SyncTrainer(cfg).run()
    rows = read_metrics(cfg.train.run_dir / "metrics.jsonl")[1:]
    assert len(rows) == 3
    for r in rows:
        assert r["groups"] == 4 and r["groups_zero_var"] == 0  # every batch group has signal
        assert r["groups_generated"] == (
            4 + r["groups_zero_var_dropped"] + r["groups_surplus_dropped"]
        )
        assert r["draws_per_step"] == r["groups_generated"] / 4
        assert r["gen_rounds"] >= 1 and r["gen_tokens_per_kept_group"] > 0
    # The tiny policy solves about a quarter of the sums: some groups are all wrong.
    assert sum(r["groups_zero_var_dropped"] for r in rows) > 0
    assert max(r["gen_rounds"] for r in rows) > 1
    if prefilter:  # GRESO keeps selecting prompts, over every round of a step
        assert all("prefilter_p_hard" in r for r in rows)
        assert "prompts_prefiltered" in rows[-1]


def test_lock_step_stops_with_the_bounds_error_when_the_policy_gives_no_variance(
    tiny_config, tmp_path
):
    # Near-greedy sampling: the G answers to a prompt are the same answer, so every group's
    # rewards are equal whatever the task.
    cold = {"temperature": 1e-4}
    ds = {"dynamic_sampling": {"enabled": True, "max_draws_factor": 2}}
    cfg = _train_cfg(tiny_config, tmp_path, rollout=cold, learner=cold, algorithm=ds)
    with pytest.raises(
        DynamicSamplingExhausted, match=r"step 0 dropped \d+ groups .*max_draws_factor"
    ):
        SyncTrainer(cfg).run()

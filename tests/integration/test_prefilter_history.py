"""Pre-rollout prompt selection against a real Redis (no Ray): the streaks and p's are shared by
every actor and survive an actor's restart, and a rollout actor's round skips prompts, counts
them and reports the prefilter's metrics."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import redis

from services.api.views import read_snapshot
from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.actor import RolloutActor
from services.rollout.config import PrefilterConfig
from services.rollout.prefilter import Prefilter, PromptHistory, Streak, zero_variance_kind
from services.run.build_rollout import build_worker
from services.run.config import parse_config
from services.tasks.source import TaskSource
from services.transport.bundle import Transport
from services.transport.records import decode
from services.transport.redis_server import EmbeddedRedis

pytestmark = pytest.mark.integration


def _reopen(server: EmbeddedRedis, t: Transport) -> Transport:
    """The same run through a new connection (what a restarted actor opens)."""
    return Transport.open(redis.Redis.from_url(server.url), t.namespace)


def test_history_is_shared_and_survives_a_restart(
    transport: Transport, redis_server: EmbeddedRedis
):
    cfg = PrefilterConfig(enabled=True)
    first = Prefilter(cfg, PromptHistory(transport.state, cfg.p_init))
    first.observe(["a", "b", "c"], np.array([[1, 1], [0, 0], [0, 1]], dtype=np.float32), step=0)
    first.observe(["a", "b"], np.array([[1, 1], [1, 1]], dtype=np.float32), step=1)
    first.skip_chances([], step=2)
    # Step 0: easy 1/3 above 0.0833 -> 0.49, hard 1/3 above 0.1667 -> 0.49; step 1: easy 2/2
    # -> 0.48, hard 0 -> 0.50.
    expected_p = {"easy": pytest.approx(0.48), "hard": pytest.approx(0.50)}
    assert first.history.probabilities() == expected_p

    other = _reopen(redis_server, transport)  # the first actor died; its successor starts
    try:
        again = Prefilter(cfg, PromptHistory(other.state, cfg.p_init))
        assert again.history.streaks(["a", "b", "c", "new"]) == [
            Streak("easy", 2),
            Streak("easy", 1),
            None,
            None,
        ]
        assert again.history.probabilities() == expected_p
        assert again.skip_chances(["a", "c"], step=2) == [pytest.approx(1 - 0.48**2), 0.0]
        # Both actors count toward the shared step; the next step adapts once from both.
        again.observe(["c"], np.zeros((1, 2), dtype=np.float32), step=2)
        first.observe(["c"], np.zeros((1, 2), dtype=np.float32), step=2)
        assert first.history.probabilities() == expected_p
        first.skip_chances([], step=3)
        assert again.history.probabilities() == {
            "easy": pytest.approx(0.49),
            "hard": pytest.approx(0.49),
        }
        assert again.history.streaks(["c"]) == [Streak("hard", 2)]
    finally:
        other.close()


def test_actors_racing_into_a_new_step_adapt_it_once(
    transport: Transport, redis_server: EmbeddedRedis
):
    """Eight actors, each on its own connection, count rounds at step 0 and then all reach
    step 1 at once: exactly one of them applies step 0's adaptation (one p_step, not eight)."""
    cfg = PrefilterConfig(enabled=True, p_step=0.05)
    actors = [_reopen(redis_server, transport) for _ in range(8)]
    try:
        filters = [Prefilter(cfg, PromptHistory(t.state, cfg.p_init)) for t in actors]
        for i, pf in enumerate(filters):  # each round: one all-wrong group of 4
            pf.observe([f"p{i}"], np.zeros((1, 4), dtype=np.float32), step=0)
        counts = transport.client.hgetall(transport.keys.prefilter_counts)
        assert {k.decode(): int(v) for k, v in counts.items()} == {
            "step": 0,
            "groups": 8,
            "easy": 0,
            "hard": 8,
        }
        barrier = threading.Barrier(len(filters))

        def reach_step_1(pf: Prefilter) -> None:
            barrier.wait()
            for _ in range(5):  # draws and rounds of step 1
                pf.skip_chances(["p0"], step=1)
                pf.observe(["x"], np.array([[0, 1, 0, 1]], dtype=np.float32), step=1)

        threads = [threading.Thread(target=reach_step_1, args=(pf,)) for pf in filters]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        # Hard share 1.0 > 0.167: down by one step; easy 0 -> up by one.
        assert transport.state.prefilter_p() == {
            "easy": pytest.approx(0.55),
            "hard": pytest.approx(0.45),
        }
        counts = transport.client.hgetall(transport.keys.prefilter_counts)
        assert {k.decode(): int(v) for k, v in counts.items()} == {
            "step": 1,
            "groups": 40,
            "easy": 0,
            "hard": 0,
        }
    finally:
        for t in actors:
            t.close()


def test_actor_round_skips_counts_and_reports(transport: Transport, redis_server: EmbeddedRedis):
    cfg = parse_config(
        {
            "task": {"type": "arithmetic", "digits": 1},
            "rollout": {
                "prompts_per_step": 4,
                "samples_per_prompt": 2,
                "prefilter": {"enabled": True, "max_draws_factor": 3},
            },
            "train": {"total_steps": 10},
            "service": {"max_group_backlog": 4},
        }
    )
    tok = CharTokenizer()
    model = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), tok)
    # Every prompt of the task has a long all-wrong streak: each is skipped with chance 0.99.
    ids = {
        p.prompt_id
        for p in TaskSource.from_config(cfg.task).train_prompts(2000, np.random.default_rng(0))
    }
    transport.state.record_prefilter_streaks({pid: ("hard", 40) for pid in ids})

    def actor(t: Transport) -> RolloutActor:
        worker = build_worker(cfg, model, tok, "rollout-0", history=t.state)
        return RolloutActor(cfg.rollout_settings(), t, None, worker, 0)  # type: ignore[arg-type]

    first = actor(transport)
    first._produce_round()
    stats, metrics = transport.state.stats(), transport.state.numeric_metrics()
    assert stats["groups_written"] == 4
    # The round drew 3 x 4 under the filter (about 12 skipped), then filled without it.
    assert 6 <= stats["prompts_prefiltered"] <= 12
    assert metrics["prefilter_predicted_zero_var"] == pytest.approx(1.0)
    assert 0.0 <= metrics["prefilter_actual_zero_var"] <= 1.0
    assert {"prefilter_p_easy", "prefilter_p_hard"} <= set(metrics)
    # The API's /metrics (and its Prometheus form) read them from there.
    snap = read_snapshot(transport)
    assert snap.counters["prompts_prefiltered"] == stats["prompts_prefiltered"]
    assert snap.metrics["prefilter_p_hard"] == metrics["prefilter_p_hard"]
    # Each generated prompt's streak moved on by its group's outcome.
    groups = [decode(f) for _, f in transport.client.xrange(transport.keys.groups, "-", "+")]
    streaks = first.worker.prefilter.history.streaks([g.prompt_id for g in groups])
    for g, streak in zip(groups, streaks, strict=True):
        kind = zero_variance_kind(g.rewards)
        assert streak == (None if kind is None else Streak(kind, 41 if kind == "hard" else 1))

    restarted = _reopen(redis_server, transport)
    try:
        second = actor(restarted)
        p = second.worker.prefilter.history.probabilities()
        assert p == {"easy": metrics["prefilter_p_easy"], "hard": metrics["prefilter_p_hard"]}
        second.rounds = restarted.state.rollout_rounds(second.name)  # as run() resumes
        second._produce_round()
        assert restarted.state.stats()["prompts_prefiltered"] > stats["prompts_prefiltered"]
    finally:
        restarted.close()

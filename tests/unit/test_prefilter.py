"""Pre-rollout prompt selection (GRESO): the skip probability and the adaptation of p against
hand-computed values, streak bookkeeping, the worker's enlarged and bounded draw, no starvation
under the exploration floor, and config validation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from services.policy.tokenizer import char_tokenizer
from services.rollout.config import PrefilterConfig
from services.rollout.prefilter import (
    MemoryHistoryStore,
    Prefilter,
    PromptHistory,
    Streak,
    adapt_p,
    skip_probability,
    zero_variance_kind,
)
from services.rollout.worker import RolloutWorker
from services.run.config import ConfigError, parse_config
from services.tasks.base import Prompt
from services.tasks.verify import CORRECT_REWARD, gsm8k_format_answer

REPO = Path(__file__).resolve().parents[2]


def test_skip_probability_hand_computed():
    assert skip_probability(0, 0.5, 0.01) == 0.0  # no streak: always generated
    assert skip_probability(1, 0.5, 0.01) == pytest.approx(0.5)
    assert skip_probability(3, 0.5, 0.01) == pytest.approx(0.875)
    # 0.5^6 = 0.015625 is still above the floor; 0.5^7 = 0.0078 is below it.
    assert skip_probability(6, 0.5, 0.01) == pytest.approx(1 - 0.015625)
    assert skip_probability(7, 0.5, 0.01) == pytest.approx(0.99)
    assert skip_probability(8, 0.5, 0.01) == pytest.approx(0.99)
    assert skip_probability(2, 0.9, 0.01) == pytest.approx(1 - 0.81)
    assert skip_probability(1000, 0.95, 0.05) == pytest.approx(0.95)


def test_adapt_p_steps_and_clips_at_both_bounds():
    # Above target: skip more (p down); at or below: skip less (p up).
    assert adapt_p(0.5, 0.30, 0.25) == pytest.approx(0.49)
    assert adapt_p(0.5, 0.25, 0.25) == pytest.approx(0.51)
    assert adapt_p(0.5, 0.0, 0.25) == pytest.approx(0.51)
    assert adapt_p(0.5, 0.9, 0.25, step=0.1) == pytest.approx(0.4)
    assert adapt_p(0.055, 1.0, 0.25) == pytest.approx(0.05)  # clipped at lo
    assert adapt_p(0.05, 1.0, 0.25) == pytest.approx(0.05)
    assert adapt_p(0.945, 0.0, 0.25) == pytest.approx(0.95)  # clipped at hi
    assert adapt_p(0.95, 0.0, 0.25) == pytest.approx(0.95)
    assert adapt_p(0.5, 1.0, 0.25, lo=0.2, hi=0.6, step=0.5) == pytest.approx(0.2)
    p = 0.5
    for _ in range(10):
        p = adapt_p(p, 0.5, 0.25)
    assert p == pytest.approx(0.40)


def test_zero_variance_kind():
    assert zero_variance_kind(np.array([1.0, 1.0, 1.0])) == "easy"
    assert zero_variance_kind(np.array([0.0, 0.0])) == "hard"
    assert zero_variance_kind(np.array([0.0, 1.0, 1.0])) is None


def test_easy_and_hard_follow_correctness_not_the_sign_of_the_reward():
    # gsm8k_format: every answer formatted but wrong earns FORMAT_CREDIT each; that group is
    # all wrong (hard), as evaluation would count it, though every reward is positive.
    wrong = gsm8k_format_answer("so #### 7", "#### 5")
    right = gsm8k_format_answer("so #### 5", "#### 5")
    assert 0 < wrong < CORRECT_REWARD <= right
    assert zero_variance_kind(np.full(4, wrong)) == "hard"
    assert zero_variance_kind(np.full(4, right)) == "easy"
    assert zero_variance_kind(np.array([wrong, wrong, 0.0])) is None  # format spread: signal
    assert zero_variance_kind(np.array([right, wrong])) is None
    # A verifier with partial credit only (never 1) has no easy groups at all.
    assert zero_variance_kind(np.full(3, 0.5)) == "hard"
    # Such groups drive the hard p, not the easy one.
    cfg = PrefilterConfig(enabled=True)
    pf = Prefilter(cfg, PromptHistory(MemoryHistoryStore(), cfg.p_init))
    pf.observe(["a", "b"], np.full((2, 4), wrong), step=0)
    report = pf.observe(["c"], np.array([[right, wrong, 0.0, 0.0]]), step=1)
    assert report.p == {"easy": pytest.approx(0.51), "hard": pytest.approx(0.49)}
    assert pf.history.streaks(["a", "b", "c"]) == [Streak("hard", 1), Streak("hard", 1), None]


def test_history_streaks_extend_switch_and_reset():
    h = PromptHistory(MemoryHistoryStore(), p_init=0.5)
    h.record({"a": "hard", "b": "easy", "c": None})
    h.record({"a": "hard", "b": "hard"})
    h.record({"a": "hard"})
    assert h.streaks(["a", "b", "c"]) == [Streak("hard", 3), Streak("hard", 1), None]
    h.record({"a": None})
    assert h.streaks(["a"]) == [None]


def test_observe_adapts_each_p_toward_its_share_once_per_learner_step():
    cfg = PrefilterConfig(enabled=True)  # targets: easy 0.25/3, hard 0.25*2/3
    pf = Prefilter(cfg, PromptHistory(MemoryHistoryStore(), cfg.p_init))
    # Step 0: 1 easy, 0 hard of 4 groups. Counted, not yet adapted (the step is still open).
    rewards = np.array([[1, 1], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    report = pf.observe(["a", "b", "c", "d"], rewards, step=0)
    assert report.p == {"easy": 0.5, "hard": 0.5}
    assert report.actual_zero_var == 0.25 and report.predicted_zero_var == 0.0
    # The first draw at step 1 adapts once from step 0's shares: easy 0.25 > 0.0833 -> down;
    # hard 0 <= 0.1667 -> up. The draw already uses them ("a" has an easy streak of 1).
    assert pf.skip_chances(["a", "z"], step=1) == [pytest.approx(1 - 0.49), 0.0]
    assert pf.history.probabilities() == {"easy": pytest.approx(0.49), "hard": pytest.approx(0.51)}
    # "a" predicted for 1 of 2 prompts; both groups all wrong; counted toward step 1.
    report = pf.observe(["a", "e"], np.zeros((2, 2), dtype=np.float32), step=1)
    assert report.predicted_zero_var == 0.5 and report.actual_zero_var == 1.0
    assert report.p == {"easy": pytest.approx(0.49), "hard": pytest.approx(0.51)}
    # Step 2 closes step 1 (hard share 1.0 -> down, easy 0 -> up).
    assert pf.skip_chances(["a", "e", "z"], step=2) == [
        pytest.approx(0.5),
        pytest.approx(0.5),
        0.0,
    ]
    assert set(report.metrics()) == {
        "prefilter_predicted_zero_var",
        "prefilter_actual_zero_var",
        "prefilter_p_easy",
        "prefilter_p_hard",
    }


class _Pool:
    """A task source drawing uniformly from ``size`` one-character prompts."""

    verifier_errors = 0

    def __init__(self, size: int) -> None:
        self.size = size
        self.drawn = 0

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        self.drawn += n
        return [Prompt(f"p{i}", "1", "1", "arithmetic") for i in rng.integers(0, self.size, n)]


class _Engine:
    def __init__(self) -> None:
        self.tokenizer, self.version = char_tokenizer(), 0


def _worker(pool: _Pool, **cfg: float) -> RolloutWorker:
    config = PrefilterConfig(enabled=True, **cfg)  # type: ignore[arg-type]
    prefilter = Prefilter(config, PromptHistory(MemoryHistoryStore(), config.p_init))
    return RolloutWorker(_Engine(), pool, 2, prefilter=prefilter)  # type: ignore[arg-type]


def _all_hard(worker: RolloutWorker, size: int, count: int) -> None:
    assert worker.prefilter is not None
    worker.prefilter.history.store.record_prefilter_streaks(
        {f"p{i}": ("hard", count) for i in range(size)}
    )


def test_worker_skips_and_enlarges_the_draw_within_its_bound():
    pool = _Pool(10)
    worker = _worker(pool, max_draws_factor=3)
    _all_hard(worker, 10, 50)  # skip chance 0.99 for every prompt
    prompts = worker.draw_prompts(4, np.random.default_rng(0), np.random.default_rng(1))
    assert len(prompts) == 4  # the round still has its prompts
    # Skipping stops once the round drew 3 x 4; the draws that fill it are not filtered.
    assert worker.prompts_prefiltered >= 10
    assert 12 <= pool.drawn <= 12 + 4 + 4
    # Without streaks nothing is skipped, and the draw is the one with the prefilter off.
    fresh, plain = _worker(_Pool(10)), RolloutWorker(_Engine(), _Pool(10), 2)  # type: ignore[arg-type]
    a = fresh.draw_prompts(6, np.random.default_rng(5), np.random.default_rng(6))
    b = plain.draw_prompts(6, np.random.default_rng(5))
    assert [p.prompt_id for p in a] == [p.prompt_id for p in b] and fresh.prompts_prefiltered == 0


def test_worker_skips_are_reproducible_from_the_seeds():
    def draw() -> tuple[list[str], int]:
        w = _worker(_Pool(10))
        w.prefilter.history.store.record_prefilter_streaks(  # type: ignore[union-attr]
            {f"p{i}": ("easy", 1 + i % 3) for i in range(1, 10)}
        )
        ids = [
            p.prompt_id
            for p in w.draw_prompts(8, np.random.default_rng(7), np.random.default_rng(8))
        ]
        return ids, w.prompts_prefiltered

    first = draw()
    assert first == draw() and first[1] > 0


def test_many_rounds_at_one_step_adapt_p_once_from_their_summed_shares():
    """N actors' rounds at one learner step move p by one p_step, as one round would: the
    shares are those of all their groups together."""
    cfg = PrefilterConfig(enabled=True, p_step=0.05)
    pf = Prefilter(cfg, PromptHistory(MemoryHistoryStore(), cfg.p_init))
    hard = np.zeros((1, 4), dtype=np.float32)
    signal = np.array([[0, 1, 0, 1]], dtype=np.float32)
    for actor in range(8):  # 8 rounds at step 3: 2 all-wrong groups of 8 (share 0.25 > 0.167)
        pf.observe([f"p{actor}"], hard if actor < 2 else signal, step=3)
        assert pf.history.probabilities() == {"easy": 0.5, "hard": 0.5}
    # A late round of an actor still on step 2's weights counts toward the open step.
    pf.observe(["late"], signal, step=2)
    assert pf.history.store.counts == {"groups": 9, "easy": 0, "hard": 2}
    pf.skip_chances([], step=4)
    once = {"easy": pytest.approx(0.55), "hard": pytest.approx(0.45)}
    assert pf.history.probabilities() == once
    # More draws and rounds at step 4, from any actor, adapt nothing until step 5 begins.
    for _ in range(3):
        pf.skip_chances(["p0"], step=4)
        pf.observe(["p0"], signal, step=4)
    assert pf.history.probabilities() == once
    # A step with no rounds counted leaves p as it was; skipped steps adapt once, not per step.
    pf.skip_chances([], step=9)
    pf.skip_chances([], step=12)
    assert pf.history.probabilities() == {"easy": pytest.approx(0.6), "hard": pytest.approx(0.5)}


def test_no_prompt_is_starved_under_the_floor():
    """Every prompt of a pool whose groups are always all wrong keeps being generated: p falls
    to p_min and every streak grows long, but each prompt still passes its coin with the floor's
    probability (0.01), so it is tried again within a bounded number of epochs."""
    size, epochs, floor = 40, 1500, 0.01
    cfg = PrefilterConfig(enabled=True, floor=floor)
    pf = Prefilter(cfg, PromptHistory(MemoryHistoryStore(), cfg.p_init))
    ids = [f"p{i}" for i in range(size)]
    rng = np.random.default_rng(0)
    last_tried = dict.fromkeys(ids, 0)
    longest_gap = 0
    tries_after_warmup = considered_after_warmup = 0
    for epoch in range(1, epochs + 1):  # an epoch considers every prompt once
        chances = pf.skip_chances(ids, step=epoch)
        tried = [pid for pid, c in zip(ids, chances, strict=True) if rng.random() >= c]
        for pid in tried:
            longest_gap = max(longest_gap, epoch - last_tried[pid])
            last_tried[pid] = epoch
        if tried:
            pf.observe(tried, np.zeros((len(tried), 4), dtype=np.float32), step=epoch)
        if epoch > 200:  # p has reached p_min and every streak is long: pure floor
            assert all(c == pytest.approx(1 - floor) for c in chances)
            tries_after_warmup += len(tried)
            considered_after_warmup += size
    assert pf.history.probabilities()["hard"] == pytest.approx(cfg.p_min)
    # P(a given prompt untried for N epochs) = (1 - floor)^N; N with size * that <= 1e-3.
    bound = math.ceil(math.log(1e-3 / size) / math.log(1 - floor))
    still_untried = [pid for pid in ids if epochs - last_tried[pid] > bound]
    assert longest_gap <= bound and not still_untried, (longest_gap, bound)
    rate = tries_after_warmup / considered_after_warmup
    # 52,000 Bernoulli(0.01) coins: the standard error is 0.00044; 4 of them is the tolerance.
    assert abs(rate - floor) < 4 * math.sqrt(floor * (1 - floor) / considered_after_warmup)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("floor", 0.0, "rollout.prefilter.floor"),
        ("p_step", -0.01, "rollout.prefilter.p_step"),
        ("target_zero_var", 1.5, "rollout.prefilter.target_zero_var"),
        ("easy_fraction", 2, "rollout.prefilter.easy_fraction"),
        ("max_draws_factor", 0.5, "rollout.prefilter.max_draws_factor"),
        ("p_init", 0.99, "p_init: 0.99 must be within"),
        ("p_min", 0.96, "p_min: 0.96 must be below p_max"),
        ("skip_all", True, "rollout.prefilter.skip_all"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"rollout": {"prefilter": {"enabled": True, field: value}}})


def test_prefilter_is_off_by_default_and_on_in_quickstart_greso():
    from services.run.config import load_config

    assert parse_config({}).rollout.prefilter.enabled is False
    # Every other shipped config leaves the section out, so it is off there.
    for path in sorted((REPO / "configs").glob("*.yaml")):
        rollout = (yaml.safe_load(path.read_text()) or {}).get("rollout") or {}
        assert ("prefilter" in rollout) == (path.stem == "quickstart_greso"), path.name
    on, off = (load_config(REPO / f"configs/{n}.yaml") for n in ("quickstart_greso", "quickstart"))
    assert on.rollout.prefilter.enabled is True
    # Everything else is the quickstart's, so the two runs compare the prefilter alone.
    assert on.rollout.model_copy(update={"prefilter": off.rollout.prefilter}) == off.rollout
    same = {"name": True, "rollout": True, "train": {"run_dir"}}  # run_dir follows the name
    assert on.model_dump(exclude=same) == off.model_dump(exclude=same)


def test_build_worker_wires_the_prefilter_only_when_enabled():
    from services.policy.model import PolicySpec, build_policy
    from services.policy.tokenizer import CharTokenizer
    from services.run.build_rollout import build_worker

    tok = CharTokenizer()
    model = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), tok)
    base = {"task": {"type": "arithmetic", "digits": 1}}
    off = build_worker(parse_config(base), model, tok, "sync")
    assert off.prefilter is None
    on_cfg = parse_config({**base, "rollout": {"prefilter": {"enabled": True, "p_init": 0.3}}})
    on = build_worker(on_cfg, model, tok, "sync")  # d3s train: no Redis, history in memory
    assert isinstance(on.prefilter.history.store, MemoryHistoryStore)
    assert on.prefilter.config == on_cfg.rollout.prefilter
    assert on.prefilter.history.probabilities() == {"easy": 0.3, "hard": 0.3}
    groups, _ = on.produce(3, seed=11)
    assert len(groups) == 3 and on.last_prefilter_report is not None
    assert on.last_prefilter_report.predicted_zero_var == 0.0  # nothing seen before

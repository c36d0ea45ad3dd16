"""task.type reasoning_gym: each prompt is scored by its own dataset's score_answer, training and
held-out never share a question, and a bad entry fails validation naming the field."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from services.tasks.config import TaskConfig
from services.tasks.reasoning_gym import HELDOUT_SEED, TRAIN_SEED, ReasoningGymScorer
from services.tasks.source import TaskSource

reasoning_gym = pytest.importorskip("reasoning_gym", reason="the reasoning-gym extra")

TASK = TypeAdapter(TaskConfig)

# One dataset per task family, with a reference answer that is right and one that is wrong.
FAMILIES = {
    "basic_arithmetic": "arithmetic",
    "simple_equations": "algebra",
    "propositional_logic": "logic",
    "shortest_path": "graphs",
    "tower_of_hanoi": "games",
    "caesar_cipher": "cipher",
    "letter_counting": "strings",
}


def _right_answer(prompt) -> str:
    # Open-ended datasets have no single reference; they keep an example of a right one.
    return prompt.metadata.get("example_answer") or prompt.answer


def _task(**fields):
    return TASK.validate_python({"type": "reasoning_gym", **fields})


@pytest.fixture(scope="module")
def families() -> TaskSource:
    datasets = [{"name": n} for n in FAMILIES]
    return TaskSource.from_config(_task(datasets=datasets, heldout_size=2 * len(FAMILIES)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_prompt_is_scored_by_its_own_datasets_score_answer(families, name) -> None:
    prompt = next(p for p in families.heldout() if p.source == name)
    guard = families.verifiers[prompt.task]
    scorer = guard.fn
    assert isinstance(scorer, ReasoningGymScorer)
    assert type(scorer.dataset) is reasoning_gym.factory.DATASETS[name][0]
    wrong = "<answer>definitely not it 12345</answer>"
    answer = _right_answer(prompt)
    right = f"thinking...\n<answer>{answer}</answer>"
    rewards = families.score([prompt], [right, wrong, answer], 3).tolist()
    assert rewards[0][0] == 1.0 and rewards[0][1] < 1.0 and rewards[0][2] == 0.0
    assert families.verifier_errors == 0
    # The dataset's own score_answer with the entry's metadata agrees on both.
    entry = {"question": prompt.text, "answer": prompt.answer or None, "metadata": prompt.metadata}
    assert scorer.dataset.score_answer(answer, entry) == 1.0
    assert scorer.dataset.score_answer("definitely not it 12345", entry) < 1.0


def test_a_scorer_that_raises_scores_zero_and_is_counted(families, monkeypatch) -> None:
    prompt = families.heldout()[0]
    dataset = families.verifiers[prompt.task].fn.dataset

    def broken(answer, entry):
        raise RuntimeError("boom")

    monkeypatch.setattr(dataset, "score_answer", broken)
    before = families.verifier_errors
    assert families.score([prompt], [f"<answer>{prompt.answer}</answer>"], 1).tolist() == [[0.0]]
    assert families.verifier_errors == before + 1


def test_train_and_heldout_never_share_a_question() -> None:
    # One-digit sums of two terms: a few hundred questions, so seeds do collide on questions.
    small = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = _task(
        datasets=[{"name": "basic_arithmetic", "config": small}, {"name": "chain_sum"}],
        heldout_size=100,
    )
    source = TaskSource.from_config(task)
    heldout = {p.text for p in source.heldout()}
    assert len(heldout) == 100  # distinct
    train = source.train_prompts(3000, np.random.default_rng(0))
    assert not heldout & {p.text for p in train}
    # Without the redraw the small dataset would have shared questions: the check has teeth.
    from services.tasks.reasoning_gym import build_dataset

    raw = build_dataset("basic_arithmetic", small, TRAIN_SEED, 1 << 20)
    assert heldout & {raw[i]["question"] for i in range(3000)}
    # Fresh draws: different steps' rngs give different prompts.
    again = source.train_prompts(50, np.random.default_rng(1))
    assert [p.text for p in again] != [p.text for p in train[:50]]
    # Both datasets are in the held-out set in equal shares, each tagged with its source.
    counts = {
        s: sum(p.source == s for p in source.heldout()) for s in ("basic_arithmetic", "chain_sum")
    }
    assert counts == {"basic_arithmetic": 50, "chain_sum": 50}
    assert HELDOUT_SEED + 400 < TRAIN_SEED  # the two seed ranges do not meet


def test_weights_and_metadata_travel_with_the_prompt() -> None:
    task = _task(datasets=[{"name": "chain_sum", "weight": 3}, {"name": "leg_counting"}])
    prompts = TaskSource.from_config(task).train_prompts(400, np.random.default_rng(2))
    share = np.mean([p.source == "chain_sum" for p in prompts])
    assert 0.68 < share < 0.82
    p = prompts[0]
    assert p.metadata["source_dataset"] == p.source and p.task == f"reasoning_gym/{p.source}"
    assert "<answer></answer>" in task.instruction


def test_hashes_convention() -> None:
    task = _task(datasets=[{"name": "chain_sum"}], answer_format="hashes", heldout_size=1)
    source = TaskSource.from_config(task)
    (p,) = source.heldout()
    assert "####" in task.instruction
    responses = [f"work\n#### {p.answer}\n", f"<answer>{p.answer}</answer>"]
    assert source.score([p], responses, 2).tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "chain_summ"},
            r"name: 'chain_summ' is not a reasoning-gym dataset; did you mean \['chain_sum'",
        ),
        (
            {"name": "chain_sum", "config": {"bogus": 1}},
            r"config: chain_sum refuses \{'bogus': 1\}",
        ),
        (
            {"name": "chain_sum", "config": {"min_terms": 5, "max_terms": 2}},
            r"config: chain_sum refuses",
        ),
        ({"name": "chain_sum", "config": {"seed": 3}}, r"config.seed: set by the task"),
        ({"name": "chain_sum", "weight": 0}, r"weight"),
    ],
)
def test_a_bad_entry_names_the_field(entry, message) -> None:
    with pytest.raises(ValidationError, match=message):
        _task(datasets=[entry])


def test_two_entries_of_one_dataset_need_tags() -> None:
    with pytest.raises(ValidationError, match="give the entries distinct 'tag's"):
        _task(datasets=[{"name": "chain_sum"}, {"name": "chain_sum"}])
    task = _task(
        datasets=[
            {"name": "chain_sum"},
            {"name": "chain_sum", "tag": "long", "config": {"min_terms": 5, "max_terms": 6}},
        ]
    )
    assert {p.source for p in TaskSource.from_config(task).heldout()} == {"chain_sum", "long"}


def test_heldout_evaluation_reads_the_stated_answer_and_reports_a_format_rate() -> None:
    """maj@k votes on the answer a response states, and the format rate (samples that state
    one) is reported overall and per dataset, as for the built-in tasks."""
    import torch

    from bench.full_vocab_model import build_tokenizer
    from services.evaluation.heldout import HeldoutEvaluation, heldout_prompts
    from services.policy.model import PolicySpec, build_policy
    from services.rollout.config import RolloutConfig
    from services.run.config import EvalConfig

    tok = build_tokenizer(vocab_size=300)  # byte-level: reads any question
    names = ["basic_arithmetic", "leg_counting"]
    task = _task(datasets=[{"name": n} for n in names], heldout_size=4)
    held = heldout_prompts(task, None, tok)
    for p in held.prompts:
        stated = held.extractors[p.task]
        assert stated("so... <answer> 12 </answer>") == "12" and stated("12") is None

    torch.manual_seed(0)
    model = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2, n_positions=1024), tok)
    rollout = RolloutConfig(max_new_tokens=4, temperature=1.0)
    evaluation = HeldoutEvaluation(task, rollout, EvalConfig(n_samples=2, ks=[1, 2]), tok)
    result = evaluation.run(model)
    # four random characters state no answer: 0, measured (None would mean "not known")
    assert result.overall.format_rate == 0.0
    assert {s: g.format_rate for s, g in result.by_source.items()} == dict.fromkeys(names, 0.0)

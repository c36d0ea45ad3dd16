"""The held-out evaluation a run reports (services/evaluation/heldout.py): prompts over
``rollout.max_prompt_tokens`` are left out and counted, none left is an error naming the field,
and a run's evaluation is :func:`evaluate_policy` with the ``eval`` section's settings (falling
back to the rollout's sampling) turned into the logged metric row."""

from __future__ import annotations

import json

import pytest
import torch

from services.evaluation.evaluate import evaluate_policy
from services.evaluation.heldout import HeldoutEvaluation, evaluation_metrics, heldout_prompts
from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.config import RolloutConfig
from services.run.config import EvalConfig
from services.tasks.config import JsonlTaskConfig

TOK = CharTokenizer()


@pytest.fixture
def task(tmp_path) -> JsonlTaskConfig:
    """Held-out questions of 3, 5 and 7 characters."""
    path = tmp_path / "sums.jsonl"
    rows = [("1+1", "2"), ("12+34", "46"), ("123+456", "579")]
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return JsonlTaskConfig(train_path=path, verifier="arithmetic", heldout_size=3)


def test_prompts_over_the_limit_are_left_out_and_counted(task) -> None:
    prompts, verifiers, left_out, extractors = heldout_prompts(task, 5, TOK)
    assert sorted(p.text for p in prompts) == ["1+1", "12+34"]
    assert left_out == 1 and "arithmetic" in verifiers
    assert extractors["arithmetic"]("7") == "7"  # the registered extractors, for maj@k
    assert heldout_prompts(task, None, TOK)[2] == 0
    with pytest.raises(ValueError, match=r"^rollout.max_prompt_tokens: 2 is below every held-out"):
        heldout_prompts(task, 2, TOK)


def test_a_runs_evaluation_is_evaluate_policy_with_its_settings(task) -> None:
    torch.manual_seed(0)
    model = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), TOK)
    rollout = RolloutConfig(max_new_tokens=4, temperature=0.7, top_p=0.9, max_prompt_tokens=5)
    settings = EvalConfig(n_samples=4, ks=[1, 4], seed=3)
    evaluation = HeldoutEvaluation(task, rollout, settings, TOK)
    assert evaluation.left_out == 1

    result = evaluation.run(model, n_samples=2, ks=[2])
    assert (result.n_samples, result.ks, result.temperature, result.top_p) == (2, [2], 0.7, 0.9)
    assert result.overall.n_prompts == 2 and result.max_new_tokens == 4

    expected = evaluate_policy(
        model,
        TOK,
        evaluation.prompts,
        evaluation.verifiers,
        n_samples=4,
        ks=[1, 4],
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=4,
        seed=3,
    )
    row = evaluation(model)
    assert row == evaluation_metrics(expected) and row["heldout_accuracy"] == (
        expected.greedy_accuracy
    )
    assert {"eval/pass@4", "eval/maj@4", "eval/greedy_accuracy"} <= set(row)

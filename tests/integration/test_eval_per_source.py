"""Held-out evaluation per source: prompts from two sources or more get greedy accuracy and
pass@k per source next to the overall numbers, in the metric row and in d3s eval's table."""

from __future__ import annotations

import pytest

from services.evaluation import EvalResult, evaluate_policy
from services.evaluation.heldout import evaluation_metrics
from services.evaluation.results import source_suffix
from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer
from services.tasks.base import Prompt
from services.tasks.verify import SafeVerifier


def _prompts(source_a: str, source_b: str) -> list[Prompt]:
    # Three prompts whose verifier always says right, one whose verifier always says wrong.
    return [Prompt(f"a{i}", f"{i}+1=", "0", "right", source=source_a) for i in range(3)] + [
        Prompt("b0", "9+9=", "0", "wrong", source=source_b)
    ]


VERIFIERS = {
    "right": SafeVerifier(lambda text, answer: 1.0),
    "wrong": SafeVerifier(lambda text, answer, metadata: 0.0),
}


@pytest.fixture(scope="module")
def policy():
    tok = CharTokenizer()
    spec = PolicySpec(n_layer=1, n_embd=32, n_head=2, n_positions=16)
    return build_policy(spec, tok, seed=0), tok


def test_per_source_accuracy_and_pass_at_k_next_to_the_overall(policy) -> None:
    model, tok = policy
    r = evaluate_policy(
        model,
        tok,
        _prompts("chain_sum", "openai/gsm8k"),
        VERIFIERS,
        n_samples=2,
        ks=(1, 2),
        max_new_tokens=3,
        seed=0,
    )
    assert set(r.by_source) == {"chain_sum", "openai/gsm8k"}
    assert r.by_source["chain_sum"].n_prompts == 3 and r.by_source["openai/gsm8k"].n_prompts == 1
    assert r.greedy_accuracy == 0.75
    assert r.by_source["chain_sum"].greedy_accuracy == 1.0
    assert r.by_source["openai/gsm8k"].greedy_accuracy == 0.0
    assert r.by_source["chain_sum"].pass_at_k == {1: 1.0, 2: 1.0}
    assert r.by_source["openai/gsm8k"].pass_at_k == {1: 0.0, 2: 0.0}
    row = evaluation_metrics(r)
    assert row["eval/greedy_accuracy"] == 0.75 and row["heldout_accuracy"] == 0.75
    assert row["eval/greedy_accuracy/src:chain_sum"] == 1.0
    assert row["eval/pass@2/src:openai_gsm8k"] == 0.0  # "/" cannot be in a metric name
    assert source_suffix("openai/gsm8k") == "/src:openai_gsm8k"
    # d3s eval's JSON and table carry them too.
    back = EvalResult.from_dict(r.to_dict())
    assert back.by_source["chain_sum"].greedy_accuracy == 1.0
    header, rows = r.table()
    assert header[0] == "source" and [x[0] for x in rows] == ["all", "chain_sum", "openai/gsm8k"]


def test_one_source_adds_nothing(policy) -> None:
    model, tok = policy
    r = evaluate_policy(
        model, tok, _prompts("same", "same"), VERIFIERS, n_samples=0, ks=(), max_new_tokens=3
    )
    assert r.by_source == {} and not [k for k in r.metrics() if "/src:" in k]

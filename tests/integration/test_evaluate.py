"""evaluate_policy end to end on a tiny GPT-2: numbers in range and consistent with their parts.

The policy is trained for a few seconds on one-digit addition so that greedy and sampled
accuracy land strictly between 0 and 1; with a random model every metric would be 0 and the
checks below could not fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.evaluation import EvalResult, evaluate_policy, mean_maj_at_k, mean_pass_at_k
from services.evaluation.evaluate import chunk_seed
from services.policy.evaluate import evaluate_greedy
from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.hf_engine import HFRolloutEngine
from services.tasks.arithmetic import ArithmeticTask
from services.tasks.base import Prompt
from services.tasks.mixed import ALPHABET, MixedPrompt, MixedTask
from services.tasks.verify import exact_integer

MAX_NEW = 3  # two answer digits + EOS
SETTINGS = {
    "n_samples": 8,
    "ks": (1, 4, 8),
    "temperature": 1.0,
    "max_new_tokens": MAX_NEW,
    "seed": 11,
}


def _one_digit_prompts() -> list[MixedPrompt]:
    """All 100 one-digit sums; difficulty 2 when the sum carries."""
    task = ArithmeticTask(digits=1)
    out = []
    for a in range(10):
        for b in range(10):
            p = task.make_prompt(a, b)
            out.append(
                MixedPrompt(p.prompt_id, p.text, p.answer, p.task, difficulty=1 + int(a + b >= 10))
            )
    return out


def _train(model, tok: CharTokenizer, prompts: list[Prompt], steps: int) -> None:
    """Teacher-forced training on the correct answers (prompt tokens carry no loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(steps):
        batch = [prompts[i] for i in rng.integers(0, len(prompts), size=64)]
        seqs = [tok.encode(p.text) + tok.encode(p.answer) + [tok.eos_token_id] for p in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        for i, (s, p) in enumerate(zip(seqs, batch, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, len(p.text) : len(s)] = torch.tensor(s[len(p.text) :])
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def setup():
    tok = CharTokenizer(ALPHABET)
    prompts = _one_digit_prompts()
    model = build_policy(PolicySpec(n_layer=2, n_embd=64, n_head=4, n_positions=16), tok, seed=0)
    _train(model, tok, prompts, steps=90)
    return model, tok, prompts


@pytest.fixture(scope="module")
def result(setup) -> EvalResult:
    model, tok, prompts = setup
    return evaluate_policy(model, tok, prompts, batch_size=40, **SETTINGS)


def test_metrics_are_in_range_and_not_trivial(result, setup):
    _, _, prompts = setup
    g = result.overall
    assert g.n_prompts == len(prompts) == 100
    assert 0.0 < g.greedy_accuracy < 1.0
    assert 0.0 < g.pass_at_k[1] < g.pass_at_k[4] <= g.pass_at_k[8] <= 1.0
    for k in (1, 4, 8):
        assert 0.0 <= g.maj_at_k[k] <= 1.0
    assert g.maj_at_k[1] == pytest.approx(
        np.mean([r.correct[0] for r in result.prompts])
    )  # maj@1 is the first sample's accuracy
    assert 1.0 <= g.mean_response_length <= MAX_NEW
    assert 0.0 <= g.truncated_fraction <= 1.0
    assert len(result.prompts) == 100
    assert all(len(r.correct) == len(r.answers) == len(r.lengths) == 8 for r in result.prompts)


def test_pass_at_1_is_the_mean_per_sample_accuracy(result):
    per_sample = np.mean([c for r in result.prompts for c in r.correct])
    assert result.pass_at_k[1] == pytest.approx(per_sample, abs=1e-12)
    assert result.overall.sample_accuracy == pytest.approx(per_sample, abs=1e-12)
    counts = [r.n_correct for r in result.prompts]
    for k in (4, 8):
        assert result.pass_at_k[k] == pytest.approx(mean_pass_at_k(8, counts, k), abs=1e-12)
        assert result.maj_at_k[k] == pytest.approx(
            mean_maj_at_k(
                [r.answers for r in result.prompts], [r.correct for r in result.prompts], k
            )
        )


def test_greedy_accuracy_is_evaluate_greedys(result, setup):
    model, tok, prompts = setup
    assert result.greedy_accuracy == evaluate_greedy(model, tok, prompts, MAX_NEW)
    weighted = 0.0
    for d in (1, 2):
        group = [p for p in prompts if p.difficulty == d]
        assert result.by_difficulty[d].n_prompts == len(group)
        assert result.by_difficulty[d].greedy_accuracy == evaluate_greedy(
            model, tok, group, MAX_NEW
        )
        weighted += result.by_difficulty[d].greedy_accuracy * len(group)
    assert weighted / len(prompts) == pytest.approx(result.greedy_accuracy, abs=1e-12)


def test_per_difficulty_sampled_metrics_partition_the_prompts(result):
    assert set(result.by_difficulty) == {1, 2}
    total = sum(g.sample_accuracy * g.n_prompts for g in result.by_difficulty.values())
    assert total / 100 == pytest.approx(result.pass_at_k[1], abs=1e-12)
    for d, g in result.by_difficulty.items():
        records = [r for r in result.prompts if r.difficulty == d]
        assert g.pass_at_k[8] == pytest.approx(mean_pass_at_k(8, [r.n_correct for r in records], 8))


def test_samples_are_the_rollout_engines_and_scored_by_the_verifier(result, setup):
    model, tok, prompts = setup
    engine = HFRolloutEngine(model, tok, max_new_tokens=MAX_NEW, temperature=1.0)
    for chunk_index, start in enumerate(range(0, 100, 40)):
        chunk = prompts[start : start + 40]
        batch = engine.generate(chunk, 8, seed=chunk_seed(SETTINGS["seed"], chunk_index))
        for i, p in enumerate(chunk):
            record = result.prompts[start + i]
            texts = batch.texts[i * 8 : (i + 1) * 8]
            assert record.prompt_id == p.prompt_id
            assert record.correct == [exact_integer(t, p.answer) == 1.0 for t in texts]
            assert record.answers == [
                str(int(t)) if t.strip().lstrip("+-").isdigit() else None for t in texts
            ]
            assert record.lengths == batch.response_lengths[i * 8 : (i + 1) * 8].tolist()


def test_deterministic_for_a_seed_and_restores_train_mode(result, setup):
    model, tok, prompts = setup
    model.train()
    again = evaluate_policy(model, tok, prompts, batch_size=40, **SETTINGS)
    assert model.training
    model.eval()
    assert again.prompts == result.prompts
    assert again.to_dict()["overall"] == result.to_dict()["overall"]
    other = evaluate_policy(
        model, tok, prompts, batch_size=40, **{**SETTINGS, "seed": 12}, greedy=False
    )
    assert other.prompts != result.prompts
    assert other.greedy_accuracy is None


def test_json_round_trip_metrics_and_table(result):
    d = json.loads(json.dumps(result.to_dict(per_prompt=True)))
    back = EvalResult.from_dict(d)
    assert back == result
    assert "prompts" not in result.to_dict()
    m = result.metrics()
    assert m["eval/pass@8"] == result.pass_at_k[8]
    assert m["eval/greedy_accuracy/d2"] == result.by_difficulty[2].greedy_accuracy
    assert m["eval/maj@4/d1"] == result.by_difficulty[1].maj_at_k[4]
    header, rows = result.table()
    assert header[:3] == ["difficulty", "prompts", "greedy"] and "pass@8" in header
    assert [r[0] for r in rows] == ["all", "1", "2"]
    assert rows[0][header.index("pass@1")] == f"{result.pass_at_k[1]:.3f}"
    assert result.format_table().splitlines()[0].split() == [*header[:-1], "mean", "len"]


def test_custom_verifier_scores_samples_only(setup):
    model, tok, prompts = setup
    always = evaluate_policy(model, tok, prompts[:10], lambda text, answer: 1.0, **SETTINGS)
    assert always.pass_at_k == {1: 1.0, 4: 1.0, 8: 1.0}
    assert always.greedy_accuracy == evaluate_greedy(model, tok, prompts[:10], MAX_NEW)
    with pytest.raises(KeyError, match="verifier: no entry for task 'arithmetic'"):
        evaluate_policy(model, tok, prompts[:2], {"math": exact_integer}, **SETTINGS)


def test_greedy_only(setup):
    model, tok, prompts = setup
    r = evaluate_policy(model, tok, prompts, n_samples=0, ks=(), max_new_tokens=MAX_NEW)
    assert r.pass_at_k == {} and r.prompts == [] and r.mean_response_length is None
    assert r.greedy_accuracy == evaluate_greedy(model, tok, prompts, MAX_NEW)
    assert "eval/pass@1" not in r.metrics()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ks": (1, 16)}, r"^ks must lie in 1\.\.n_samples=8"),
        ({"ks": (0,)}, r"^ks must lie"),
        ({"n_samples": -1}, r"^n_samples must be >= 0"),
        ({"n_samples": 0}, r"^ks must be empty"),
        ({"temperature": 0.0}, r"^temperature must be > 0"),
        ({"max_new_tokens": 0}, r"^max_new_tokens must be >= 1"),
        ({"seed": -1}, r"^seed must be >= 0"),
        ({"batch_size": 0}, r"^batch_size must be >= 1"),
        ({"top_p": 0.0}, r"^top_p must be in"),
    ],
)
def test_bad_settings_name_the_argument(setup, overrides, message):
    model, tok, prompts = setup
    with pytest.raises(ValueError, match=message):
        evaluate_policy(model, tok, prompts[:2], **{**SETTINGS, **overrides})
    with pytest.raises(ValueError, match=r"^prompts is empty"):
        evaluate_policy(model, tok, [], **SETTINGS)


def test_mixed_task_heldout_reports_every_difficulty():
    task = MixedTask(seed=0)
    tok = CharTokenizer(ALPHABET)
    model = build_policy(PolicySpec(n_layer=1, n_embd=32, n_head=2, n_positions=32), tok, seed=1)
    prompts = task.heldout(16)
    r = evaluate_policy(
        model,
        tok,
        prompts,
        n_samples=2,
        ks=(1, 2),
        max_new_tokens=task.max_answer_len + 1,
        batch_size=8,
    )
    assert set(r.by_difficulty) == set(task.levels)
    assert sum(g.n_prompts for g in r.by_difficulty.values()) == 16
    for g in [r.overall, *r.by_difficulty.values()]:
        assert 0.0 <= g.greedy_accuracy <= 1.0
        assert 0.0 <= g.pass_at_k[1] <= g.pass_at_k[2] <= 1.0
        assert 1.0 <= g.mean_response_length <= task.max_answer_len + 1

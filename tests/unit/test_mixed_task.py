"""The mixed-operation task: answers, split, difficulty balance, lengths, demonstrations."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.policy.tokenizer import ARITHMETIC_ALPHABET, CharTokenizer
from services.tasks.mixed import (
    ALPHABET,
    LEVELS,
    Level,
    MixedPrompt,
    MixedTask,
    difficulty_from_id,
    evaluate_expression,
)
from services.tasks.verify import VERIFIERS


@pytest.fixture(scope="module")
def task() -> MixedTask:
    return MixedTask(seed=0)


@pytest.fixture(scope="module")
def heldout(task) -> list[MixedPrompt]:
    return task.heldout(800)


@pytest.fixture(scope="module")
def train(task) -> list[MixedPrompt]:
    return task.train_prompts(8000, np.random.default_rng(3))


def _shape_of(text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Operand lengths and operators of a prompt text, read back from the string."""
    expr = text[:-1]
    return tuple(len(x) for x in re.split(r"[-+*]", expr)), tuple(re.findall(r"[-+*]", expr))


def test_answers_are_the_python_value_of_the_expression(heldout, train):
    for p in heldout + train[:3000]:
        assert p.text.endswith("=") and p.text.count("=") == 1
        assert int(p.answer) == eval(p.text[:-1])  # Python's own precedence rules
        assert p.answer == str(int(p.answer))  # canonical: no padding, no "+"
        assert VERIFIERS[p.task](p.answer, p.answer) == 1.0
        assert VERIFIERS[p.task](str(int(p.answer) + 1), p.answer) == 0.0


def test_prompts_have_the_shape_of_their_difficulty(heldout, train):
    for p in heldout + train[:3000]:
        level = LEVELS[p.difficulty]
        lengths, ops = _shape_of(p.text)
        assert lengths == level.operand_digits
        assert all(o in allowed for o, allowed in zip(ops, level.ops, strict=True))
        assert p.prompt_id == f"mix{p.difficulty}:{p.text[:-1]}"
        assert difficulty_from_id(p.prompt_id) == p.difficulty
    assert difficulty_from_id("add3:001+002") is None


def test_lengths_fit_a_small_policy(task, heldout, train):
    assert task.max_prompt_len <= 16
    assert task.max_answer_len <= 6
    for p in heldout + train:
        assert len(p.text) <= LEVELS[p.difficulty].max_prompt_len <= task.max_prompt_len
        assert len(p.answer) <= LEVELS[p.difficulty].max_answer_len <= task.max_answer_len


def test_value_bounds_are_exact_on_enumerable_levels():
    for lv in (1, 3, 6):
        level = LEVELS[lv]
        values = [evaluate_expression(level.text(code)) for code in range(level.size)]
        assert (min(values), max(values)) == level.value_bounds(), lv
        assert len({level.text(code) for code in range(level.size)}) == level.size  # bijective code


def test_tokenizer_alphabet_covers_the_task_and_keeps_addition_ids(heldout, train):
    assert ALPHABET.startswith(ARITHMETIC_ALPHABET)
    tok = CharTokenizer(ALPHABET)
    assert set("".join(p.text + p.answer for p in heldout + train)) <= set(ALPHABET)
    p = heldout[0]
    assert tok.decode(tok.encode(p.text)) == p.text
    assert CharTokenizer().encode("12+3=") == tok.encode("12+3=")


def test_determinism(task, heldout):
    assert MixedTask(seed=0).heldout(800) == heldout
    a = task.train_prompts(200, np.random.default_rng(7))
    assert a == MixedTask(seed=5).train_prompts(200, np.random.default_rng(7))
    assert a != task.train_prompts(200, np.random.default_rng(8))
    assert MixedTask(seed=4).train_prompts(50) == MixedTask(seed=4).train_prompts(50)


def test_heldout_prefix_and_seed(task, heldout):
    assert task.heldout(37) == heldout[:37]
    assert MixedTask(seed=0).heldout(1200)[:800] == heldout
    other = MixedTask(seed=1).heldout(800)
    assert other != heldout  # seed picks which held-out expressions...
    for p in other:  # ...but never moves the split itself
        code_ok = task.is_heldout(p.difficulty, _code_of(p))
        assert bool(code_ok)


def _code_of(p: MixedPrompt) -> int:
    """Invert Level.text for a prompt (search by mixed-radix digits)."""
    level = LEVELS[p.difficulty]
    expr = p.text[:-1]
    operands = [int(x) for x in re.split(r"[-+*]", expr)]
    ops = re.findall(r"[-+*]", expr)
    digits = [
        x - (0 if d == 1 else 10 ** (d - 1))
        for x, d in zip(operands, level.operand_digits, strict=True)
    ]
    digits += [allowed.index(o) for o, allowed in zip(ops, level.ops, strict=True)]
    code, scale = 0, 1
    for digit, radix in zip(digits, level.radices, strict=True):
        code += digit * scale
        scale *= radix
    assert level.text(code) == expr
    return code


def test_heldout_is_disjoint_from_training(task, heldout, train):
    held_ids = {p.prompt_id for p in heldout}
    assert len(held_ids) == len(heldout)  # no duplicates
    assert not held_ids & {p.prompt_id for p in train}
    assert all(task.is_heldout(p.difficulty, _code_of(p)) for p in heldout)
    assert not any(task.is_heldout(p.difficulty, _code_of(p)) for p in train[:2000])


def test_heldout_fraction_is_about_one_in_twenty():
    level = LEVELS[2]
    frac = float(np.mean(MixedTask().is_heldout(2, np.arange(level.size, dtype=np.uint64))))
    assert frac == pytest.approx(1 / 20, rel=0.02)


def test_difficulty_distribution(task, heldout, train):
    assert Counter(p.difficulty for p in heldout) == {lv: 100 for lv in LEVELS}
    # Round robin: the first len(levels) prompts cover every level once.
    assert [p.difficulty for p in heldout[: len(LEVELS)]] == sorted(LEVELS)
    counts = Counter(p.difficulty for p in train)
    expected, sd = 8000 / 8, (8000 * (1 / 8) * (7 / 8)) ** 0.5
    for lv in LEVELS:
        assert abs(counts[lv] - expected) < 5 * sd, (lv, counts[lv])


def test_level_subset(train):
    sub = MixedTask(levels=[1, 3])
    prompts = sub.train_prompts(300, 0) + sub.heldout(100)
    assert {p.difficulty for p in prompts} == {1, 3}
    assert sub.max_answer_len == 4 and sub.max_prompt_len == 6
    with pytest.raises(ValueError, match="^levels must be distinct keys"):
        MixedTask(levels=[1, 99])
    with pytest.raises(ValueError, match="^levels must be distinct keys"):
        MixedTask(levels=[1, 1])
    with pytest.raises(ValueError, match="^levels must name"):
        MixedTask(levels=[])


def test_small_levels_run_out_instead_of_repeating():
    sub = MixedTask(levels=[1])  # 8100 expressions, ~1/20 held out
    pool = sub.heldout(10_000)
    assert 300 < len(pool) < 520
    assert len({p.prompt_id for p in pool}) == len(pool)


def test_demonstrations_are_wrong_at_the_requested_fraction(heldout):
    rng = np.random.default_rng(0)
    draws, frac = 20_000, 0.3
    prompts = [heldout[i % len(heldout)] for i in range(draws)]
    targets = [MixedTask.demonstration(p, frac, rng) for p in prompts]
    wrong = [t != p.answer for p, t in zip(prompts, targets, strict=True)]
    sd = (frac * (1 - frac) / draws) ** 0.5
    assert abs(np.mean(wrong) - frac) < 4 * sd
    # The error is always the same competing hypothesis: answer + 1.
    assert all(
        int(t) == int(p.answer) + 1 for p, t, w in zip(prompts, targets, wrong, strict=True) if w
    )
    assert all(MixedTask.demonstration(p, 0.0, rng) == p.answer for p in heldout)
    assert all(MixedTask.demonstration(p, 1.0, rng) == str(int(p.answer) + 1) for p in heldout)
    with pytest.raises(ValueError, match="^wrong_fraction"):
        MixedTask.demonstration(heldout[0], 1.5, rng)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 9999), min_size=1, max_size=5),
    st.lists(st.sampled_from("+-*"), min_size=4, max_size=4),
)
def test_evaluate_expression_matches_python(operands, ops):
    text = str(operands[0]) + "".join(o + str(x) for o, x in zip(ops, operands[1:], strict=False))
    assert evaluate_expression(text) == eval(text)


def test_evaluate_expression_and_level_reject_bad_input():
    for bad in ("", "1+", "-1+2", "1+2=", "1/2", "1 + 2"):
        with pytest.raises(ValueError, match="^text is not"):
            evaluate_expression(bad)
    with pytest.raises(ValueError, match="^ops must have one entry"):
        Level((2, 2), ())
    with pytest.raises(ValueError, match="^each ops entry"):
        Level((2, 2), ("/",))
    with pytest.raises(ValueError, match="^operand_digits"):
        Level((5, 2), ("+",))
    with pytest.raises(ValueError, match="^code must be in"):
        LEVELS[1].decode(LEVELS[1].size)
    with pytest.raises(ValueError, match="^n must be >= 0"):
        MixedTask().heldout(-1)

"""pass@k against brute-force enumeration, maj@k on hand-made cases, answer extraction."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.evaluation import (
    boxed_answer,
    extractor_for,
    integer_answer,
    maj_at_k,
    majority_vote,
    mean_maj_at_k,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_per_prompt,
)
from services.tasks.verify import exact_integer

# --- pass@k ---------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for s in subsets if any(i < c for i in s))
    return Fraction(hits, len(subsets))


def test_pass_at_k_equals_enumeration_for_every_small_case():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(
                    float(brute_force_pass_at_k(n, c, k)), abs=1e-12
                ), (n, c, k)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pass_at_k_matches_enumeration_hypothesis(data):
    n = data.draw(st.integers(1, 13), label="n")
    c = data.draw(st.integers(0, n), label="c")
    k = data.draw(st.integers(1, n), label="k")
    expected = float(brute_force_pass_at_k(n, c, k))
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k_per_prompt(n, [c], k)[0] == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_special_values():
    assert pass_at_k(16, 0, 8) == 0.0
    assert pass_at_k(16, 16, 8) == 1.0
    assert pass_at_k(16, 9, 8) == 1.0  # 7 wrong < k: every 8-subset holds a correct one
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    assert pass_at_k(16, 3, 8) == pytest.approx(1 - math.comb(13, 8) / math.comb(16, 8))


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 1e600 overflows a float; the product form must still be exact to ~1e-12.
    n, c, k = 2000, 3, 1000
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    got = pass_at_k(n, c, k)
    assert math.isfinite(got)
    assert got == pytest.approx(float(exact), rel=1e-12)
    vec = pass_at_k_per_prompt(n, np.array([c]), k)
    assert vec[0] == pytest.approx(float(exact), rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 40), st.data())
def test_pass_at_k_is_monotone_in_k_and_c(n, data):
    c = data.draw(st.integers(0, n - 1))
    k = data.draw(st.integers(1, n - 1))
    assert pass_at_k(n, c, k) <= pass_at_k(n, c, k + 1) + 1e-12
    assert pass_at_k(n, c, k) <= pass_at_k(n, c + 1, k) + 1e-12


def test_vectorised_form_matches_scalar_for_lists_numpy_and_torch():
    counts = [0, 1, 5, 9, 15, 16]
    expected = [pass_at_k(16, c, 4) for c in counts]
    for values in (
        counts,
        np.array(counts),
        torch.tensor(counts),
        torch.tensor(counts, dtype=torch.float32),
    ):
        np.testing.assert_allclose(pass_at_k_per_prompt(16, values, 4), expected, atol=1e-12)
    assert mean_pass_at_k(16, counts, 4) == pytest.approx(np.mean(expected))
    # Per-prompt sample counts.
    np.testing.assert_allclose(
        pass_at_k_per_prompt([4, 8, 16], [1, 1, 1], 2),
        [pass_at_k(4, 1, 2), pass_at_k(8, 1, 2), pass_at_k(16, 1, 2)],
        atol=1e-12,
    )
    assert pass_at_k_per_prompt(16, [], 4).shape == (0,)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (8, 2, 9, r"^k must be in 1\.\.n=8"),
        (8, 2, 0, r"^k must"),
        (8, 9, 2, r"^c must be in 0\.\.n=8"),
        (8, -1, 2, r"^c must"),
        (0, 0, 1, r"^n must be >= 1"),
        (-3, 0, 1, r"^n must"),
        (8.0, 2, 1, r"^n must be an integer"),
        (8, 2, True, r"^k must be an integer"),
    ],
)
def test_pass_at_k_rejects_bad_arguments_naming_them(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_vectorised_form_rejects_bad_arguments_naming_them():
    with pytest.raises(ValueError, match=r"^k must"):
        pass_at_k_per_prompt(4, [1, 2], 5)
    with pytest.raises(ValueError, match=r"^k must"):
        pass_at_k_per_prompt([4, 2], [1, 1], 3)  # k above the smallest n
    with pytest.raises(ValueError, match=r"^c must"):
        pass_at_k_per_prompt(4, [1, 5], 2)
    with pytest.raises(ValueError, match=r"^c must"):
        pass_at_k_per_prompt(4, [-1, 2], 2)
    with pytest.raises(ValueError, match=r"^c must be 1-D"):
        pass_at_k_per_prompt(4, [[1, 2]], 2)
    with pytest.raises(ValueError, match=r"^c must hold whole numbers"):
        pass_at_k_per_prompt(4, [1.5], 2)
    with pytest.raises(ValueError, match=r"^n has shape"):
        pass_at_k_per_prompt([4, 4, 4], [1, 2], 2)
    with pytest.raises(ValueError, match=r"^c is empty"):
        mean_pass_at_k(4, [], 2)


# --- maj@k ----------------------------------------------------------------------------------


def test_majority_vote_plurality_ties_and_unparsed():
    assert majority_vote(["7", "8", "7"]) == 0
    assert majority_vote(["8", "7", "7"]) == 1  # index of the winner's first occurrence
    assert majority_vote(["8", "7"]) == 0  # tie: first seen wins
    assert majority_vote(["7", "8", "8", "7"]) == 0  # 2-2 tie: "7" was seen first
    assert majority_vote(["5", "8", "8", "7", "7"]) == 1  # "5" first but not at the top count
    assert majority_vote([None, None, None, "5"]) == 3  # None never wins while a parse exists
    assert majority_vote([None, "5", None, "6", None]) == 1
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_maj_at_k_hand_made_cases():
    answers = ["8", "7", "7", "8", "8"]
    correct = [False, True, True, False, False]
    assert maj_at_k(answers, correct, 1) == 0.0  # only "8" votes
    assert maj_at_k(answers, correct, 2) == 0.0  # 1-1 tie, "8" seen first
    assert maj_at_k(answers, correct, 3) == 1.0  # "7" leads 2-1
    assert maj_at_k(answers, correct, 4) == 0.0  # 2-2 tie, "8" seen first
    assert maj_at_k(answers, correct, 5) == 0.0  # "8" leads 3-2
    # Unparsed samples are never the majority, and can never be right.
    assert maj_at_k([None, None, "3"], [False, False, True], 3) == 1.0
    assert maj_at_k([None, None, "4"], [False, False, False], 3) == 0.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    # Correctness is the verifier's verdict on the winning sample, not a string comparison.
    assert maj_at_k(["x", "y"], [True, False], 2) == 1.0
    assert (
        mean_maj_at_k(
            [["1", "2", "2"], ["3", "3", "4"]], [[True, False, False], [True, True, False]], 3
        )
        == 0.5
    )


def test_maj_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"^k must be in 1\.\.3"):
        maj_at_k(["1", "2", "3"], [True, False, False], 4)
    with pytest.raises(ValueError, match=r"^k must"):
        maj_at_k(["1"], [True], 0)
    with pytest.raises(ValueError, match=r"^correct has 1 entries"):
        maj_at_k(["1", "2"], [True], 1)
    with pytest.raises(ValueError, match=r"^answers is empty"):
        mean_maj_at_k([], [], 1)
    with pytest.raises(ValueError, match=r"^correct has 1 prompts"):
        mean_maj_at_k([["1"], ["2"]], [[True]], 1)


# --- answer extraction ----------------------------------------------------------------------


def test_integer_answer_canonical_form():
    assert integer_answer("007") == "7"
    assert integer_answer(" -12 ") == "-12"
    assert integer_answer("+5") == "5"
    assert integer_answer("-0") == "0"
    for bad in ("", "  ", "1 2", "3a", "1.0", "--1", "=4"):
        assert integer_answer(bad) is None, bad


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*= ", max_size=6), st.integers(-999, 999))
def test_integer_answer_agrees_with_the_exact_integer_verifier(text, reference):
    # Equal keys must mean equal verdicts, or maj@k would merge right and wrong answers.
    key = integer_answer(text)
    verdict = exact_integer(text, str(reference))
    assert verdict == (1.0 if key == str(reference) else 0.0)


def test_boxed_answer_and_registry():
    assert boxed_answer(r"so \boxed{ \frac{1}{2} }") == r"\frac{1}{2}"
    assert boxed_answer(r"\boxed{1} then \boxed{2}") == "2"
    assert boxed_answer("no box") is None
    assert boxed_answer(r"\boxed{ }") is None
    assert extractor_for("arithmetic") is integer_answer
    with pytest.raises(KeyError, match="no answer extractor for task 'nope'"):
        extractor_for("nope")

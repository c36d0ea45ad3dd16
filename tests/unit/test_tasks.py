"""Tasks and verifiers: arithmetic split and demonstrations, JSONL loading, verifier guards."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from services.tasks import (
    VERIFIERS,
    ArithmeticTask,
    Prompt,
    SafeVerifier,
    exact_integer,
    load_jsonl,
)
from services.tasks.jsonl import extract_answer, last_boxed
from services.tasks.verify import math_answer

# --- arithmetic ---------------------------------------------------------------------------


def test_prompt_format_and_answer():
    task = ArithmeticTask(digits=3)
    p = task.make_prompt(7, 995)
    assert p == Prompt(prompt_id="add3:007+995", text="007+995=", answer="1002", task="arithmetic")
    with pytest.raises(AttributeError):
        p.answer = "0"  # frozen
    for q in task.train_prompts(200, np.random.default_rng(0)):
        assert len(q.text) == 8 and q.text[3] == "+" and q.text.endswith("=")
        a, b = q.text[:-1].split("+")
        assert q.answer == str(int(a) + int(b))  # plain decimal, no padding


def test_heldout_is_fixed_and_disjoint_from_training():
    task = ArithmeticTask(digits=3, seed=0)
    held = task.heldout(500)
    assert len(held) == 500 and len({p.text for p in held}) == 500
    assert [p.text for p in held] == [p.text for p in ArithmeticTask(3, 0).heldout(500)]
    assert [p.text for p in task.heldout(100)] == [p.text for p in held[:100]]
    held_texts = {p.text for p in held}
    train = task.train_prompts(50_000, np.random.default_rng(1))
    assert not held_texts & {p.text for p in train}
    # Stronger: no training draw is anywhere in the held-out pool, and the pool is ~1/20.
    a = np.array([int(p.text[:3]) for p in train])
    b = np.array([int(p.text[4:7]) for p in train])
    assert not task.is_heldout(a, b).any()
    grid_a, grid_b = np.divmod(np.arange(1_000_000), 1000)
    frac = task.is_heldout(grid_a, grid_b).mean()
    assert 0.045 < frac < 0.055
    # The split does not depend on the seed, so every run agrees on what was never trained on.
    other = ArithmeticTask(digits=3, seed=7)
    assert all(other.is_heldout(int(p.text[:3]), int(p.text[4:7])) for p in held)
    assert {p.text for p in other.heldout(500)} != held_texts


def test_train_prompts_deterministic_given_seed():
    task = ArithmeticTask()
    assert task.train_prompts(50, 3) == task.train_prompts(50, 3)
    assert task.train_prompts(50, 3) != task.train_prompts(50, 4)


def test_small_digit_task_heldout_capped_by_pool():
    task = ArithmeticTask(digits=1)
    held = task.heldout(500)
    assert 0 < len(held) < 100  # only the pool exists
    assert all(len(p.text) == 4 for p in held)


def test_demonstrations_wrong_at_requested_rate_and_off_by_one():
    task = ArithmeticTask()
    rng = np.random.default_rng(0)
    prompts = task.train_prompts(4000, rng)
    demos = [task.demonstration(p, 0.55, rng) for p in prompts]
    diffs = np.array([int(d) - int(p.answer) for d, p in zip(demos, prompts, strict=True)])
    assert set(np.unique(diffs)) <= {0, 1}
    assert abs(diffs.mean() - 0.55) < 0.03
    assert all(task.demonstration(p, 0.0, rng) == p.answer for p in prompts[:200])
    assert all(int(task.demonstration(p, 1.0, rng)) == int(p.answer) + 1 for p in prompts[:200])
    with pytest.raises(ValueError):
        task.demonstration(prompts[0], 1.5, rng)


# --- JSONL --------------------------------------------------------------------------------


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_gsm8k_math_and_plain(tmp_path):
    f = _write(
        tmp_path / "mix.jsonl",
        [
            json.dumps({"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}),
            "",
            json.dumps({"question": "Big?", "answer": "so ... #### 1,250"}),
            json.dumps(
                {"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "id": "m-1"}
            ),
            "   ",
            json.dumps({"question": "Name?", "answer": "  x^2 + 1 "}),
        ],
    )
    ps = load_jsonl(f)
    assert [p.answer for p in ps] == ["7", "1250", "\\frac{1}{2}", "x^2 + 1"]
    assert [p.prompt_id for p in ps] == ["mix-1", "mix-3", "m-1", "mix-6"]
    assert ps[0].text == "How many?" and all(p.task == "math" for p in ps)
    assert load_jsonl(f, task="arithmetic")[0].task == "arithmetic"


def test_boxed_extraction_matches_braces():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b+{c}}} end") == "\\frac{a}{b+{c}}"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_answer("#### 12 ") == "12"
    assert extract_answer("#### 1,2") == "1,2"  # not a grouped number: left as written


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"answer": "#### 3"}), "missing field"),
        (json.dumps({"question": "q"}), "missing field"),
        (json.dumps({"question": "q", "answer": "#### "}), "empty answer"),
        (json.dumps({"question": "q", "answer": "\\boxed{}"}), "empty answer"),
        (json.dumps({"question": "q", "answer": 3}), "must be a string"),
        (json.dumps(["q", "a"]), "expected a JSON object"),
        (json.dumps({"question": " ", "answer": "#### 1"}), "empty question"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "q", "answer": "#### 1"})
    f = _write(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        load_jsonl(f)


# --- verifiers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "answer", "reward"),
    [
        ("1002", "1002", 1.0),
        (" 1002\n", "1002", 1.0),
        ("01002", "1002", 1.0),
        ("1003", "1002", 0.0),
        ("10 02", "1002", 0.0),
        ("1002.0", "1002", 0.0),
        ("", "5", 0.0),
        ("+=", "5", 0.0),
        ("-3", "-3", 1.0),
        ("٣", "3", 0.0),  # non-ASCII digits are not accepted
    ],
)
def test_exact_integer(response, answer, reward):
    assert exact_integer(response, answer) == reward


def test_exact_integer_rejects_non_integer_reference():
    with pytest.raises(ValueError):
        exact_integer("1", "one")


def test_math_answer_equivalence():
    assert math_answer("The answer is \\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert math_answer("so $\\frac12$", "\\frac{1}{2}") == 1.0
    assert math_answer("#### 72 apples, i.e. 72", "72") == 1.0
    assert math_answer("\\boxed{73}", "72") == 0.0
    assert math_answer("no idea", "72") == 0.0
    assert VERIFIERS["math"] is math_answer and VERIFIERS["arithmetic"] is exact_integer


def test_safe_verifier_raising_counts_and_returns_zero():
    def boom(r, a):
        raise RuntimeError("bad verifier")

    sv = SafeVerifier(boom, timeout_s=1.0)
    assert sv("1", "1") == 0.0 and sv("2", "2") == 0.0
    assert (sv.errors, sv.timeouts, sv.calls) == (2, 0, 2)


def test_safe_verifier_bad_return_values_are_errors():
    sv = SafeVerifier(lambda r, a: float("nan"))
    assert sv("x", "y") == 0.0
    sv2 = SafeVerifier(lambda r, a: "high")
    assert sv2("x", "y") == 0.0
    assert sv.errors == 1 and sv2.errors == 1


def test_safe_verifier_hanging_returns_quickly():
    release = threading.Event()

    def hang(r, a):
        release.wait(30)
        return 1.0

    def hang_once(r, a):
        return hang(r, a) if r == "hang" else exact_integer(r, a)

    sv = SafeVerifier(hang_once, timeout_s=0.2)
    try:
        t0 = time.perf_counter()
        assert sv("hang", "1") == 0.0
        assert time.perf_counter() - t0 < 2.0
        assert (sv.errors, sv.timeouts) == (1, 1) and sv.abandoned == 1
        # The stuck worker is abandoned; the same guard scores the next calls on a fresh one.
        assert sv("7", "7") == 1.0 and sv("8", "7") == 0.0
        assert (sv.errors, sv.calls) == (1, 3)
    finally:
        release.set()
    # A healthy verifier through the same guard still scores.
    ok = SafeVerifier(exact_integer, timeout_s=2.0)
    assert ok("7", "7") == 1.0 and ok.errors == 0


def test_safe_verifier_reuses_one_worker_thread():
    sv = SafeVerifier(exact_integer, timeout_s=2.0)
    names = set()

    def probe(r, a):
        names.add(threading.current_thread().ident)
        return exact_integer(r, a)

    sv.fn = probe
    before = threading.active_count()
    assert sum(sv(str(i), str(i)) for i in range(200)) == 200.0
    assert len(names) == 1 and threading.active_count() <= before + 1


def test_safe_verifier_works_off_the_main_thread():
    # math-verify's own timeout uses signal.alarm, which raises off the main thread; ours must not.
    sv = SafeVerifier(math_answer, timeout_s=10.0)
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(sv("\\boxed{0.5}", "\\frac{1}{2}")))
    t.start()
    t.join(30)
    assert out == [1.0] and sv.errors == 0

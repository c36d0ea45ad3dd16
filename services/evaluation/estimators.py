"""Estimators for sampled evaluation: unbiased pass@k, majority vote (maj@k), lengths.

pass@k is the probability that at least one of k responses, drawn without replacement from
the n sampled for a prompt, is correct. With c correct among n its unbiased estimate is
``1 - C(n - c, k) / C(n, k)``. The binomials overflow floats for realistic n, so the ratio is
computed as the product ``prod_{j=0}^{k-1} (n - c - j) / (n - j)`` of k factors in [0, 1],
which never leaves [0, 1] and loses no precision to cancellation.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass; a True passed as n is a bug, not a count of 1.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_pass_args(n: int, c: int, k: int) -> None:
    """Validate ``(n, c, k)`` for :func:`pass_at_k`.

    Raises:
        ValueError: naming the argument, when one is not an integer, ``n < 1``, ``c`` is
            outside ``0..n`` or ``k`` outside ``1..n``.
    """
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1 (samples per prompt), got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in 0..n={n} (correct samples), got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n} (the estimator needs n >= k samples), got {k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``c`` correct among ``n`` samples.

    Returns ``1 - C(n - c, k) / C(n, k)``: exactly 1 when fewer than ``k`` samples are wrong
    (every k-subset holds a correct one), 0 when ``c == 0``, and ``c / n`` for ``k == 1``.

    Raises:
        ValueError: see :func:`check_pass_args`.
    """
    check_pass_args(n, c, k)
    wrong = n - c
    if wrong < k:
        return 1.0
    ratio = 1.0
    for j in range(k):
        ratio *= (wrong - j) / (n - j)
    return 1.0 - ratio


def _as_int_array(name: str, values: object) -> np.ndarray:
    """A 1-D int64 array from a list, numpy array or torch tensor (any device)."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per prompt), got shape {arr.shape}")
    whole = np.issubdtype(arr.dtype, np.integer) or bool(
        np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    )
    if arr.size and not whole:
        raise ValueError(f"{name} must hold whole numbers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def pass_at_k_per_prompt(n: int | object, c: object, k: int) -> np.ndarray:
    """Vectorised :func:`pass_at_k` over prompts.

    Args:
        n: Samples per prompt: one int for all, or an int array [B].
        c: Correct samples per prompt, int array [B] (list, numpy or torch).
        k: The k of pass@k, ``1 <= k <= min(n)``.

    Returns:
        float64 [B], each entry in [0, 1].

    Raises:
        ValueError: naming ``n``, ``c`` or ``k`` as in :func:`check_pass_args`.
    """
    c_arr = _as_int_array("c", c)
    n_arr = (
        np.full(c_arr.shape, _check_int("n", n), dtype=np.int64)
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool)
        else _as_int_array("n", n)
    )
    k = _check_int("k", k)
    if n_arr.shape != c_arr.shape:
        raise ValueError(f"n has shape {n_arr.shape} but c has shape {c_arr.shape}")
    if c_arr.size == 0:
        return np.zeros(0, dtype=np.float64)
    if n_arr.min() < 1:
        raise ValueError(f"n must be >= 1 (samples per prompt), got min {n_arr.min()}")
    if c_arr.min() < 0 or np.any(c_arr > n_arr):
        raise ValueError("c must be in 0..n for every prompt (correct samples)")
    if not 1 <= k <= n_arr.min():
        raise ValueError(f"k must be in 1..n={n_arr.min()} (the estimator needs n >= k), got {k}")
    j = np.arange(k, dtype=np.float64)  # [k]
    wrong = (n_arr - c_arr).astype(np.float64)[:, None]  # [B, 1]
    # A factor hits 0 exactly when fewer than k samples are wrong; clip keeps later factors
    # from turning negative and flipping the product's sign.
    factors = np.clip(wrong - j, 0.0, None) / (n_arr.astype(np.float64)[:, None] - j)  # [B, k]
    return 1.0 - np.prod(factors, axis=1)


def mean_pass_at_k(n: int | object, c: object, k: int) -> float:
    """Mean over prompts of :func:`pass_at_k_per_prompt` (the dataset's pass@k).

    Raises:
        ValueError: on an empty ``c`` or invalid arguments.
    """
    per = pass_at_k_per_prompt(n, c, k)
    if per.size == 0:
        raise ValueError("c is empty: no prompts to average over")
    return float(per.mean())


def majority_vote(answers: Sequence[Hashable | None]) -> int | None:
    """Index of the sample whose answer wins a plurality vote, or None if none was parsed.

    Rules, so the result never depends on hashing or sort order:
    - ``None`` (no answer could be parsed) never wins while any parsed answer exists;
    - among the most frequent parsed answers, the one seen first wins;
    - the index returned is that answer's first occurrence.
    """
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return None
    top = max(counts.values())
    # dicts keep insertion order, i.e. first-seen order: the first answer at the top count wins.
    return next(first[a] for a, cnt in counts.items() if cnt == top)


def maj_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool], k: int) -> float:
    """maj@k of one prompt: 1.0 if the majority answer of the first ``k`` samples is correct.

    Correctness is taken from the verifier's verdict on a sample carrying the winning answer
    (its first occurrence), so no answer is ever compared with the reference here: the
    caller's answer extraction must map equivalent responses to equal keys, and the
    verifier decides whether that key is right. No parsed answer among the k gives 0.0.

    Args:
        answers: Extracted answer per sample (None if unparsable), in sampling order.
        correct: The verifier's verdict per sample, same length as ``answers``.
        k: Samples voting, ``1 <= k <= len(answers)``.

    Raises:
        ValueError: naming ``k`` or ``correct`` on bad input.
    """
    k = _check_int("k", k)
    if len(correct) != len(answers):
        raise ValueError(f"correct has {len(correct)} entries but answers has {len(answers)}")
    if not 1 <= k <= len(answers):
        raise ValueError(f"k must be in 1..{len(answers)} (samples available), got {k}")
    winner = majority_vote(answers[:k])
    return 0.0 if winner is None else float(bool(correct[winner]))


def mean_maj_at_k(
    answers: Sequence[Sequence[Hashable | None]], correct: Sequence[Sequence[bool]], k: int
) -> float:
    """Mean over prompts of :func:`maj_at_k` (``answers[i]`` / ``correct[i]``: prompt i's samples).

    Raises:
        ValueError: on no prompts, mismatched lengths or a bad ``k``.
    """
    if len(answers) != len(correct):
        raise ValueError(f"correct has {len(correct)} prompts but answers has {len(answers)}")
    if not answers:
        raise ValueError("answers is empty: no prompts to average over")
    return float(np.mean([maj_at_k(a, c, k) for a, c in zip(answers, correct, strict=True)]))

"""Mixed arithmetic at graded difficulty: ``+``, ``-``, ``*``, operand lengths, multi-step.

A task with headroom for a 0.6M-parameter policy: the easy levels are learnt like the addition
task, the hard ones (two-digit products, four-term sums) stay well below perfect, so RL has
room to raise accuracy and per-difficulty accuracy shows where.

Every level is a fixed expression shape; its expressions are numbered ``0 .. size - 1`` by a
mixed-radix code over the operands and operator choices. A hash of (level, code) holds out
about 1/20 of every level once and for all, independently of ``seed`` (as in the addition task),
so warm start, RL and evaluation agree on which expressions were never trained on.

Prompts are the plain expression followed by ``=`` (no padding, at most 16 characters) and
the answer is its value under the usual precedence (``*`` before ``+``/``-``), possibly
negative, at most 5 characters. The text needs the characters ``0-9 + - * =``
(:data:`ALPHABET`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.tasks.arithmetic import ARITHMETIC_ALPHABET
from services.tasks.base import Prompt, as_generator, off_by_one_demonstration

TASK_NAME = "mixed"
# Prompts are scored by the integer verifier registered for the addition task.
VERIFIER_KEY = "arithmetic"
# The addition alphabet with "-" and "*" appended, so the ids of its 12 characters are unchanged.
ALPHABET = ARITHMETIC_ALPHABET + "-*"

HELDOUT_MODULUS = 20
# Levels up to this many expressions are enumerated for the held-out pool; larger ones are
# sampled (their pools are too big to run out).
_ENUMERATE_LIMIT = 1 << 23
_MASK64 = (1 << 64) - 1
# Draws per rejection-sampling round when building a sampled level's held-out list: a constant,
# so the list's order does not depend on how many prompts are asked for.
_HELDOUT_DRAW = 4096


@dataclass(frozen=True)
class Level:
    """One expression shape.

    Attributes:
        operand_digits: Digits of each operand, left to right. A 1-digit operand is 0-9; a
            d-digit one (d >= 2) is 10**(d-1) .. 10**d - 1, so its length is exactly d.
        ops: For each gap between operands, the operators allowed there: ``"*"``, or any
            of ``"+"``, ``"-"``, ``"+-"``.
    """

    operand_digits: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ops) != len(self.operand_digits) - 1:
            raise ValueError("ops must have one entry per gap between operands")
        if any(not 1 <= d <= 4 for d in self.operand_digits):
            raise ValueError("operand_digits must be in 1..4")
        if any(o not in ("*", "+", "-", "+-") for o in self.ops):
            raise ValueError("each ops entry must be '*', '+', '-' or '+-'")

    @property
    def radices(self) -> tuple[int, ...]:
        """Sizes of the code's digits: operand ranges, then operator choices."""
        return tuple(
            _operand_range(d)[1] - _operand_range(d)[0] + 1 for d in self.operand_digits
        ) + tuple(len(o) for o in self.ops)

    @property
    def size(self) -> int:
        """Number of distinct expressions."""
        return int(np.prod(self.radices, dtype=object))

    def decode(self, code: int) -> tuple[list[int], list[str]]:
        """The operands and operators of expression number ``code`` (``0 <= code < size``)."""
        if not 0 <= code < self.size:
            raise ValueError(f"code must be in 0..{self.size - 1}, got {code}")
        values: list[int] = []
        for r in self.radices:
            code, digit = divmod(code, r)
            values.append(digit)
        n = len(self.operand_digits)
        operands = [
            _operand_range(d)[0] + v for d, v in zip(self.operand_digits, values[:n], strict=True)
        ]
        ops = [choices[v] for choices, v in zip(self.ops, values[n:], strict=True)]
        return operands, ops

    def text(self, code: int) -> str:
        operands, ops = self.decode(code)
        parts = [str(operands[0])]
        for op, x in zip(ops, operands[1:], strict=True):
            parts += [op, str(x)]
        return "".join(parts)

    def value_bounds(self) -> tuple[int, int]:
        """Smallest and largest value any expression of this shape takes."""
        # Split into product terms at +/- gaps; a term's operands are >= 0, so its extremes are
        # the products of the operand extremes.
        terms: list[tuple[int, int]] = []
        signs: list[str] = ["+"]
        lo, hi = _operand_range(self.operand_digits[0])
        for op, d in zip(self.ops, self.operand_digits[1:], strict=True):
            a, b = _operand_range(d)
            if op == "*":
                lo, hi = lo * a, hi * b
            else:
                terms.append((lo, hi))
                signs.append(op)
                lo, hi = a, b
        terms.append((lo, hi))
        vmin = vmax = 0
        for sign, (lo, hi) in zip(signs, terms, strict=True):
            vmax += hi if "+" in sign else -lo
            vmin += -hi if "-" in sign else lo
        return vmin, vmax

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt text, ``=`` included."""
        return sum(self.operand_digits) + len(self.ops) + 1

    @property
    def max_answer_len(self) -> int:
        """Longest answer in characters (a minus sign counts)."""
        return max(len(str(v)) for v in self.value_bounds())


# Graded by what a small transformer finds hard: longer operands, carries across more digits,
# subtraction with negative results, products, then several operations with precedence.
LEVELS: dict[int, Level] = {
    1: Level((2, 2), ("+",)),  # 37+45
    2: Level((3, 3), ("+-",)),  # 512-873
    3: Level((1, 3), ("*",)),  # 7*845
    4: Level((2, 2, 2), ("+-", "+-")),  # 37+45-81
    5: Level((1, 2, 3), ("*", "+-")),  # 7*86-450
    6: Level((2, 2), ("*",)),  # 37*45
    7: Level((1, 2, 1, 2), ("*", "+-", "*")),  # 7*86-3*45
    8: Level((3, 3, 3, 3), ("+-", "+-", "+-")),  # 123+456-789+321
}


def _operand_range(digits: int) -> tuple[int, int]:
    return (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit integer finaliser (xor-shift-multiply rounds), vectorised, wrapping mod 2**64."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x * np.uint64(0xD6E8FEB86659FD93) + np.uint64(0x2545F4914F6CDD1D)
        x = (x ^ (x >> np.uint64(32))) * np.uint64(0xD6E8FEB86659FD93)
        x = (x ^ (x >> np.uint64(32))) * np.uint64(0xD6E8FEB86659FD93)
        x = x ^ (x >> np.uint64(32))
    return x


def _heldout_mask(level: int, codes: np.ndarray) -> np.ndarray:
    """Whether each code of ``level`` is held out (bool array, same shape)."""
    # Level in the low 4 bits: the largest level (~8e12 codes) leaves room below 2**64.
    key = codes.astype(np.uint64) * np.uint64(16) + np.uint64(level)
    return (_mix64(key) % np.uint64(HELDOUT_MODULUS)) == 0


def evaluate_expression(text: str) -> int:
    """Value of ``a op b op c ...`` (non-negative integers, ``+ - *``, ``*`` binding tighter).

    Raises:
        ValueError: on anything else (a trailing ``=`` is not accepted).
    """
    if not re.fullmatch(r"[0-9]+([-+*][0-9]+)*", text):
        raise ValueError(f"text is not a +-* expression of integers: {text!r}")
    total, sign = 0, 1
    for term in re.split(r"([-+])", text):
        if term in "+-":
            sign = 1 if term == "+" else -1
            continue
        product = 1
        for factor in term.split("*"):
            product *= int(factor)
        total += sign * product
    return total


@dataclass(frozen=True)
class MixedPrompt(Prompt):
    """A :class:`Prompt` that records its difficulty level (1 = easiest)."""

    difficulty: int = 0


_ID = re.compile(r"mix(\d+):")


def difficulty_from_id(prompt_id: str) -> int | None:
    """The level encoded in a mixed-task prompt id (``"mix3:7*845"`` -> 3), else None; for
    places where only the id travels (rollout records)."""
    m = _ID.match(prompt_id)
    return int(m.group(1)) if m else None


class MixedTask:
    """Mixed-operation arithmetic over the difficulty ``levels`` chosen (default all of
    :data:`LEVELS`); training draws a level uniformly, then an expression uniformly."""

    def __init__(self, levels: Sequence[int] | None = None, seed: int = 0) -> None:
        levels = sorted(LEVELS) if levels is None else list(levels)
        if not levels:
            raise ValueError("levels must name at least one level")
        unknown = [lv for lv in levels if lv not in LEVELS]
        if unknown or len(set(levels)) != len(levels):
            raise ValueError(
                f"levels must be distinct keys of LEVELS {sorted(LEVELS)}, got {levels}"
            )
        self.levels = sorted(levels)
        self.seed = seed
        self.name = TASK_NAME
        self._heldout_cache: dict[int, list[int]] = {}

    @property
    def max_answer_len(self) -> int:
        """Longest answer in characters over the chosen levels."""
        return max(LEVELS[lv].max_answer_len for lv in self.levels)

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt in characters over the chosen levels."""
        return max(LEVELS[lv].max_prompt_len for lv in self.levels)

    def is_heldout(self, level: int, code: np.ndarray | int) -> np.ndarray:
        """Whether expression ``code`` of ``level`` is in the held-out pool (vectorised)."""
        return _heldout_mask(level, np.asarray(code, dtype=np.uint64))

    def make_prompt(self, level: int, code: int) -> MixedPrompt:
        """The prompt for expression number ``code`` of ``level``."""
        expr = LEVELS[level].text(code)
        return MixedPrompt(
            prompt_id=f"mix{level}:{expr}",
            text=f"{expr}=",
            answer=str(evaluate_expression(expr)),
            task=VERIFIER_KEY,
            difficulty=level,
        )

    def train_prompts(
        self, n: int, rng: np.random.Generator | int | None = None
    ) -> list[MixedPrompt]:
        """Sample ``n`` training prompts (with replacement, never held out).

        Args:
            n: Number of prompts.
            rng: A numpy Generator (advanced in place), or a seed; ``None`` uses ``self.seed``.
        """
        rng = as_generator(rng, self.seed)
        out: list[MixedPrompt] = []
        for level in rng.choice(self.levels, size=n):
            size = LEVELS[int(level)].size
            while True:
                # Integers (not floats) so codes of the 8e12-expression level stay exact.
                code = int(rng.integers(0, size))
                if not self.is_heldout(int(level), code):
                    break
            out.append(self.make_prompt(int(level), code))
        return out

    def _heldout_codes(self, level: int, count: int) -> list[int]:
        """The first ``count`` codes (or all, if fewer) of ``level``'s fixed held-out order."""
        cached = self._heldout_cache.get(level)
        spec = LEVELS[level]
        rng_key = [self.seed, 0x4D1, level]
        if spec.size <= _ENUMERATE_LIMIT:
            if cached is None:
                codes = np.flatnonzero(
                    self.is_heldout(level, np.arange(spec.size, dtype=np.uint64))
                )
                cached = codes[np.random.default_rng(rng_key).permutation(codes.shape[0])].tolist()
                self._heldout_cache[level] = cached
            return cached[:count]
        # Sampled level: extend a deterministic stream of distinct held-out codes on demand.
        cached = cached if cached is not None else []
        if len(cached) < count:
            rng = np.random.default_rng(rng_key)
            seen: set[int] = set()
            cached = []
            while len(cached) < count:
                draws = rng.integers(0, spec.size, size=_HELDOUT_DRAW, dtype=np.int64)
                for code in draws[self.is_heldout(level, draws)].tolist():
                    if code not in seen:
                        seen.add(code)
                        cached.append(code)
            self._heldout_cache[level] = cached
        return cached[:count]

    def heldout(self, n: int = 500) -> list[MixedPrompt]:
        """A fixed set of held-out prompts, balanced over the levels (round robin in level
        order), never seen in training. Deterministic given (levels, seed); ``heldout(n)`` is
        a prefix of ``heldout(n + k)``. Returns fewer than ``n`` only if small levels run out.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        per_level = -(-n // len(self.levels))
        lists = {lv: self._heldout_codes(lv, per_level) for lv in self.levels}
        out: list[MixedPrompt] = []
        for i in range(per_level):
            for lv in self.levels:
                if i < len(lists[lv]) and len(out) < n:
                    out.append(self.make_prompt(lv, lists[lv][i]))
        return out

    # The same consistent error as the addition task: ``answer + 1`` at ``wrong_fraction``.
    demonstration = staticmethod(off_by_one_demonstration)

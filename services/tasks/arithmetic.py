"""Synthetic addition task ``aaa+bbb=`` with an exact integer answer.

The pair space (a, b) is split once, deterministically, by a hash of the pair: about 1/20 of
the pairs form the held-out pool, and training never samples from it. The split does not
depend on ``seed`` on purpose, so the warm start, every RL run and every evaluation agree on
which pairs were never trained on; ``seed`` only chooses which held-out pairs ``heldout``
returns.
"""

from __future__ import annotations

import numpy as np

from services.tasks.base import Prompt, as_generator, off_by_one_demonstration

TASK_NAME = "arithmetic"
# The characters of its prompts and answers: the built-in policy's character tokenizer's default.
ARITHMETIC_ALPHABET = "0123456789+="

# 1 in HELDOUT_MODULUS pairs is held out. 1/20 keeps the pool big enough for 500 held-out
# prompts down to 2-digit operands (10,000 pairs -> ~500) while costing training ~5% of pairs.
HELDOUT_MODULUS = 20
_SPLIT_SALT = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised; wraps mod 2**64 as intended."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + _SPLIT_SALT
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


class ArithmeticTask:
    """Addition of two zero-padded ``digits``-digit operands.

    Prompt text is ``f"{a:0{d}d}+{b:0{d}d}="`` (``2 * digits + 2`` characters), the answer the
    plain decimal sum (no padding), so a response is at most ``digits + 1`` digits plus EOS.
    """

    def __init__(self, digits: int = 3, seed: int = 0) -> None:
        if not 1 <= digits <= 9:
            raise ValueError(f"digits must be in 1..9, got {digits}")
        self.digits = digits
        self.seed = seed
        self.base = 10**digits
        self.name = TASK_NAME

    @property
    def max_answer_len(self) -> int:
        """Longest answer in characters (the sum can carry into one more digit)."""
        return self.digits + 1

    def is_heldout(self, a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        """Whether each pair (a, b) belongs to the held-out pool (vectorised, bool array)."""
        key = np.asarray(a, dtype=np.uint64) * np.uint64(self.base) + np.asarray(b, dtype=np.uint64)
        return (_splitmix64(key) % np.uint64(HELDOUT_MODULUS)) == 0

    def make_prompt(self, a: int, b: int) -> Prompt:
        """The prompt for one operand pair."""
        d = self.digits
        text = f"{a:0{d}d}+{b:0{d}d}="
        return Prompt(prompt_id=f"add{d}:{text[:-1]}", text=text, answer=str(a + b), task=TASK_NAME)

    def train_prompts(self, n: int, rng: np.random.Generator | int | None = None) -> list[Prompt]:
        """Sample ``n`` prompts uniformly from the training split (with replacement).

        Args:
            n: Number of prompts.
            rng: A numpy Generator (advanced in place), or a seed; ``None`` uses ``self.seed``.
        """
        rng = as_generator(rng, self.seed)
        out: list[Prompt] = []
        while len(out) < n:
            # Rejection sampling: ~5% of draws land in the held-out pool and are redrawn.
            m = n - len(out)
            a = rng.integers(0, self.base, size=m + m // 8 + 8)
            b = rng.integers(0, self.base, size=a.shape[0])
            keep = ~self.is_heldout(a, b)
            out.extend(
                self.make_prompt(int(x), int(y)) for x, y in zip(a[keep], b[keep], strict=True)
            )
        return out[:n]

    def heldout(self, n: int = 500) -> list[Prompt]:
        """A fixed set of ``min(n, pool size)`` held-out prompts, never seen in training.

        Deterministic given (digits, seed); for a given seed, ``heldout(n)`` is a prefix of
        ``heldout(n + k)``.
        """
        a, b = np.divmod(np.arange(self.base * self.base, dtype=np.int64), self.base)
        pool = np.flatnonzero(self.is_heldout(a, b))
        order = np.random.default_rng([self.seed, 0xA11]).permutation(pool.shape[0])
        chosen = pool[order[:n]]
        return [self.make_prompt(int(a[i]), int(b[i])) for i in chosen]

    # The answer, or with probability ``wrong_fraction`` the consistent error ``sum + 1``.
    demonstration = staticmethod(off_by_one_demonstration)

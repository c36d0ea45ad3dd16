"""The unit of work every task produces: one prompt with its reference answer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """One verifiable prompt.

    Attributes:
        prompt_id: Stable identifier (the same prompt gets the same id in every run).
        text: What the policy is conditioned on (no special tokens).
        answer: Reference answer, in the form the task's verifier expects.
        task: Key into ``services.tasks.verify.VERIFIERS`` naming the verifier to score with.
    """

    prompt_id: str
    text: str
    answer: str
    task: str


def as_generator(rng: np.random.Generator | int | None, default_seed: int) -> np.random.Generator:
    """``rng`` itself when it is a Generator (advanced in place by the caller), else a new one
    seeded with ``rng`` (or ``default_seed`` when None)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(default_seed if rng is None else rng)

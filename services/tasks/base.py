"""The unit of work every task produces: one prompt with its reference answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """One verifiable prompt.

    Attributes:
        prompt_id: Stable identifier (the same prompt gets the same id in every run).
        text: What the policy is conditioned on (no special tokens).
        answer: Reference answer, in the form the task's verifier expects.
        task: Key naming the verifier to score with: one of ``services.tasks.verify.VERIFIERS``,
            an import path, or a key the task's :class:`~services.tasks.source.TaskSource`
            registers (``reasoning_gym/<dataset>``, ``plugin/<source>``).
        source: Where the prompt came from, for per-source metrics (a reasoning-gym dataset
            name, a data file, a plug-in's tag); empty for the built-in tasks.
        metadata: Per-prompt data handed to a verifier that takes a third argument (the
            reasoning-gym entry's metadata, a data row's extra columns, a plug-in's metadata).
            It stays in the process that drew the prompt, next to the text it scores: rollout
            workers score before publishing, so it never goes on the wire. Not compared.
        messages: Chat messages (``{"role", "content"}`` dicts) the prompt is rendered from
            instead of ``text`` (a plug-in may yield them); None for a plain question.
    """

    prompt_id: str
    text: str
    answer: str
    task: str
    source: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    messages: tuple[Mapping[str, str], ...] | None = field(default=None, compare=False, hash=False)


def as_generator(rng: np.random.Generator | int | None, default_seed: int) -> np.random.Generator:
    """``rng`` itself when it is a Generator (advanced in place by the caller), else a new one
    seeded with ``rng`` (or ``default_seed`` when None)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(default_seed if rng is None else rng)


def off_by_one_demonstration(
    prompt: Prompt, wrong_fraction: float, rng: np.random.Generator
) -> str:
    """A supervised target for ``prompt`` of a built-in task (an integer answer): the answer, or
    with probability ``wrong_fraction`` the systematically wrong ``answer + 1`` (the imperfect
    warm start that gives RL a job).

    The error is always +1 rather than a random +-1 so it is one consistent competing hypothesis
    the policy learns, which RL then has to unlearn.
    """
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}")
    value = int(prompt.answer)
    if wrong_fraction > 0.0 and rng.random() < wrong_fraction:
        value += 1
    return str(value)

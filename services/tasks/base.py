"""The unit of work every task produces: one prompt with its reference answer."""

from __future__ import annotations

from dataclasses import dataclass


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

"""The held-out evaluation a run reports, from the sections of its config that say how.

Every run evaluates its policy on the task's held-out prompts: ``d3s train`` and the learner
between steps, the background evaluator (:mod:`services.evaluation.background`) on snapshots,
``d3s eval`` once. All of them go through :class:`HeldoutEvaluation`, so the numbers a run logs
and the numbers ``d3s eval`` prints for the same weights are the same numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from services.evaluation.answers import EXTRACTORS, AnswerExtractor
from services.evaluation.evaluate import evaluate_policy
from services.evaluation.results import EvalResult
from services.policy.tokenizer import encode_text
from services.rollout.config import RolloutConfig
from services.tasks.base import Prompt
from services.tasks.config import TaskConfig
from services.tasks.prompting import PromptFormat
from services.tasks.source import TaskSource
from services.tasks.verify import Verifier


class HeldoutSet(NamedTuple):
    """A task's held-out prompts as evaluation reads them."""

    prompts: list[Prompt]
    """Rendered as the rollouts render them (instruction, chat template), within the length
    limit."""
    verifiers: dict[str, Verifier]
    """The task's verifiers, by ``Prompt.task``."""
    left_out: int
    """Prompts left out for being over the length limit."""
    extractors: dict[str, AnswerExtractor]
    """Answer extractors by ``Prompt.task``: the registered ones and the task's own."""


def heldout_prompts(task: TaskConfig, max_prompt_tokens: int | None, tokenizer: Any) -> HeldoutSet:
    """The task's held-out prompts rendered as the rollouts render them, without those over
    ``max_prompt_tokens``, with the task's verifiers and answer extractors.

    Raises:
        ValueError: when no held-out prompt is within ``max_prompt_tokens``.
    """
    source = TaskSource.from_config(task)
    prompts = PromptFormat.from_task(task).apply(tokenizer, source.heldout())
    extractors = {**EXTRACTORS, **source.extractors}
    if max_prompt_tokens is None:
        return HeldoutSet(prompts, source.verifiers, 0, extractors)
    kept = [p for p in prompts if len(encode_text(tokenizer, p.text)) <= max_prompt_tokens]
    if not kept:
        raise ValueError(
            f"rollout.max_prompt_tokens: {max_prompt_tokens} is below every held-out prompt"
        )
    return HeldoutSet(kept, source.verifiers, len(prompts) - len(kept), extractors)


def evaluation_metrics(result: EvalResult) -> dict[str, float]:
    """The metric row of an :class:`EvalResult`: ``eval/*`` (greedy, pass@k, maj@k, mean length,
    per difficulty) and ``heldout_accuracy``, the greedy accuracy (pass@1 when greedy is off)."""
    row = result.metrics(prefix="eval/")
    greedy = result.greedy_accuracy
    row["heldout_accuracy"] = greedy if greedy is not None else result.pass_at_k.get(1, 0.0)
    return row


class HeldoutEvaluation:
    """Held-out evaluation of a policy as a run's config says; calling it gives the metric row
    (:func:`evaluation_metrics`) a run logs.

    The prompts are rendered once, here, and reused by every evaluation.

    Args:
        task: The task (its held-out prompts and verifiers).
        rollout: How the rollouts generate: prompts over ``max_prompt_tokens`` are left out,
            responses end after ``max_new_tokens``, and ``temperature`` and ``top_p`` apply
            unless ``settings`` sets its own.
        settings: The run config's ``eval`` section (a pydantic model: ``n_samples``, ``ks``,
            ``temperature``, ``top_p``, ``seed``, ``greedy``, ``batch_size``).
        tokenizer: The policy's tokenizer.

    Attributes:
        left_out: Held-out prompts left out for being over ``rollout.max_prompt_tokens``.

    Raises:
        ValueError: when no held-out prompt is within ``rollout.max_prompt_tokens``.
    """

    def __init__(
        self, task: TaskConfig, rollout: RolloutConfig, settings: Any, tokenizer: Any
    ) -> None:
        self.rollout, self.settings, self.tokenizer = rollout, settings, tokenizer
        self.prompts, self.verifiers, self.left_out, self.extractors = heldout_prompts(
            task, rollout.max_prompt_tokens, tokenizer
        )

    def run(self, model: torch.nn.Module, **changes: Any) -> EvalResult:
        """Evaluate ``model``; ``changes`` override fields of the settings (``n_samples``)."""
        e = self.settings.model_copy(update=changes)
        r = self.rollout
        return evaluate_policy(
            model,
            self.tokenizer,
            self.prompts,
            self.verifiers,
            n_samples=e.n_samples,
            ks=e.ks,
            temperature=e.temperature if e.temperature is not None else r.temperature,
            top_p=e.top_p if e.top_p is not None else r.top_p,
            max_new_tokens=r.max_new_tokens,
            seed=e.seed,
            greedy=e.greedy,
            batch_size=e.batch_size,
            extractors=self.extractors,
        )

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        return evaluation_metrics(self.run(model))

"""Held-out evaluation: greedy accuracy, unbiased pass@k, maj@k, response length, per difficulty."""

from services.evaluation.answers import EXTRACTORS, boxed_answer, extractor_for, integer_answer
from services.evaluation.estimators import (
    maj_at_k,
    majority_vote,
    mean_maj_at_k,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_per_prompt,
)
from services.evaluation.evaluate import evaluate_policy
from services.evaluation.heldout import HeldoutEvaluation, evaluation_metrics, heldout_prompts
from services.evaluation.results import EvalResult, GroupEval, PromptEval

__all__ = [
    "EXTRACTORS",
    "EvalResult",
    "GroupEval",
    "HeldoutEvaluation",
    "PromptEval",
    "boxed_answer",
    "evaluate_policy",
    "evaluation_metrics",
    "extractor_for",
    "heldout_prompts",
    "integer_answer",
    "maj_at_k",
    "majority_vote",
    "mean_maj_at_k",
    "mean_pass_at_k",
    "pass_at_k",
    "pass_at_k_per_prompt",
]

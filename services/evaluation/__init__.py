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
from services.evaluation.evaluate import EvalResult, GroupEval, PromptEval, evaluate_policy

__all__ = [
    "EXTRACTORS",
    "EvalResult",
    "GroupEval",
    "PromptEval",
    "boxed_answer",
    "evaluate_policy",
    "extractor_for",
    "integer_answer",
    "maj_at_k",
    "majority_vote",
    "mean_maj_at_k",
    "mean_pass_at_k",
    "pass_at_k",
    "pass_at_k_per_prompt",
]

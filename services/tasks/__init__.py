"""Tasks (prompt sources) and verifiers (reward functions)."""

from services.tasks.arithmetic import ArithmeticTask
from services.tasks.base import Prompt
from services.tasks.jsonl import load_jsonl
from services.tasks.verify import VERIFIERS, SafeVerifier, exact_integer, math_answer

__all__ = [
    "VERIFIERS",
    "ArithmeticTask",
    "Prompt",
    "SafeVerifier",
    "exact_integer",
    "load_jsonl",
    "math_answer",
]

"""Where prompts come from and how answers are scored, built from the run config's task section."""

from __future__ import annotations

import numpy as np

from services.tasks.arithmetic import ArithmeticTask
from services.tasks.base import Prompt
from services.tasks.config import ArithmeticTaskConfig, TaskConfig
from services.tasks.jsonl import load_jsonl
from services.tasks.verify import VERIFIERS, SafeVerifier


class TaskSource:
    """Training prompts (sampled with a seed), fixed held-out prompts, and safe verifiers."""

    def __init__(self, kind: str = "arithmetic", digits: int = 3, train_path=None, eval_path=None,
                 heldout_size: int = 500, verifier_timeout_s: float = 2.0) -> None:  # fmt: skip
        self.kind = kind
        self._arith = ArithmeticTask(digits=digits) if kind == "arithmetic" else None
        if kind == "jsonl":
            self._train = load_jsonl(train_path)
            self._heldout = load_jsonl(eval_path)[:heldout_size] if eval_path else self._train[:heldout_size]
        else:
            self._train = []
            self._heldout = self._arith.heldout(heldout_size)
        self.verifiers = {name: SafeVerifier(fn, verifier_timeout_s) for name, fn in VERIFIERS.items()}

    @classmethod
    def from_config(cls, task: TaskConfig) -> TaskSource:
        if isinstance(task, ArithmeticTaskConfig):
            return cls("arithmetic", digits=task.digits, heldout_size=task.heldout_size,
                       verifier_timeout_s=task.verifier_timeout_s)  # fmt: skip
        return cls("jsonl", train_path=task.train_path, eval_path=task.eval_path,
                   heldout_size=task.heldout_size, verifier_timeout_s=task.verifier_timeout_s)  # fmt: skip

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        if self._arith is not None:
            return self._arith.train_prompts(n, rng)
        idx = rng.integers(0, len(self._train), size=n)
        return [self._train[i] for i in idx]

    def heldout(self) -> list[Prompt]:
        return self._heldout

    def score(self, prompts: list[Prompt], texts: list[str], n: int) -> np.ndarray:
        """Rewards [B, n] for n responses per prompt (rows grouped by prompt)."""
        out = np.zeros((len(prompts), n), dtype=np.float32)
        for i, p in enumerate(prompts):
            verify = self.verifiers[p.task]
            for j in range(n):
                out[i, j] = verify(texts[i * n + j], p.answer)
        return out

    @property
    def verifier_errors(self) -> int:
        return sum(v.errors for v in self.verifiers.values())

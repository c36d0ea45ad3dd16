"""Where prompts come from and how answers are scored, built from the run config's task section."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from services.tasks.arithmetic import ARITHMETIC_ALPHABET, ArithmeticTask
from services.tasks.base import Prompt
from services.tasks.config import (
    ArithmeticTaskConfig,
    DatasetTaskConfig,
    JsonlTaskConfig,
    MixedTaskConfig,
    PythonTaskConfig,
    ReasoningGymTaskConfig,
    SyntheticTaskConfig,
    TaskConfig,
)
from services.tasks.jsonl import load_jsonl
from services.tasks.mixed import ALPHABET as MIXED_ALPHABET
from services.tasks.mixed import MixedTask
from services.tasks.verify import VERIFIERS, SafeVerifier, Verifier, resolve_verifier

SyntheticTask = ArithmeticTask | MixedTask


def synthetic_task(task: SyntheticTaskConfig | int, seed: int = 0) -> tuple[SyntheticTask, str]:
    """The built-in task a config names (an int: ``digits`` of the addition task) and the
    character alphabet its prompts and answers use (the char tokenizer's)."""
    if isinstance(task, int):
        return ArithmeticTask(digits=task, seed=seed), ARITHMETIC_ALPHABET
    if isinstance(task, ArithmeticTaskConfig):
        return ArithmeticTask(digits=task.digits, seed=seed), ARITHMETIC_ALPHABET
    if isinstance(task, MixedTaskConfig):
        return MixedTask(levels=task.levels, seed=seed), MIXED_ALPHABET
    raise ValueError(f"task: {type(task).__name__} is not a built-in task")


class TaskSource:
    """Training prompts (sampled with a seed), fixed held-out prompts, and safe verifiers.

    Built-in tasks (addition, mixed) and generated tasks (reasoning-gym, a Python plug-in:
    ``generator``) make prompts; JSONL and dataset tasks read them. Held-out prompts of the
    mixed task carry their ``difficulty``, those of the others their ``source``: evaluation
    reports accuracy per level and per source.

    Args:
        synthetic: A built-in task.
        train: Read training prompts (JSONL, data files).
        heldout: Read held-out prompts (None: the first training prompts).
        heldout_size: Held-out prompts kept.
        verifier_timeout_s: Time limit of every verifier call.
        generator: A task with ``train_prompts(n, rng)`` and ``heldout()``.
        scorers: Verifier keys the task's prompts name beyond the registered ones (a
            reasoning-gym dataset's scorer, a plug-in's), each guarded like them.
        extractors: Verifier key -> the answer a response states, for tasks whose answer has
            a marked place (reasoning-gym's ``answer_format``); evaluation votes on it and
            reports the share of samples that state one.
        kind: The task's type (for ``generator`` tasks).
    """

    def __init__(
        self,
        synthetic: SyntheticTask | None = None,
        train: list[Prompt] | None = None,
        heldout: list[Prompt] | None = None,
        heldout_size: int = 500,
        verifier_timeout_s: float = 2.0,
        *,
        generator: Any = None,
        scorers: Mapping[str, Verifier] | None = None,
        extractors: Mapping[str, Callable[[str], str | None]] | None = None,
        kind: str = "jsonl",
    ) -> None:
        self.extractors = dict(extractors or {})
        self._task = synthetic if synthetic is not None else generator
        self._train: list[Prompt] = []
        if synthetic is not None:
            self.kind = "mixed" if isinstance(synthetic, MixedTask) else "arithmetic"
            self._heldout = list(synthetic.heldout(heldout_size))
        elif generator is not None:
            self.kind = kind
            self._heldout = list(generator.heldout())[:heldout_size]
        else:
            if not train:
                raise ValueError("train: a JSONL task needs training prompts")
            self.kind = kind
            self._train = train
            self._heldout = (heldout or train)[:heldout_size]
        table = {**VERIFIERS, **(scorers or {})}
        self.verifiers = {name: SafeVerifier(fn, verifier_timeout_s) for name, fn in table.items()}
        # A task may name its verifier by import path: guard it like the registered ones.
        for key in {p.task for p in (*self._train, *self._heldout)} - set(self.verifiers):
            self.verifiers[key] = SafeVerifier(resolve_verifier(key), verifier_timeout_s)

    @classmethod
    def from_config(cls, task: TaskConfig) -> TaskSource:
        """The prompts and verifiers ``task`` describes.

        Raises:
            ValueError: naming the field or the row on data the config check could not see
                (a bad row, a plug-in whose items are malformed).
        """
        limits = {"heldout_size": task.heldout_size, "verifier_timeout_s": task.verifier_timeout_s}
        if isinstance(task, JsonlTaskConfig):
            train = load_jsonl(Path(task.train_path), task=task.verifier)
            heldout = None
            if task.eval_path:
                heldout = load_jsonl(Path(task.eval_path), task=task.verifier)
            return cls(None, train, heldout, **limits)
        if isinstance(task, DatasetTaskConfig):
            from services.tasks.data import load_task

            train, heldout = load_task(task)
            return cls(None, train, heldout, **limits, kind="dataset")
        if isinstance(task, ReasoningGymTaskConfig):
            from services.tasks.reasoning_gym import ReasoningGymTask

            rg = ReasoningGymTask(task)
            return cls(
                generator=rg,
                scorers=rg.scorers,
                extractors=rg.extractors,
                kind="reasoning_gym",
                **limits,
            )
        if isinstance(task, PythonTaskConfig):
            from services.tasks.plugin import PluginTask

            plugin = PluginTask(task)
            return cls(
                generator=plugin, scorers={plugin.key: plugin.scorer}, kind="python", **limits
            )
        synthetic, _ = synthetic_task(task)
        return cls(synthetic, **limits)

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        if self._task is not None:
            return list(self._task.train_prompts(n, rng))
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
                out[i, j] = verify(texts[i * n + j], p.answer, p.metadata)
        return out

    @property
    def verifier_errors(self) -> int:
        return sum(v.errors for v in self.verifiers.values())

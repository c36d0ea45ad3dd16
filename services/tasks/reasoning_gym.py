"""reasoning-gym's procedural datasets as a task: generated prompts, each scored by its own
dataset's ``score_answer``.

A reasoning-gym dataset generates entry ``i`` from ``Random(seed + i)``, so a dataset is a
function of its seed range. Training prompts come from seeds ``TRAIN_SEED + [0, pool)`` (a
fresh uniform index every draw), held-out prompts from ``HELDOUT_SEED + [0, n)``: the ranges
never meet. Small datasets can still generate the same question from two seeds, so training
also redraws any question that is in the held-out set: the two never share a question.

Each prompt keeps its entry's metadata (``Prompt.metadata``): the scorer rebuilds the entry
(question left empty; no scorer in the package reads it) and calls ``score_answer`` with the
answer the response states (:mod:`services.tasks.extract`), under the task's
:class:`~services.tasks.verify.SafeVerifier`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from services.tasks.base import Prompt
from services.tasks.extract import AnswerFormat, extract_final

TRAIN_SEED = 1 << 31
HELDOUT_SEED = 1 << 30
# Held-out generation gives up on finding distinct questions after this many tries per prompt.
_HELDOUT_TRIES = 4
# Training gives up after this many draws per prompt that all landed on held-out questions.
_TRAIN_TRIES = 50
KEY_PREFIX = "reasoning_gym/"


def _package():
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise ValueError(
            "type reasoning_gym needs the reasoning-gym package: pip install 'd3s-rl[reasoning-gym]'"
        ) from None
    return reasoning_gym, DATASETS


def _config_kwargs(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = dict(config)
    if name == "composite" and isinstance(kwargs.get("datasets"), list):
        from reasoning_gym.composite import DatasetSpec

        kwargs["datasets"] = [
            DatasetSpec(**d) if isinstance(d, Mapping) else d for d in kwargs["datasets"]
        ]
    return kwargs


def check_entry(name: str, config: Mapping[str, Any]) -> None:
    """Fail as building the dataset would, without generating anything.

    Raises:
        ValueError: naming ``name`` (an unknown dataset, with the close names) or ``config``
            (a field the dataset's config does not have, or a value its ``validate`` refuses).
    """
    _, datasets = _package()
    if name not in datasets:
        import difflib

        close = difflib.get_close_matches(name, list(datasets), n=3)
        hint = f"; did you mean {close}?" if close else f" ({len(datasets)} are registered)"
        raise ValueError(f"name: {name!r} is not a reasoning-gym dataset{hint}")
    for reserved in ("seed", "size"):
        if reserved in config:
            raise ValueError(f"config.{reserved}: set by the task (train/held-out seeds), drop it")
    _, config_cls = datasets[name]
    try:
        cfg = config_cls(**_config_kwargs(name, config), seed=0, size=1)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise ValueError(f"config: {name} refuses {dict(config)}: {exc}") from None


def build_dataset(name: str, config: Mapping[str, Any], seed: int, size: int) -> Any:
    """The reasoning-gym dataset ``name`` with ``config``, ``seed`` and ``size``."""
    reasoning_gym, _ = _package()
    return reasoning_gym.create_dataset(name, **_config_kwargs(name, config), seed=seed, size=size)


class ReasoningGymScorer:
    """``score_answer`` of one dataset on the answer a response states; a verifier that takes
    the prompt's metadata (see :func:`services.tasks.verify.score_response`)."""

    takes_metadata = True

    def __init__(self, dataset: Any, answer_format: AnswerFormat) -> None:
        self.dataset = dataset
        self.answer_format = answer_format
        self.__name__ = f"{type(dataset).__name__}.score_answer"

    def stated(self, response: str) -> str | None:
        """The answer ``response`` states under the task's ``answer_format``, or None: what
        evaluation votes on (maj@k) and counts as formatted."""
        return extract_final(response, self.answer_format)

    def __call__(self, response: str, answer: str, metadata: Mapping[str, Any]) -> float:
        stated = self.stated(response)
        if stated is None:
            return 0.0
        # An open-ended dataset (propositional_logic) has no reference: None, kept as "".
        entry = {"question": "", "answer": answer or None, "metadata": dict(metadata)}
        return float(self.dataset.score_answer(stated, entry))


class _Source:
    """One entry of the task: its training and held-out datasets and its scorer."""

    def __init__(self, entry: Any, answer_format: AnswerFormat, heldout_n: int) -> None:
        self.name, self.source, self.pool = entry.name, entry.source, entry.pool
        self.key = KEY_PREFIX + self.source
        self.train = build_dataset(entry.name, entry.config, TRAIN_SEED, entry.pool)
        tries = max(heldout_n * _HELDOUT_TRIES, 1)
        self.held = build_dataset(entry.name, entry.config, HELDOUT_SEED, tries)
        self.scorer = ReasoningGymScorer(self.train, answer_format)
        self.heldout: list[Prompt] = []
        seen: set[str] = set()
        for i in range(tries):
            if len(self.heldout) >= heldout_n:
                break
            e = self.held[i]
            if e["question"] not in seen:
                seen.add(e["question"])
                self.heldout.append(self.prompt(e, f"h{i}"))

    def prompt(self, entry: Mapping[str, Any], index: str) -> Prompt:
        metadata = dict(entry.get("metadata") or {})
        return Prompt(
            prompt_id=f"rg/{self.source}/{index}",
            text=str(entry["question"]),
            answer="" if entry["answer"] is None else str(entry["answer"]),
            task=self.key,
            source=str(metadata.get("source_dataset", self.source))
            if self.name == "composite"
            else self.source,
            metadata=metadata,
        )


class ReasoningGymTask:
    """Prompts of a ``reasoning_gym`` task config (see the module doc).

    The held-out set has ``ceil(heldout_size / entries)`` distinct questions per entry,
    interleaved entry by entry and cut to ``heldout_size``, so every dataset gets an accuracy of
    its own whatever its training weight.
    """

    def __init__(self, config: Any) -> None:
        per_entry = -(-config.heldout_size // len(config.datasets))
        self.sources = [_Source(e, config.answer_format, per_entry) for e in config.datasets]
        weights = np.array([e.weight for e in config.datasets], dtype=np.float64)
        self.weights = weights / weights.sum()
        self._heldout = _interleave([s.heldout for s in self.sources])[: config.heldout_size]
        self._heldout_questions = {p.text for p in self._heldout}

    @property
    def scorers(self) -> dict[str, ReasoningGymScorer]:
        """Verifier key -> its dataset's scorer."""
        return {s.key: s.scorer for s in self.sources}

    @property
    def extractors(self) -> dict[str, Callable[[str], str | None]]:
        """Verifier key -> the answer a response states (for maj@k and the format rate)."""
        return {s.key: s.scorer.stated for s in self.sources}

    def heldout(self) -> list[Prompt]:
        return list(self._heldout)

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        """``n`` freshly generated training prompts: an entry by weight, then a uniform index of
        its pool; a question in the held-out set is redrawn.

        Raises:
            RuntimeError: when ``50 * n`` draws found no question outside the held-out set.
        """
        out: list[Prompt] = []
        for _ in range(_TRAIN_TRIES * max(n, 1)):
            if len(out) == n:
                return out
            src = self.sources[int(rng.choice(len(self.sources), p=self.weights))]
            index = int(rng.integers(0, src.pool))
            entry = src.train[index]
            if entry["question"] not in self._heldout_questions:
                out.append(src.prompt(entry, f"t{index}"))
        if len(out) == n:
            return out
        raise RuntimeError(
            "task.datasets: almost every generated question is in the held-out set; make the "
            "datasets harder (larger) or heldout_size smaller"
        )


def _interleave(lists: Sequence[Sequence[Prompt]]) -> list[Prompt]:
    out: list[Prompt] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out

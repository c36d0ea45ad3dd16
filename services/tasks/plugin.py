"""A task written in Python: ``task.type: python`` with ``source: package.module:factory``.

The factory (called with ``task.options`` as keyword arguments) returns an object with:

- ``train_prompts(n, rng)``: ``n`` training items, drawing with ``rng`` (a numpy Generator);
- ``heldout_prompts(n)``: up to ``n`` fixed held-out items (the same on every call);
- ``score(response, answer, metadata)``: the reward of ``response`` to an item, a float
  (1.0 or more counts as correct), run under the task's verifier guard (a timeout, an error
  or a non-number scores 0 and is counted).

An item is a :class:`TaskItem` (or a dict of its fields): the prompt (a question string, or chat
messages), the reference answer, metadata handed back to ``score``, an optional stable id, and
an optional tag, its source in per-task metrics. ``docs/tasks.md`` has a complete example.
Training items whose question is also a held-out question are redrawn, so the two never meet.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from services.tasks.base import Prompt

KEY_PREFIX = "plugin/"
_METHODS = ("train_prompts", "heldout_prompts", "score")
# Training gives up after this many draws per prompt that all landed on held-out questions.
_TRAIN_TRIES = 50


@dataclass(frozen=True)
class TaskItem:
    """One prompt a plug-in yields.

    Attributes:
        prompt: The question (rendered with the task's instruction and chat template), or chat
            messages (``{"role", "content"}`` dicts; rendered with the chat template as given).
        answer: The reference answer handed to ``score``.
        metadata: Anything else ``score`` needs, handed back to it.
        id: A stable id; None: a hash of the tag and the prompt.
        tag: The item's source in per-task metrics (empty: the plug-in's items are one source).
    """

    prompt: str | Sequence[Mapping[str, str]]
    answer: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None
    tag: str = ""


def load_plugin(source: str, options: Mapping[str, Any]) -> Any:
    """The plug-in object ``source`` (``package.module:factory``) makes with ``options``.

    Raises:
        ValueError: naming ``source``: not an import path, an import that fails, a factory
            that raises, or an object without the three methods.
    """
    module_name, sep, attr = source.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"source: {source!r} is not 'package.module:factory'")
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except Exception as exc:  # ImportError, AttributeError, or the module failing to import
        raise ValueError(f"source: cannot load {source!r} ({type(exc).__name__}: {exc})") from None
    try:
        plugin = factory(**options)
    except Exception as exc:
        raise ValueError(
            f"source: {source!r} raised {type(exc).__name__}: {exc} (options {dict(options)})"
        ) from None
    missing = [m for m in _METHODS if not callable(getattr(plugin, m, None))]
    if missing:
        raise ValueError(f"source: {source!r} returned a {type(plugin).__name__} without {missing}")
    return plugin


class _Scorer:
    """The plug-in's ``score`` as a verifier that takes the prompt's metadata."""

    takes_metadata = True

    def __init__(self, plugin: Any, source: str) -> None:
        self.plugin = plugin
        self.__name__ = f"{source}.score"

    def __call__(self, response: str, answer: str, metadata: Mapping[str, Any]) -> float:
        return self.plugin.score(response, answer, metadata)


class PluginTask:
    """Prompts and scorer of a ``python`` task config (see the module doc)."""

    def __init__(self, config: Any) -> None:
        self.source = config.source
        self.plugin = load_plugin(config.source, config.options)
        self.key = KEY_PREFIX + config.source
        self.scorer = _Scorer(self.plugin, config.source)
        self._heldout = self._prompts(
            "heldout_prompts", self.plugin.heldout_prompts(config.heldout_size)
        )[: config.heldout_size]
        if not self._heldout:
            raise ValueError(f"source: {config.source!r}.heldout_prompts gave no items")
        self._heldout_texts = {p.text for p in self._heldout}

    def heldout(self) -> list[Prompt]:
        return list(self._heldout)

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        """``n`` training prompts from the plug-in, none with a held-out question.

        Raises:
            RuntimeError: when ``50 * n`` items were all held-out questions.
        """
        out: list[Prompt] = []
        for _ in range(_TRAIN_TRIES):
            items = self._prompts("train_prompts", self.plugin.train_prompts(n - len(out), rng))
            out += [p for p in items if p.text not in self._heldout_texts]
            if len(out) >= n:
                return out[:n]
        raise RuntimeError(f"task.source: {self.source!r} keeps yielding held-out questions")

    def _prompts(self, method: str, items: Iterable[Any]) -> list[Prompt]:
        try:
            return [self._prompt(item) for item in items]
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"source: {self.source!r}.{method}: {exc}") from None

    def _prompt(self, item: Any) -> Prompt:
        if isinstance(item, Mapping):
            unknown = set(item) - {f.name for f in fields(TaskItem)}
            if unknown:
                raise ValueError(f"item has unknown fields {sorted(unknown)}")
            item = TaskItem(**item)
        if not isinstance(item, TaskItem):
            raise TypeError(f"expected a TaskItem or a dict, got {type(item).__name__}")
        messages = None
        if isinstance(item.prompt, str):
            text = item.prompt
        else:
            messages = tuple({"role": m["role"], "content": m["content"]} for m in item.prompt)
            text = messages[-1]["content"] if messages else ""
        if not text.strip():
            raise ValueError(f"item {item.id or ''} has an empty prompt")
        key = f"{item.tag}\0{text if messages is None else messages!r}"
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
        return Prompt(
            prompt_id=item.id if item.id is not None else f"{item.tag or 'plugin'}:{digest}",
            text=text,
            answer=str(item.answer),
            task=self.key,
            source=item.tag,
            metadata=dict(item.metadata),
            messages=messages,
        )

"""How a task's question becomes the text a policy is conditioned on.

A JSONL task states an instruction template (``"{question}\\nPut the final answer after ####."``)
and whether to wrap it in the tokenizer's chat template, with an optional system turn. The
rendered text (chat markers included) is the prompt the rollout engines and evaluation encode,
so the policy is trained on exactly what it is later asked. Built-in tasks use their prompts
as they are. A prompt that is chat messages (``Prompt.messages``: a plug-in's, a verl parquet
row's) is rendered as given, with the system turn added when it has none; it needs the chat
template.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.tasks.base import Prompt

QUESTION = "{question}"


@dataclass(frozen=True)
class PromptFormat:
    """A task's prompt rendering.

    Attributes:
        instruction: The user text; :data:`QUESTION` is replaced by the question (other braces
            are literal, so LaTeX in an instruction is safe).
        chat_template: Render through ``tokenizer.apply_chat_template`` with the assistant turn
            opened (``add_generation_prompt``).
        system_prompt: A system turn before the user turn (chat template only).
    """

    instruction: str = QUESTION
    chat_template: bool = False
    system_prompt: str | None = None

    @classmethod
    def from_task(cls, task: Any) -> PromptFormat:
        """The format a task config states (its ``instruction``, ``chat_template`` and
        ``system_prompt`` fields); a task without them keeps its prompts as they are."""
        return cls(
            instruction=getattr(task, "instruction", QUESTION),
            chat_template=bool(getattr(task, "chat_template", False)),
            system_prompt=getattr(task, "system_prompt", None),
        )

    @property
    def is_identity(self) -> bool:
        """True when rendering returns the question unchanged."""
        return self.instruction == QUESTION and not self.chat_template

    def render(self, tokenizer: Any, question: str) -> str:
        """The prompt text for ``question``.

        Raises:
            ValueError: when the chat template is asked for and the tokenizer has none.
        """
        body = self.instruction.replace(QUESTION, question)
        if not self.chat_template:
            return body
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "task.chat_template: the policy's tokenizer has no chat template "
                "(tokenizer_config.json 'chat_template' or chat_template.jinja)"
            )
        messages = [{"role": "user", "content": body}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render_messages(self, tokenizer: Any, messages: Sequence[Any]) -> str:
        """The prompt text of chat ``messages``: the chat template over them (the system turn
        added when they have none), the assistant turn opened.

        Raises:
            ValueError: when the task does not render with the chat template, or the tokenizer
                has none.
        """
        if not self.chat_template:
            raise ValueError(
                "task.chat_template: the task yields chat messages; set chat_template: true"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("task.chat_template: the policy's tokenizer has no chat template")
        turns = [dict(m) for m in messages]
        if self.system_prompt is not None and not any(m["role"] == "system" for m in turns):
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def apply(self, tokenizer: Any, prompts: Sequence[Prompt]) -> list[Prompt]:
        """``prompts`` with their text rendered (ids, answers, verifier keys and metadata kept)."""
        if self.is_identity and all(p.messages is None for p in prompts):
            return list(prompts)
        return [
            dataclasses.replace(
                p,
                text=self.render(tokenizer, p.text)
                if p.messages is None
                else self.render_messages(tokenizer, p.messages),
            )
            for p in prompts
        ]


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether the tokenizer saved in ``model_dir`` carries a chat template (read from its files,
    without loading it): ``chat_template.jinja``, or ``chat_template`` in
    ``tokenizer_config.json``."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file() or (
        model_dir / "chat_template.json"
    ).is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False

"""The ``task`` section: which prompts a run trains on and how answers are scored.

A discriminated union on ``type``: each task kind has only its own fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


class _TaskBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    heldout_size: int = Field(500, ge=1)
    """Held-out prompts every evaluation scores (greedy accuracy and pass@k)."""
    verifier_timeout_s: float = Field(2.0, gt=0)
    """A verifier call running longer scores 0 and is counted as a verifier error."""


class ArithmeticTaskConfig(_TaskBase):
    """``aaa+bbb=`` with zero-padded operands; reward 1 for the exact sum. Built in, no files."""

    type: Literal["arithmetic"] = "arithmetic"
    digits: int = Field(3, ge=1, le=6)
    """Operand digits."""


class MixedTaskConfig(_TaskBase):
    """Mixed-operation arithmetic (``+ - *``, operand lengths, multi-step) at graded difficulty
    (``services/tasks/mixed.py``); each prompt records its level, and evaluation reports
    accuracy per level. Built in, no files."""

    type: Literal["mixed"] = "mixed"
    levels: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    """Difficulty levels to draw from (keys of ``services.tasks.mixed.LEVELS``, 1..8)."""

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, levels: list[int]) -> list[int]:
        from services.tasks.mixed import LEVELS

        bad = [lv for lv in levels if lv not in LEVELS]
        if bad or len(set(levels)) != len(levels):
            raise ValueError(f"must be distinct values of {sorted(LEVELS)}, got {levels}")
        return levels


class JsonlTaskConfig(_TaskBase):
    """GSM8K- or MATH-style JSONL files: one object per line with a question and an answer."""

    type: Literal["jsonl"] = "jsonl"
    train_path: Path
    """Training prompts (JSONL)."""
    eval_path: Path | None = None
    """Held-out prompts (JSONL); None: the first ``heldout_size`` training prompts."""
    verifier: str = Field("math", min_length=1)
    """How a response is scored: a registered verifier (``math``: math-verify equivalence with
    the reference; ``gsm8k``: the number after the response's last ``####``; ``gsm8k_format``: the same, with
    0.1 for a wrong number in that format; ``arithmetic``: the
    whole response is the integer), or an import path ``package.module:function`` taking
    (response text, reference answer) and returning a float reward. Run under the timeout
    guard (``verifier_timeout_s``); the import is checked when the config is validated."""
    instruction: str = Field("{question}", min_length=1)
    """The prompt's text: ``{question}`` is replaced by the question (the only placeholder;
    other braces are kept), e.g. ``"{question}\nPut the final answer after ####."``."""
    chat_template: bool = False
    """Render the prompt with the tokenizer's chat template (an optional system turn, the
    instruction as the user turn, then the assistant turn opened), as instruct models expect.
    False: the instruction text alone. The rendered text is what the rollout engines encode."""
    system_prompt: str | None = Field(None, min_length=1)
    """The system turn before the user turn; needs ``chat_template``."""

    @model_validator(mode="after")
    def _files_exist(self) -> JsonlTaskConfig:
        for name in ("train_path", "eval_path"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        if "{question}" not in self.instruction:
            raise ValueError(f"instruction: must contain {{question}}, got {self.instruction!r}")
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError(
                "system_prompt: needs chat_template: true (a system turn is a chat turn)"
            )
        from services.tasks.verify import resolve_verifier

        try:
            resolve_verifier(self.verifier)
        except ValueError as exc:
            raise ValueError(f"verifier: {exc}") from None
        return self


def _default_type(value: Any) -> Any:
    # ``task: {digits: 2}`` means the built-in task, as it always has.
    if isinstance(value, dict) and "type" not in value:
        return {"type": "arithmetic", **value}
    return value


SyntheticTaskConfig = ArithmeticTaskConfig | MixedTaskConfig
"""The built-in tasks: no files, and the warm start can train the built-in policy on them."""

TaskConfig = Annotated[
    ArithmeticTaskConfig | MixedTaskConfig | JsonlTaskConfig,
    Field(discriminator="type"),
    BeforeValidator(_default_type),
]

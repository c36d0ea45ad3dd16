"""The ``task`` section: which prompts a run trains on and how answers are scored.

A discriminated union on ``type``: each task kind has only its own fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from services.tasks.extract import AnswerFormat


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


class _PromptedTask(_TaskBase):
    """A task whose questions are rendered for an instruct model: an instruction around the
    question, optionally the tokenizer's chat template with a system turn."""

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
    def _prompt_format(self) -> _PromptedTask:
        if "{question}" not in self.instruction:
            raise ValueError(f"instruction: must contain {{question}}, got {self.instruction!r}")
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError(
                "system_prompt: needs chat_template: true (a system turn is a chat turn)"
            )
        return self


def _check_verifier(spec: str, field_name: str = "verifier") -> None:
    from services.tasks.verify import resolve_verifier

    try:
        resolve_verifier(spec)
    except ValueError as exc:
        raise ValueError(f"{field_name}: {exc}") from None


class JsonlTaskConfig(_PromptedTask):
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

    @model_validator(mode="after")
    def _files_exist(self) -> JsonlTaskConfig:
        for name in ("train_path", "eval_path"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        _check_verifier(self.verifier)
        return self


def _default_instruction(data: Any) -> Any:
    # The instruction asks for the answer in the format the task extracts, unless it is given.
    if isinstance(data, dict) and "instruction" not in data:
        from services.tasks.extract import INSTRUCTIONS

        fmt = data.get("answer_format", "answer_tag")
        if fmt in INSTRUCTIONS:
            return {**data, "instruction": INSTRUCTIONS[fmt]}
    return data


class ReasoningGymEntry(BaseModel):
    """One reasoning-gym dataset a run draws from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    """A registered reasoning-gym dataset (``basic_arithmetic``, ``chain_sum``, ...; ``composite``
    with ``config.datasets`` for the package's own mixing)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The dataset's config fields (its config class's, e.g. ``min_terms``); ``seed`` and
    ``size`` are set by the task (train and held-out seeds are kept apart)."""
    weight: float = Field(1.0, gt=0)
    """Relative chance that a training prompt comes from this dataset."""
    tag: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """The source name in per-task metrics; default the dataset's name (give one to tell two
    entries of the same dataset apart)."""
    pool: int = Field(1_000_000, ge=1, le=1 << 30)
    """Training prompts are generated from this many indices of the dataset (uniformly, fresh
    every draw); a dataset that generates everything up front (``acre``, ``word_ladder``) needs
    a small one."""

    @property
    def source(self) -> str:
        return self.tag or self.name

    @model_validator(mode="after")
    def _known(self) -> ReasoningGymEntry:
        from services.tasks.reasoning_gym import check_entry

        check_entry(self.name, self.config)
        return self


class ReasoningGymTaskConfig(_PromptedTask):
    """reasoning-gym's procedural tasks (``pip install 'd3s-rl[reasoning-gym]'``): training
    prompts are generated fresh every draw, held-out prompts come from a disjoint seed range
    (and never share a question with training), and each response is scored by its dataset's
    own ``score_answer`` on the answer it states (``answer_format``)."""

    type: Literal["reasoning_gym"] = "reasoning_gym"
    datasets: list[ReasoningGymEntry] = Field(min_length=1)
    """The datasets to mix, each with its config and weight."""
    answer_format: AnswerFormat = "answer_tag"
    """Where a response states its answer (``services/tasks/extract.py``): ``answer_tag``, the
    last ``<answer>...</answer>``; ``hashes``, after the last ``####``. A response without it
    scores 0. The default ``instruction`` asks for this format."""

    _fill_instruction = model_validator(mode="before")(_default_instruction)

    @model_validator(mode="after")
    def _distinct_sources(self) -> ReasoningGymTaskConfig:
        sources = [d.source for d in self.datasets]
        dup = sorted({s for s in sources if sources.count(s) > 1})
        if dup:
            raise ValueError(f"datasets: {dup} appear twice; give the entries distinct 'tag's")
        return self


class DataFile(BaseModel):
    """A data file (or a hub dataset) and the source name its rows report under."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    """A local ``.parquet``, ``.arrow`` (an Arrow stream, as ``datasets`` writes them),
    ``.jsonl``/``.json`` file, a directory written by ``Dataset.save_to_disk``, or a Hugging
    Face hub name (``owner/name``, where a hub is reachable)."""
    source: str | None = Field(None, min_length=1)
    """The rows' source name in per-task metrics (unless ``columns.source`` names a column);
    default the file's stem (the hub name for a hub dataset)."""
    split: str = "train"
    """The split to read from a hub dataset (local files are one split)."""


def _data_file(value: Any) -> Any:
    return {"path": value} if isinstance(value, str | Path) else value


DataFileArg = Annotated[DataFile, BeforeValidator(_data_file)]


class ColumnMap(BaseModel):
    """Which columns hold what. A name may reach into a struct column with dots
    (``reward_model.ground_truth``, as verl's parquet files keep the answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = "prompt"
    """The question: a string, or a list of chat messages (``{role, content}``; verl's
    ``prompt``), rendered with the chat template."""
    answer: str = "answer"
    """The reference answer handed to the verifier (a GSM8K ``####`` or MATH ``\\boxed{}``
    solution is cut to its final answer, as for JSONL)."""
    verifier: str | None = None
    """A column naming each row's verifier (a registered name or ``module:function``); None:
    ``task.verifier`` for every row."""
    source: str | None = None
    """A column naming each row's source for per-task metrics (verl's ``data_source``); None:
    the file's ``source``."""
    id: str | None = None
    """A column with each row's stable id; None: ``<source>-<row number>``."""
    extra: list[str] = Field(default_factory=list)
    """Columns passed to the verifier as the prompt's metadata (to a verifier that takes a
    third argument)."""

    def names(self) -> list[str]:
        """Every column named, top-level part only."""
        named = [self.prompt, self.answer, self.verifier, self.source, self.id, *self.extra]
        return [c.split(".", 1)[0] for c in named if c is not None]


class DatasetTaskConfig(_PromptedTask):
    """Prompts from data files read with Hugging Face ``datasets`` (parquet, Arrow, JSONL, or a
    hub dataset), with a column mapping (``pip install 'd3s-rl[datasets]'``)."""

    type: Literal["dataset"] = "dataset"
    train: list[DataFileArg] = Field(min_length=1)
    """Training files (each a path, or ``{path, source, split}``)."""
    heldout: list[DataFileArg] = Field(default_factory=list)
    """Held-out files; empty: ``heldout_fraction`` of the training rows are held out."""
    heldout_fraction: float = Field(0.05, gt=0, lt=1)
    """Without ``heldout`` files: this share of the training rows (a fixed shuffle, the same in
    every run) is held out and never trained on; at most ``heldout_size`` of them are scored."""
    columns: ColumnMap = Field(default_factory=ColumnMap)
    """Which columns hold the prompt, the answer and the rest."""
    verifier: str = Field("math", min_length=1)
    """The verifier of rows without a verifier column (as for ``jsonl``)."""
    max_prompt_chars: int | None = Field(None, ge=1)
    """Rows whose question is longer (in characters, before rendering) are dropped when the
    files are read; None: all are kept (``rollout.max_prompt_tokens`` still applies)."""

    @model_validator(mode="after")
    def _readable(self) -> DatasetTaskConfig:
        from services.tasks.data import check_columns

        _check_verifier(self.verifier)
        for name in ("train", "heldout"):
            for i, f in enumerate(getattr(self, name)):
                try:
                    check_columns(f, self.columns)
                except ValueError as exc:
                    raise ValueError(f"{name}[{i}]: {exc}") from None
        return self


class PythonTaskConfig(_PromptedTask):
    """A task written in Python (``docs/tasks.md``): ``source`` names a factory returning an
    object with ``train_prompts(n, rng)``, ``heldout_prompts(n)`` and
    ``score(response, answer, metadata)``."""

    type: Literal["python"] = "python"
    source: str = Field(min_length=3)
    """``package.module:factory``; the factory is called with ``options`` as keyword arguments
    when the config is validated and when a run builds its prompts."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the factory."""

    @model_validator(mode="after")
    def _loads(self) -> PythonTaskConfig:
        from services.tasks.plugin import load_plugin

        load_plugin(self.source, self.options)
        return self


def _default_type(value: Any) -> Any:
    # ``task: {digits: 2}`` means the built-in task, as it always has.
    if isinstance(value, dict) and "type" not in value:
        return {"type": "arithmetic", **value}
    return value


SyntheticTaskConfig = ArithmeticTaskConfig | MixedTaskConfig
"""The built-in tasks: no files, and the warm start can train the built-in policy on them."""

TaskConfig = Annotated[
    ArithmeticTaskConfig
    | MixedTaskConfig
    | JsonlTaskConfig
    | ReasoningGymTaskConfig
    | DatasetTaskConfig
    | PythonTaskConfig,
    Field(discriminator="type"),
    BeforeValidator(_default_type),
]

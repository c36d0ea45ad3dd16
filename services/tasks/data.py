"""Prompts from data files (parquet, Arrow, JSONL) or a hub dataset, read with Hugging Face
``datasets`` through a column mapping (:class:`~services.tasks.config.ColumnMap`).

A row becomes a :class:`Prompt`: its question (a string, or chat messages as verl's parquet
files keep them), its reference answer (a GSM8K/MATH solution is cut to its final answer, as for
JSONL), the verifier its row names or the task's, its source (a column or the file's name) and
the extra columns as metadata for the verifier. Bad data is a ``ValueError`` naming the file and
the row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from services.tasks.base import Prompt
from services.tasks.jsonl import extract_answer
from services.tasks.verify import resolve_verifier

# The fixed shuffle that picks held-out rows by fraction: the same split in every run.
HELDOUT_SHUFFLE_SEED = 0x5EED
_SUFFIX_BUILDER = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "type dataset needs Hugging Face datasets: pip install 'd3s-rl[datasets]'"
        ) from None
    return datasets


def _is_hub_name(path: str) -> bool:
    return not Path(path).exists() and Path(path).suffix == "" and path.count("/") == 1


def _column_names(path: Path) -> list[str]:
    """The columns of a local file or saved dataset, reading its schema or first row only."""
    if path.is_dir():
        ds = _datasets().load_from_disk(str(path))
        return list(ds.column_names if hasattr(ds, "column_names") else ds)
    builder = _SUFFIX_BUILDER.get(path.suffix)
    if builder == "parquet":
        _datasets()
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if builder == "arrow":
        _datasets()
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            try:
                return list(pa.ipc.open_stream(source).schema.names)
            except pa.ArrowInvalid:
                return list(pa.ipc.open_file(source).schema.names)
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                return list(row) if isinstance(row, dict) else []
    return []


def check_columns(file: Any, columns: Any) -> None:
    """Fail as reading ``file`` (a :class:`~services.tasks.config.DataFile`) would: no such
    file, an unreadable kind, or a mapped column it does not have.

    A hub name is not checked here (no network at validation); reading it may still fail.

    Raises:
        ValueError: naming the path and the column.
    """
    if _is_hub_name(file.path):
        return
    path = Path(file.path)
    if not path.exists():
        raise ValueError(f"path: no such file: {path}")
    if path.is_file() and path.suffix not in _SUFFIX_BUILDER:
        raise ValueError(f"path: {path} is not .parquet, .arrow, .jsonl or .json")
    have = _column_names(path)
    for role, name in columns.model_dump().items():
        names = name if isinstance(name, list) else [name]
        for n in names:
            if n is not None and n.split(".", 1)[0] not in have:
                raise ValueError(f"columns.{role}: {path} has no column {n!r} (has {have})")


def read_rows(file: Any) -> Iterable[Mapping[str, Any]]:
    """The rows of ``file`` as dicts, read with ``datasets``."""
    datasets = _datasets()
    if _is_hub_name(file.path):
        return datasets.load_dataset(file.path, split=file.split)
    path = Path(file.path)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        return ds[file.split] if isinstance(ds, datasets.DatasetDict) else ds
    builder = _SUFFIX_BUILDER[path.suffix]
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _get(row: Mapping[str, Any], column: str) -> Any:
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def _question(value: Any, where: str) -> tuple[str, tuple[dict[str, str], ...] | None]:
    """(text, messages): a string question, or chat messages and their last user turn."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, list | tuple) and value and all(isinstance(m, Mapping) for m in value):
        messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in value)
        users = [m["content"] for m in messages if m["role"] == "user"]
        return (users[-1] if users else messages[-1]["content"]), messages
    raise ValueError(f"{where}: prompt must be a string or chat messages, got {value!r:.80}")


def _reference(value: Any, where: str) -> str:
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]  # a one-answer list, as some reward specs keep it
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: answer must be a string or a number, got {value!r:.80}")
    answer = extract_answer(value) if isinstance(value, str) else str(value)
    if not answer:
        raise ValueError(f"{where}: empty answer")
    return answer


def row_prompt(
    row: Mapping[str, Any], columns: Any, verifier: str, source: str, where: str, default_id: str
) -> Prompt:
    """The prompt of one row (see the module doc); ``default_id`` without an id column.

    Raises:
        ValueError: naming ``where`` (file and row) on a missing column, an empty question or
            answer, or a verifier that does not resolve.
    """
    try:
        text, messages = _question(_get(row, columns.prompt), where)
        answer = _reference(_get(row, columns.answer), where)
        if columns.verifier is not None:
            verifier = str(_get(row, columns.verifier))
        if columns.source is not None:
            source = str(_get(row, columns.source))
        rid = str(_get(row, columns.id)) if columns.id is not None else None
        metadata = {c: _get(row, c) for c in columns.extra}
    except KeyError as exc:
        raise ValueError(f"{where}: no column {exc.args[0]!r}") from None
    if not text.strip():
        raise ValueError(f"{where}: empty question")
    try:
        resolve_verifier(verifier)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return Prompt(
        prompt_id=rid if rid is not None else default_id,
        text=text,
        answer=answer,
        task=verifier,
        source=source,
        metadata=metadata,
        messages=messages,
    )


def load_file(file: Any, columns: Any, verifier: str, max_prompt_chars: int | None) -> list[Prompt]:
    """Every row of ``file`` as a prompt, those with a question over ``max_prompt_chars``
    left out. Ids default to ``<source>-<row>`` (the row number from 1)."""
    source = file.source or (file.path if _is_hub_name(file.path) else Path(file.path).stem)
    out: list[Prompt] = []
    for i, row in enumerate(read_rows(file), start=1):
        p = row_prompt(row, columns, verifier, source, f"{file.path}:row {i}", f"{source}-{i}")
        if max_prompt_chars is None or len(p.text) <= max_prompt_chars:
            out.append(p)
    return out


def load_task(config: Any) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts) of a ``dataset`` task config: the held-out files,
    or ``heldout_fraction`` of the training rows by a fixed shuffle."""

    def read(files: list) -> list[Prompt]:
        rows: list[Prompt] = []
        for f in files:
            rows += load_file(f, config.columns, config.verifier, config.max_prompt_chars)
        return rows

    train = read(config.train)
    if not train:
        raise ValueError("train: no rows (after max_prompt_chars)")
    if config.heldout:
        heldout = read(config.heldout)
        if not heldout:
            raise ValueError("heldout: no rows (after max_prompt_chars)")
        return train, heldout
    order = np.random.default_rng(HELDOUT_SHUFFLE_SEED).permutation(len(train))
    n_held = max(1, int(np.ceil(config.heldout_fraction * len(train))))
    if n_held >= len(train):
        raise ValueError(f"heldout_fraction: leaves no training rows of {len(train)}")
    return [train[i] for i in sorted(order[n_held:])], [train[i] for i in order[:n_held]]

"""task.type dataset: parquet, Arrow and JSONL files read with Hugging Face datasets through a
column mapping; held-out by file or by fraction; bad input names the field, the file or the row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from services.tasks.config import TaskConfig
from services.tasks.source import TaskSource

datasets = pytest.importorskip("datasets", reason="the datasets extra")

TASK = TypeAdapter(TaskConfig)

# verl's layout: chat-message prompts, the answer inside a struct, a data_source column.
ROWS = [
    {
        "data_source": "gsm8k" if i % 2 else "math",
        "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
        "question": f"What is {i} plus {i}?" + (" Explain at length." * 10 if i == 7 else ""),
        "reward_model": {"ground_truth": f"Because.\n#### {2 * i}", "style": "rule"},
        "unit": "apples",
        "check": "tests_dataset_verifiers:with_unit",
    }
    for i in range(20)
]

VERIFIERS = '''
def with_unit(response, answer, metadata):
    """Right when the response is the answer followed by the row's unit."""
    return 1.0 if response.strip() == f"{answer} {metadata['unit']}" else 0.0
'''


def _write(root: Path, kind: str, rows: list[dict]) -> Path:
    """``rows`` as a file of ``kind`` (written with pyarrow, as other tools write them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    if kind == "parquet":
        path = root / "data.parquet"
        pq.write_table(table, path)
    elif kind == "arrow":
        path = root / "data.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "saved":
        pq.write_table(table, root / "src.parquet")
        path = root / "saved_dir"
        loaded = datasets.load_dataset("parquet", data_files=str(root / "src.parquet"))
        loaded["train"].save_to_disk(str(path))
    else:
        path = root / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task(**fields):
    return TASK.validate_python({"type": "dataset", **fields})


@pytest.mark.parametrize("kind", ["parquet", "arrow", "saved", "jsonl"])
def test_each_format_reads_through_the_mapping(tmp_path, kind, monkeypatch) -> None:
    (tmp_path / "tests_dataset_verifiers.py").write_text(VERIFIERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _write(tmp_path, kind, ROWS)
    task = _task(
        train=[str(path)],
        heldout_fraction=0.25,
        heldout_size=3,
        columns={
            "prompt": "prompt",
            "answer": "reward_model.ground_truth",
            "source": "data_source",
            "verifier": "check",
            "extra": ["unit"],
        },
        chat_template=True,
    )
    source = TaskSource.from_config(task)
    heldout = source.heldout()
    assert len(heldout) == 3
    train = source.train_prompts(200, np.random.default_rng(0))
    # Held out by a fixed shuffle: 5 of 20 rows, never trained on.
    assert len({p.prompt_id for p in train}) == 15
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in heldout}
    p = train[0]
    i = int(p.text.split()[2])
    assert p.messages == ({"role": "user", "content": f"What is {i} plus {i}?"},)
    assert p.answer == str(2 * i) and p.source == ("gsm8k" if i % 2 else "math")
    assert p.task == "tests_dataset_verifiers:with_unit" and p.metadata == {"unit": "apples"}
    # The extra column reaches the row's verifier, under the guard.
    assert source.score([p], [f"{2 * i} apples", f"{2 * i}"], 2).tolist() == [[1.0, 0.0]]
    assert source.verifier_errors == 0
    # The same split in every run.
    again = TaskSource.from_config(task).heldout()
    assert [q.prompt_id for q in again] == [q.prompt_id for q in heldout]


def test_heldout_by_file_plain_questions_and_length_filter(tmp_path) -> None:
    train = _write(tmp_path, "parquet", ROWS)
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    held = _write(test_dir, "jsonl", ROWS[:4])
    task = _task(
        train=[{"path": str(train), "source": "train-file"}],
        heldout=[{"path": str(held), "source": "gsm8k-test"}],
        columns={"prompt": "question", "answer": "reward_model.ground_truth", "id": "data_source"},
        verifier="gsm8k",
        max_prompt_chars=40,
        instruction="{question}\nPut the final answer after ####.",
    )
    source = TaskSource.from_config(task)
    assert [p.source for p in source.heldout()] == ["gsm8k-test"] * 4
    texts = {p.text for p in source.train_prompts(300, np.random.default_rng(1))}
    assert len(texts) == 19 and all(len(t) <= 40 for t in texts)  # row 7 is too long
    p = source.heldout()[3]
    assert p.messages is None and p.task == "gsm8k" and p.answer == "6"
    assert source.score([p], ["... #### 6", "#### 7"], 2).tolist() == [[1.0, 0.0]]


def test_a_missing_column_names_the_column_and_the_file(tmp_path) -> None:
    path = _write(tmp_path, "parquet", ROWS)
    with pytest.raises(
        ValidationError,
        match=r"train\[0\]: columns.answer: .*data.parquet has no column 'solution'",
    ):
        _task(train=[str(path)], columns={"prompt": "question", "answer": "solution"})
    with pytest.raises(ValidationError, match=r"columns.extra: .* has no column 'price'"):
        _task(
            train=[str(path)], columns={"prompt": "question", "answer": "unit", "extra": ["price"]}
        )
    with pytest.raises(ValidationError, match=r"train\[0\]: path: no such file: .*nope.parquet"):
        _task(train=[str(tmp_path / "nope.parquet")])
    with pytest.raises(ValidationError, match=r"heldout\[0\]: path: .*data.csv is not .parquet"):
        (tmp_path / "data.csv").write_text("a,b\n")
        _task(
            train=[str(path)],
            heldout=[str(tmp_path / "data.csv")],
            columns={"prompt": "question", "answer": "unit"},
        )


def test_a_bad_row_names_the_file_and_the_row(tmp_path) -> None:
    rows = [dict(r) for r in ROWS[:5]]
    rows[3]["reward_model"] = {"ground_truth": "", "style": "rule"}
    path = _write(tmp_path, "parquet", rows)
    task = _task(
        train=[str(path)], columns={"prompt": "question", "answer": "reward_model.ground_truth"}
    )
    with pytest.raises(ValueError, match=r"data.parquet:row 4: empty answer"):
        TaskSource.from_config(task)
    rows = [dict(r) for r in ROWS[:5]]
    rows[1]["check"] = "no_such_module:fn"
    path = _write(tmp_path, "jsonl", rows)
    task = _task(
        train=[str(path)], columns={"prompt": "question", "answer": "unit", "verifier": "check"}
    )
    with pytest.raises(
        ValueError,
        match=r"data.jsonl:row 1: verifier 'tests_dataset_verifiers:with_unit'|data.jsonl:row 2: verifier 'no_such_module:fn'",
    ):
        TaskSource.from_config(task)

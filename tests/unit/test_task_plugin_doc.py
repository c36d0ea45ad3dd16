"""The plug-in example in docs/tasks.md runs as documented: its module and its task config are
taken from the page, so the page cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import TypeAdapter

from services.tasks.config import TaskConfig
from services.tasks.source import TaskSource

DOC = Path(__file__).resolve().parents[2] / "docs" / "tasks.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TaskSource:
    (module,) = [b for b in _blocks("python") if "my_tasks.py" in b]
    assert 25 <= len(module.strip().splitlines()) <= 45  # "a complete ~30-line example"
    (tmp_path / "my_tasks.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    (config,) = [b for b in _blocks("yaml") if "type: python" in b]
    task = TypeAdapter(TaskConfig).validate_python(yaml.safe_load(config)["task"])
    return TaskSource.from_config(task)


def test_the_documented_plugin_trains_and_scores(example: TaskSource) -> None:
    heldout = example.heldout()
    assert len(heldout) == 100 and {p.source for p in heldout} == {"product", "difference"}
    train = example.train_prompts(300, np.random.default_rng(0))
    assert len(train) == 300
    assert not {p.text for p in train} & {p.text for p in heldout}
    p = next(q for q in train if q.source == "product")
    a, b = p.metadata["a"], p.metadata["b"]
    assert p.answer == str(a * b) and p.task == "plugin/my_tasks:make_task"
    responses = [f"so <answer>{a * b}</answer>", f"<answer>{a * b + 1}</answer>", str(a * b)]
    assert example.score([p], responses, 3).tolist() == [[1.0, 0.0, 0.0]]
    assert example.verifier_errors == 0

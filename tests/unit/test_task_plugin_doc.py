"""The plug-in example in docs/tasks.md runs as documented: its module and its task config are
taken from the page, so the page cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

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


PLUGINS = """
class Good:
    def train_prompts(self, n, rng):
        return [{"prompt": "q", "answer": "a"}] * n

    def heldout_prompts(self, n):
        return [{"prompt": "h", "answer": "a", "colour": "red"}]

    def score(self, response, answer, metadata):
        return 1.0


def raises(**options):
    raise RuntimeError("no data here")


def incomplete():
    return object()


def bad_items():
    return Good()
"""


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "test_plugins_bad:raises",
            r"source: 'test_plugins_bad:raises' raised RuntimeError: no data here",
        ),
        ("test_plugins_bad:incomplete", r"without \['train_prompts', 'heldout_prompts', 'score'\]"),
        ("test_plugins_bad:missing", r"source: cannot load 'test_plugins_bad:missing'"),
        ("no_such_module_xyz:make", r"source: cannot load 'no_such_module_xyz:make'"),
        ("test_plugins_bad", r"source: 'test_plugins_bad' is not 'package.module:factory'"),
    ],
)
def test_a_plugin_that_cannot_load_fails_validation_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    (tmp_path / "test_plugins_bad.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValidationError, match=message):
        TypeAdapter(TaskConfig).validate_python({"type": "python", "source": source})


def test_a_malformed_item_fails_the_run_naming_the_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "test_plugins_bad.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = TypeAdapter(TaskConfig).validate_python(
        {"type": "python", "source": "test_plugins_bad:bad_items"}
    )
    with pytest.raises(
        ValueError, match=r"bad_items'.heldout_prompts: item has unknown fields \['colour'\]"
    ):
        TaskSource.from_config(task)

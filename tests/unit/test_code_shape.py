"""Code shape: no product function over 80 lines and no product file over 450 lines.

Long functions and files are where a change has to be found in several places; the limits keep
each concern small enough to read in one go. Every offender is named, with its length.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "learner", "selector")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 450


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _long_functions(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line name (n lines)`` for each function or method over the limit, nested ones
    included; a function's lines run from its ``def`` (decorators excluded) to its last line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if n > MAX_FUNCTION_LINES:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return found


def _long_file(path: Path, root: Path = ROOT) -> list[str]:
    n = len(path.read_text().splitlines())
    return [f"{path.relative_to(root)} ({n} lines)"] if n > MAX_FILE_LINES else []


def test_the_walk_finds_the_product_code() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert {"learner/engine.py", "selector/curate.py", "services/transport/records.py"} <= names


def _method(name: str, lines: int) -> str:
    """Source of a method of ``lines`` lines, its ``def`` included."""
    return f"    def {name}(self):\n" + "".join(f"        x{i} = {i}\n" for i in range(lines - 1))


def test_the_checks_name_each_offender_and_only_them(tmp_path: Path) -> None:
    src = tmp_path / "long.py"
    text = "class A:\n" + _method("at_limit", MAX_FUNCTION_LINES)
    text += _method("over", MAX_FUNCTION_LINES + 1)
    src.write_text(text + "\n" * (MAX_FILE_LINES - len(text.splitlines())))
    assert _long_functions(src, tmp_path) == [
        f"long.py:{MAX_FUNCTION_LINES + 2} over ({MAX_FUNCTION_LINES + 1} lines)"
    ]
    assert _long_file(src, tmp_path) == []  # exactly at the file limit
    src.write_text(src.read_text() + "\n")
    assert _long_file(src, tmp_path) == [f"long.py ({MAX_FILE_LINES + 1} lines)"]


def test_no_function_over_80_lines_and_no_file_over_450_lines() -> None:
    offenders = [o for p in _sources() for o in (*_long_functions(p), *_long_file(p))]
    assert not offenders, (
        f"{len(offenders)} over the limits (functions {MAX_FUNCTION_LINES} lines, files "
        f"{MAX_FILE_LINES} lines):\n" + "\n".join(offenders)
    )

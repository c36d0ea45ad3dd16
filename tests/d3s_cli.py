"""The ``d3s`` command line in a subprocess, as a user runs it, for the tests that read what it
prints and what it leaves behind.

Imported as ``from d3s_cli import run_d3s`` (``tests/`` is on ``sys.path`` through its conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_d3s(
    *args: str,
    timeout: float = 540,
    columns: int | None = None,
    pythonpath: Path | str | None = None,
    cwd: Path | str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m services.run.cli ARGS`` with its output captured. ``columns``: the terminal
    width the progress line and tables lay out for; ``pythonpath``: a directory put first on the
    child's import path (a verifier module written by a test)."""
    env = dict(os.environ)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(pythonpath), env.get("PYTHONPATH")) if p
        )
    return subprocess.run(
        [sys.executable, "-m", "services.run.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )

"""What a run shows on the terminal: the console it writes to, one progress line for the training
steps, a transient bar while the warm start trains, and the few log lines a user reads.

The entry points of the CLI may move the process's own stdout and stderr into a log file (so
that Ray, DeepSpeed and transformers write there); :func:`quiet_terminal` keeps a console on the
real terminal, and :func:`terminal` is that console wherever the run's progress is drawn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

__all__ = [
    "ConsoleLines",
    "StepProgress",
    "quiet_terminal",
    "set_terminal",
    "terminal",
    "warmstart_progress",
]

_terminal: Console | None = None
# Loggers whose INFO lines are a run's few terminal lines; everything else is for the log files.
TERMINAL_LOGGERS = ("services.run",)
# Packages of this project: their warnings and errors always reach the terminal.
PROJECT_PACKAGES = ("services", "selector", "learner", "bench")


def terminal() -> Console:
    """The console on the user's terminal (stderr unless :func:`set_terminal` chose another)."""
    global _terminal
    if _terminal is None:
        _terminal = Console(stderr=True)
    return _terminal


def set_terminal(console: Console | None) -> None:
    """Make ``console`` the one :func:`terminal` returns (None: back to a console on stderr)."""
    global _terminal
    _terminal = console


class ConsoleLines(logging.Handler):
    """Log records as short terminal lines: the message alone for INFO, prefixed by its level in
    colour for warnings and errors. Lines are not cut to the console's width (the terminal wraps
    them), so a path stays one piece to copy.

    ``quiet``: only INFO of :data:`TERMINAL_LOGGERS` and warnings of :data:`PROJECT_PACKAGES`
    pass; a third-party library's warnings go to the log file only.
    """

    def __init__(self, console: Console, quiet: bool = True, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.console = console
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or not super().filter(record):
            return False
        if not self.quiet:
            return True
        top = record.name.split(".", 1)[0]
        if record.levelno >= logging.WARNING:
            return top in PROJECT_PACKAGES
        return any(record.name == n or record.name.startswith(n + ".") for n in TERMINAL_LOGGERS)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage() if self.quiet else f"{record.name}: {record.getMessage()}"
            if record.exc_info and not self.quiet:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            if record.levelno >= logging.ERROR:
                line = Text.assemble(("error:", "bold red"), " ", text)
            elif record.levelno >= logging.WARNING:
                line = Text.assemble(("warning:", "yellow"), " ", text)
            else:
                line = Text(text)
            # A Text is never read as markup: a message's brackets ("d3s-rl[gpu]") stay.
            self.console.print(line, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def quiet_terminal(log_path: Path) -> Iterator[tuple[Console, Console]]:
    """Send everything this process writes to its stdout and stderr (Python, C++ and child
    processes alike: Ray, Serve, DeepSpeed, transformers) to ``log_path`` while the block runs.

    Yields ``(out, err)``: consoles on the real stdout and stderr, and makes ``err`` the
    :func:`terminal`. Both streams are restored on exit, before an exception leaves the block,
    so a traceback still reaches the terminal.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    # Copies of the real streams to write to (``saved`` is kept only to restore them).
    real: dict[int, TextIO] = {
        fd: os.fdopen(os.dup(saved[fd]), "w", buffering=1, encoding="utf-8", errors="replace")
        for fd in (1, 2)
    }
    sink = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    out, err = Console(file=real[1]), Console(file=real[2])
    previous = _terminal
    try:
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        set_terminal(err)
        yield out, err
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(sink)
        for stream in real.values():
            with contextlib.suppress(Exception):
                stream.close()
        set_terminal(previous)


class StepProgress:
    """One live line per run: the steps done, reward, held-out accuracy, kept fractions and
    whatever the caller adds (queue depths, staleness). Drawn on :func:`terminal`; where that is
    not a terminal (a pipe, a file), the final state is written once, as one line, at close."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        enabled: bool = True,
        description: str = "training",
        console: Console | None = None,
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.console = console or terminal()
        # Never more done than the total: a run resumed past a lowered total reads "30/30".
        start = min(start, total)
        self.total, self.step, self.description, self.info = total, start, description, ""
        self._t0 = time.monotonic()
        self._p: Progress | None = None
        if self.console.is_terminal:
            self._p = Progress(
                # The run's name is the user's text: shown as written, not read as markup.
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(bar_width=16),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}", markup=False, table_column=Column(no_wrap=True)),
                console=self.console,
            )
            # What the columns before the text take: description, bar 16, "N/N", two times (7
            # each), and the spaces between.
            self._fixed = len(description) + 16 + 2 * len(str(total)) + 1 + 7 + 7 + 5
            self._task = self._p.add_task(description, total=total, completed=start, info="")
            self._p.start()

    def update(self, step: int, row: dict, accuracy: float | None, extra: str = "") -> None:
        if not self.enabled:
            return
        self.step, self.info = min(step, self.total), progress_info(row, accuracy, extra)
        if self._p is not None:
            # One line whatever the width: the text (least important last) is cut in a narrow
            # terminal, never the step count or the times.
            room = max(8, self.console.width - self._fixed - 1)
            info = self.info if len(self.info) <= room else self.info[: room - 1] + "…"
            self._p.update(self._task, completed=self.step, info=info)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._p is not None:
            self._p.stop()
            return
        elapsed = time.monotonic() - self._t0
        line = f"{self.description}: {self.step}/{self.total} steps | {self.info} | {elapsed:.0f}s"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def progress_info(row: dict[str, Any], accuracy: float | None, extra: str = "") -> str:
    """The text beside the bar: ``reward 0.41 | acc 0.350 | kept 50% samples, 31% tokens``."""
    parts = [f"reward {row.get('reward_mean', float('nan')):.2f}"]
    if accuracy is not None:
        parts.append(f"acc {accuracy:.3f}")
    kept = []
    if "samples_kept" in row and row.get("samples_before"):
        kept.append(f"{row['samples_kept'] / row['samples_before']:.0%} samples")
    if row.get("tokens_valid"):
        kept.append(f"{row['tokens_kept'] / row['tokens_valid']:.0%} tokens")
    if kept:
        parts.append("kept " + ", ".join(kept))
    if extra:
        parts.append(extra)
    return " | ".join(parts)


@contextlib.contextmanager
def warmstart_progress(
    enabled: bool = True, console: Console | None = None
) -> Iterator[Callable[[int, int, float], None] | None]:
    """A ``progress(step, total, loss)`` callback for the warm start (None when not
    ``enabled``): a bar that appears on its first call (a cached warm start never calls it) and
    is erased when the block ends."""
    state: dict[str, Any] = {}
    console = console or terminal()
    if not enabled or not console.is_terminal:  # a pipe or a file: no bar, and no blank line
        yield None
        return

    def progress(step: int, total: int, loss: float) -> None:
        if "bar" not in state:
            bar = Progress(
                TextColumn("[bold]warm start[/] (once; cached for later runs)"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            state["bar"], state["task"] = bar, bar.add_task("warm start", total=total, loss="")
            bar.start()
        state["bar"].update(state["task"], completed=step, total=total, loss=f"{loss:.3f}")

    try:
        yield progress
    finally:
        if "bar" in state:
            state["bar"].stop()

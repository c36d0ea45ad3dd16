"""Where a process's own output goes when it runs as one component of a run: one log file; and
the last errors read back from such a file when the process failed."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def file_handler(path: Path) -> logging.FileHandler:
    """A logging handler appending to ``path`` in the run's log format."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def redirect_output(path: Path) -> None:
    """Send this process's stdout and stderr (print, C++ logs, library progress bars) to the end
    of ``path``, at the file-descriptor level so child processes inherit it too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    sink = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)


# ---- a failed process's root cause, read back from its log ----------------------------------------

# What a log line may start with before its text: a child process's tag as vLLM writes it
# ("(EngineCore_DP0 pid=123) "), then vLLM's own record header ("ERROR 07-01 10:00:00
# [core.py:700] "); a traceback that vLLM logs carries both on every line.
_CHILD_TAG = re.compile(r"^\([^()]*pid=\d+\) ")
_VLLM_HEAD = re.compile(
    r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] ?"
)
# A record in LOG_FORMAT: "2026-01-01 12:00:00,000 ERROR name: message".
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) \S+: ?(.*)$")
# The last line of a Python traceback: "ValueError: ...", "ray.exceptions.RayTaskError(X): ...".
_EXCEPTION = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure)"
    r"(?:\([\w.]*\))?(?::\s.*)?$"
)
_TRACEBACK_GLUE = ("Traceback (most recent call last)", "During handling of", "The above exception")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERROR_LEVELS = ("ERROR", "CRITICAL")


def error_lines(text: str, limit: int = 6, width: int = 300) -> list[str]:
    """The last ``limit`` distinct error lines of a log's ``text``: messages of ERROR and
    CRITICAL records and the final lines of tracebacks (``ValueError: ...``), each without its
    record header and cut to ``width`` characters. A child process's error that its parent
    only refers to ("See root cause above") is among them."""
    found: list[str] = []
    for raw in text.splitlines():
        line = _CHILD_TAG.sub("", _ANSI.sub("", raw).rstrip())
        level = None
        head = _VLLM_HEAD.match(line)
        if head:
            level, line = head.group(1), line[head.end() :]
        else:
            record = _RECORD.match(line)
            if record:
                level, line = record.group(1), record.group(2)
        if not line or line[0].isspace() or line.startswith(_TRACEBACK_GLUE):
            continue  # a traceback's frames and glue, or nothing
        # A record says its level; a bare line counts when it ends a traceback.
        if level in _ERROR_LEVELS if level else _EXCEPTION.match(line):
            found.append(line if len(line) <= width else line[: width - 1] + "…")
    distinct = list(dict.fromkeys(reversed(found)))  # the last occurrence of each counts
    return list(reversed(distinct[:limit]))


def log_sizes(log_dir: Path) -> dict[str, int]:
    """The size of each ``*.log`` in ``log_dir`` now: where this session's lines will start."""
    sizes = {}
    for path in Path(log_dir).glob("*.log"):
        with contextlib.suppress(OSError):
            sizes[path.name] = path.stat().st_size
    return sizes


def last_errors(path: Path, since: int = 0, limit: int = 6, max_bytes: int = 1 << 20) -> list[str]:
    """:func:`error_lines` of what ``path`` gained after byte ``since`` (its last ``max_bytes``
    at most); none when the file is missing. A file now shorter than ``since`` was replaced, and
    is read from its start."""
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as fh:
            start = since if since <= size else 0
            fh.seek(max(start, size - max_bytes))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return error_lines(text, limit)

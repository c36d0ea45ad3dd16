"""Where a process's own output goes when it runs as one component of a run: one log file."""

from __future__ import annotations

import logging
import os
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

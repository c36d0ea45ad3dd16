"""Where the processes of a run log: each component's file under ``run_dir/logs/``, the Ray
session's logs linked beside them, and the node each process runs on."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from services.telemetry.logfiles import LOG_FORMAT, file_handler, redirect_output

# Libraries whose INFO lines belong in a component's log file, not on the terminal.
NOISY_LOGGERS = (
    "DeepSpeed",
    "deepspeed",
    "torch.distributed",
    "urllib3",
    "httpx",
    "filelock",
    "transformers",
)


def component_logging(run_dir: Path, name: str, capture_output: bool = False) -> Path:
    """In a component's process: INFO to ``run_dir/logs/<name>.log``, WARNING also to stderr.

    ``capture_output``: the process's stdout and stderr themselves (print, C++ logs, progress
    bars of Ray, DeepSpeed, transformers) go to the same file, and nothing to stderr.
    """
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    handlers: list[logging.Handler] = [file_handler(path)]
    if capture_output:
        redirect_output(path)
    else:
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        err.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(err)
    root = logging.getLogger()
    root.handlers = handlers
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # a library's warnings become records in the same file
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


def link_ray_logs(log_dir: Path) -> Path | None:
    """``log_dir/ray``: a link to this Ray session's log directory (the Serve controller, proxy
    and API replica, the raylet), so every log of a run is found under its run directory.
    Returns the link, or None when the session's directory is unknown (a Ray not started here)."""
    try:
        import ray

        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:  # a private API: the link is a convenience, never worth failing a run
        return None
    link = Path(log_dir) / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(logs, target_is_directory=True)
        return link
    return None


def ray_node_id() -> str:
    """The Ray node this process runs on ('-' outside Ray): logged, so a run's logs say where
    each component was placed."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
    except Exception:  # a log line is not worth failing a component
        return "-"

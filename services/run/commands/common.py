"""What every `d3s` command shares: the terminal, log records, config loading, option types."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from services.run.config import ConfigError, load_config
from services.run.logs import NOISY_LOGGERS
from services.run.progress import ConsoleLines, terminal

console = Console(stderr=True)

ConfigArg = Annotated[
    Path | None, typer.Argument(help="YAML run config (defaults apply to missing fields)")
]


SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a field: --set train.total_steps=50"),
]


VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="debug logging; with run and train also "
        "Ray, Serve, DeepSpeed and transformers output "
        "on the terminal",
    ),
]


FreshOpt = Annotated[
    bool,
    typer.Option(
        "--fresh",
        help="start a new run: move an existing run_dir aside to RUN_DIR.old-<time> "
        "(nothing is deleted) instead of resuming it",
    ),
]


RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis-url", help="Redis of the run (default: service.redis_url, then $D3S_REDIS_URL)"
    ),
]


RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Ray cluster holding the weight store (default: service.ray_address, then 'auto')",
    ),
]


def error(message: object, out: Console | None = None) -> None:
    """``message`` in red, exactly as written: never read as markup, so text in brackets (an
    extra's name like ``d3s-rl[gpu]``, a path, a log line) reaches the terminal whole."""
    (out or console).print(str(message), style="red", markup=False, highlight=False, soft_wrap=True)


def say(out: Console, *parts: str | tuple[object, str]) -> None:
    """One line of plain text and ``(value, style)`` parts; values are printed as they are."""
    text = Text()
    for part in parts:
        if isinstance(part, tuple):
            text.append(str(part[0]), style=part[1])
        else:
            text.append(part)
    out.print(text, soft_wrap=True)


def setup_logging(
    verbose: bool, *, quiet: bool = False, log_file: Path | None = None, out: Console | None = None
) -> None:
    """Log records to the terminal (``quiet``: only the run's own few lines and this project's
    warnings) and, with ``log_file``, every INFO record to that file as well."""
    level = logging.DEBUG if verbose else logging.INFO
    handlers: list[logging.Handler] = [ConsoleLines(out or terminal(), quiet=quiet, level=level)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True
    )
    # Python warnings (torch, transformers) become records: in the log file, not on the terminal.
    logging.captureWarnings(True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        error(e)
        raise typer.Exit(2) from None


def policy_dir(run_dir: Path, policy: Path | None) -> Path:
    """The model directory giving a run's architecture and tokenizer: ``policy``, else the run's
    ``final_policy``."""
    d = policy or run_dir / "final_policy"
    if not (d / "config.json").is_file() and not (d / "adapter_config.json").is_file():
        error(
            f"{d}: no model directory (config.json) for the architecture and "
            "tokenizer; pass --policy MODEL_DIR (e.g. the policy the run started from)"
        )
        raise typer.Exit(2)
    return d

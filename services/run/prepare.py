"""The starting policy of a run: a local model directory, or the cached warm start."""

from __future__ import annotations

import logging
from pathlib import Path

from services.policy import shipped
from services.policy.warmstart import ProgressFn, task_identity, warmstart
from services.run.config import RunConfig
from services.tasks.config import ArithmeticTaskConfig, MixedTaskConfig

log = logging.getLogger(__name__)


def prepare_policy(
    cfg: RunConfig, progress: ProgressFn | None = None, rebuild: bool = False
) -> Path:
    """The model directory the run starts from (validation already checked it exists);
    ``rebuild`` trains the warm start here even when one ships or is cached."""
    if cfg.policy.path is not None:
        log.info("policy: %s", cfg.policy.path)
        return Path(cfg.policy.path)
    # The config validator guarantees a built-in task here.
    assert isinstance(cfg.task, ArithmeticTaskConfig | MixedTaskConfig)
    path = warmstart(cfg.warmstart, cfg.policy.spec(), cfg.task, progress=progress, rebuild=rebuild)
    log.info("policy: warm start %s", path)
    return path


def ship_policy(cfg: RunConfig, checkpoint: Path) -> Path:
    """Install a warm start trained for ``cfg`` as the one shipped with the package."""
    assert isinstance(cfg.task, ArithmeticTaskConfig | MixedTaskConfig)
    key = cfg.warmstart.cache_key(cfg.policy.spec(), task_identity(cfg.task))
    return shipped.ship(checkpoint, key)

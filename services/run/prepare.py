"""The starting policy of a run: a local model directory, or the cached warm start."""

from __future__ import annotations

import logging
from pathlib import Path

from services.policy.warmstart import ProgressFn, warmstart
from services.run.config import RunConfig
from services.tasks.config import ArithmeticTaskConfig, MixedTaskConfig

log = logging.getLogger(__name__)


def prepare_policy(cfg: RunConfig, progress: ProgressFn | None = None) -> Path:
    """The model directory the run starts from (validation already checked it exists)."""
    if cfg.policy.path is not None:
        log.info("policy: %s", cfg.policy.path)
        return Path(cfg.policy.path)
    # The config validator guarantees a built-in task here.
    assert isinstance(cfg.task, ArithmeticTaskConfig | MixedTaskConfig)
    path = warmstart(cfg.warmstart, cfg.policy.spec(), cfg.task, progress=progress)
    log.info("policy: warm start %s", path)
    return path

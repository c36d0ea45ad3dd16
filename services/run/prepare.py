"""The starting policy of a run: a local model directory, or the cached warm start."""

from __future__ import annotations

import logging
from pathlib import Path

from services.policy.model import PolicySpec
from services.policy.warmstart import WarmstartSpec, warmstart
from services.run.config import RunConfig

log = logging.getLogger(__name__)


def warmstart_spec(cfg: RunConfig) -> WarmstartSpec:
    w, p = cfg.warmstart, cfg.policy
    return WarmstartSpec(
        steps=w.steps, batch_size=w.batch_size, lr=w.lr, wrong_fraction=w.wrong_fraction, clean=w.clean,
        seed=w.seed, digits=cfg.task.digits, min_accuracy=w.min_accuracy, max_steps=w.max_steps,
        eval_every=w.eval_every, dev_prompts=w.dev_prompts,
        model=PolicySpec(n_layer=p.n_layer, n_embd=p.n_embd, n_head=p.n_head, n_positions=p.n_positions),
    )


def prepare_policy(cfg: RunConfig, progress=None) -> Path:
    if cfg.policy.path is not None:
        if not (Path(cfg.policy.path) / "config.json").is_file():
            raise FileNotFoundError(f"policy.path: {cfg.policy.path} is not a model directory (no config.json)")
        log.info("policy: %s", cfg.policy.path)
        return Path(cfg.policy.path)
    if cfg.task.kind != "arithmetic":
        raise ValueError("policy.path: required for kind 'jsonl' (the built-in warm start is arithmetic only)")
    path = warmstart(warmstart_spec(cfg), cfg.warmstart.cache_dir, progress=progress)
    log.info("policy: warm start %s", path)
    return path

"""What the learner service needs of a run (the entry point builds it from the run config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selector.presets import Preset


@dataclass(frozen=True)
class LearnerServiceSettings:
    """The run-level settings of the service learner.

    ``preset`` decides the token-level selection; ``seed`` derives each step's generator;
    ``checkpoint_every`` / ``eval_every`` are in learner steps; ``wait_timeout_s`` bounds every
    wait for a batch; ``title`` names the run on its plots.
    """

    preset: Preset
    total_steps: int
    seed: int
    checkpoint_every: int
    eval_every: int
    wait_timeout_s: float
    run_dir: Path
    title: str = "d3s"

"""A run's per-step record, shared by the service learner and the synchronous trainer.

Each step's row goes to metrics.jsonl and TensorBoard (:class:`RunLogger`) and, under the
service, to Redis for the API (``sink``). Every ``eval_every`` steps and at the last step the
row also carries the held-out evaluation. At the end the learning curve is drawn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.telemetry.run_log import RunLogger, plot_run, truncate_metrics

log = logging.getLogger(__name__)

Evaluate = Callable[[], dict[str, float]]
Sink = Callable[[int, dict[str, Any]], None]


class RunReporter:
    """Writes the rows of one run.

    Args:
        run_dir: where metrics.jsonl, tensorboard/ and learning_curve.png go.
        total_steps: the run's length (the last step is always evaluated).
        eval_every: evaluate the policy every this many steps (and at step 0 of a fresh run).
        evaluate: returns held-out metrics of the current policy (e.g. ``heldout_accuracy``);
            None: no evaluation.
        sink: also receives every row (the service writes it to Redis).
        resume_step: the step a resumed run continues from: rows after it (written before a
            crash, trained again now) are dropped, so every step has exactly one row.
        logger_kwargs: passed to :class:`RunLogger` (e.g. the W&B settings).
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        eval_every: int,
        evaluate: Evaluate | None = None,
        sink: Sink | None = None,
        resume_step: int | None = None,
        **logger_kwargs: Any,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.eval_every = eval_every
        self.evaluate = evaluate
        self.sink = sink
        self.last_eval: dict[str, float] = {}
        if resume_step is not None:
            dropped = truncate_metrics(self.run_dir / "metrics.jsonl", resume_step)
            if dropped:
                log.info(
                    "resuming at step %d: %d metric rows after it will be written again",
                    resume_step,
                    dropped,
                )
        self._logger = RunLogger(self.run_dir, **logger_kwargs)

    def due(self, step: int) -> bool:
        """Whether ``step`` carries an evaluation."""
        return self.evaluate is not None and (
            step % self.eval_every == 0 or step == self.total_steps
        )

    def record(self, step: int, row: dict[str, Any]) -> dict[str, Any]:
        """Log the row of ``step`` (evaluated when due); returns the row as written."""
        row = {**row, "wall_time": time.time()}
        if self.due(step):
            assert self.evaluate is not None
            t0 = time.perf_counter()
            self.last_eval = self.evaluate()
            row.update(self.last_eval)
            row["eval_seconds"] = time.perf_counter() - t0
            log.info(
                "step %d held-out %s (%.1fs)",
                step,
                ", ".join(f"{k} {v:.3f}" for k, v in self.last_eval.items()),
                row["eval_seconds"],
            )
        self._logger.log(step, row)
        if self.sink is not None:
            self.sink(step, row)
        return row

    def finish(self, title: str) -> Path | None:
        """Draw the learning curve; returns its path (None when no row was written)."""
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():
            return None
        return plot_run(metrics, self.run_dir / "learning_curve.png", title)

    def close(self) -> None:
        self._logger.close()

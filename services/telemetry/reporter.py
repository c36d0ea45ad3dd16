"""A run's per-step record, shared by the service learner and the synchronous trainer.

Each step's row goes to metrics.jsonl and TensorBoard (:class:`RunLogger`) and, under the
service, to Redis for the API (``sink``). Every ``eval_every`` steps and at the last step the
policy is evaluated on held-out prompts: between steps (``evaluate``), or, with a
:class:`BackgroundEval`, on a snapshot of the weights while training goes on; its result then
joins the step's row when it arrives. At the end the learning curve is drawn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from services.telemetry.run_log import RunLogger, plot_run, truncate_metrics

log = logging.getLogger(__name__)

Evaluate = Callable[[], dict[str, float]]
Sink = Callable[[int, dict[str, Any]], None]


class BackgroundEval(Protocol):
    """Evaluations of weight snapshots that run beside training (e.g. in a Ray actor)."""

    def submit(self, step: int, weights: Any) -> None:
        """Start evaluating ``weights``, the policy after ``step`` (may wait while too many are
        pending)."""

    def results(self, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        """(step, metrics) of the evaluations finished since the last call, in step order;
        ``wait``: all submitted ones."""

    def close(self) -> None:
        """Drop what is pending and free the evaluator."""


class RunReporter:
    """Writes the rows of one run.

    Args:
        run_dir: where metrics.jsonl, tensorboard/ and learning_curve.png go.
        total_steps: the run's length (the last step is always evaluated).
        eval_every: evaluate the policy every this many steps (and at step 0 of a fresh run).
        evaluate: returns held-out metrics of the current policy (e.g. ``heldout_accuracy``);
            None: no evaluation.
        background: evaluates beside training instead of ``evaluate``, on the weights
            ``snapshot(step)`` returns.
        sink: also receives every row (the service writes it to Redis).
        eval_sink: receives each background evaluation as it lands (step, metrics).
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
        *,
        background: BackgroundEval | None = None,
        snapshot: Callable[[int], Any] | None = None,
        eval_sink: Sink | None = None,
        **logger_kwargs: Any,
    ) -> None:
        if background is not None and snapshot is None:
            raise ValueError("snapshot: a background evaluator needs the weights to evaluate")
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.eval_every = eval_every
        self.evaluate = evaluate
        self.background = background
        self.snapshot = snapshot
        self.sink = sink
        self.eval_sink = eval_sink
        self.last_eval: dict[str, float] = {}
        self._last_eval_step = -1
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
        """Whether ``step`` gets an evaluation."""
        return (self.evaluate is not None or self.background is not None) and (
            step % self.eval_every == 0 or step == self.total_steps
        )

    def record(self, step: int, row: dict[str, Any]) -> dict[str, Any]:
        """Log the row of ``step`` (evaluated inline when due and no background evaluator is
        set); returns the row as written. Background evaluations that finished meanwhile are
        logged too."""
        row = {**row, "wall_time": time.time()}
        if self.due(step) and self.background is None:
            assert self.evaluate is not None
            t0 = time.perf_counter()
            values = self.evaluate()
            row.update(self._took(step, values, time.perf_counter() - t0))
        self._logger.log(step, row)
        if self.sink is not None:
            self.sink(step, row)
        if self.background is not None:
            if self.due(step):
                assert self.snapshot is not None
                self.background.submit(step, self.snapshot(step))
            self.collect()
        return row

    def collect(self, wait: bool = False) -> None:
        """Log the background evaluations that finished (``wait``: every one submitted)."""
        if self.background is None:
            return
        for step, values in self.background.results(wait):
            row = self._took(step, values, values.get("eval_seconds", float("nan")))
            row["eval_wall_time"] = time.time()
            self._logger.log_eval(step, row)
            if self.eval_sink is not None:
                self.eval_sink(step, row)

    def _took(self, step: int, values: dict[str, float], seconds: float) -> dict[str, float]:
        """``values`` as logged (with eval_seconds and eval_step); the newest becomes last_eval."""
        if step >= self._last_eval_step:
            self.last_eval, self._last_eval_step = dict(values), step
            self.last_eval.pop("eval_seconds", None)
        log.info(
            "step %d held-out %s (%.1fs)",
            step,
            ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k != "eval_seconds"),
            seconds,
        )
        return {**values, "eval_seconds": seconds, "eval_step": step}

    def finish(self, title: str) -> Path | None:
        """Wait for the evaluations still running, then draw the learning curve; returns its
        path (None when no row was written)."""
        self.collect(wait=True)
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():
            return None
        return plot_run(metrics, self.run_dir / "learning_curve.png", title)

    def close(self) -> None:
        if self.background is not None:
            self.background.close()
        self._logger.close()

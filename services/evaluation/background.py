"""Held-out evaluation beside training: a Ray actor evaluates snapshots of the learner's weights.

Evaluating on the learner between steps (greedy plus ``n_samples`` sampled answers per held-out
prompt) took about half of the learner's wall time in a quickstart run. Here the learner hands
the weights it has just published to an evaluator actor and trains on; the result joins the
step's row when it lands. At most ``max_pending`` snapshots wait, so a slow evaluator holds
training back instead of filling memory with weights. Evaluation never stops training: an
evaluation that raises is logged and dropped, and when the evaluator's *process* dies (killed, or
out of memory) it is started again and the snapshot it held is evaluated once more, so a run's
last evaluation is not lost to a crash of the evaluator.

The run layer supplies the actor's class (a :class:`SnapshotEvaluator` that builds its model
and evaluation from the run's config, :mod:`services.run.evaluator`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class SnapshotEvaluator:
    """The evaluator's side: one model, into which each snapshot is loaded and evaluated.

    Args:
        model: The policy's architecture, on the device the evaluation runs on.
        evaluate: The metric row of a model (a :class:`HeldoutEvaluation`).
    """

    def __init__(self, model: torch.nn.Module, evaluate: Callable[[Any], dict[str, float]]):
        self.model, self.evaluate = model, evaluate

    def evaluate_weights(
        self, step: int, weights: dict[str, torch.Tensor]
    ) -> tuple[int, dict[str, float]]:
        """Load ``weights`` (the policy after ``step``) and evaluate them; the metrics carry
        ``eval_seconds``."""
        t0 = time.perf_counter()
        self.model.load_state_dict(weights)
        metrics = self.evaluate(self.model)
        metrics["eval_seconds"] = time.perf_counter() - t0
        log.info("step %d evaluated in %.1fs", step, metrics["eval_seconds"])
        return step, metrics


class BackgroundEvaluator:
    """Snapshot evaluation in a Ray actor on this node (the learner's ``snapshot_eval``).

    Args:
        worker: The actor's class, a :class:`SnapshotEvaluator` (``ray.remote`` is applied
            here); started again from ``args`` when it dies.
        args: Its constructor's arguments.
        num_gpus: GPUs the actor reserves (``eval.num_gpus``).
        max_pending: Snapshots waiting at most (``eval.max_pending``); one more waits for the
            oldest.

    Raises:
        ValueError: naming ``eval.num_gpus`` when the cluster has fewer GPUs than it asks for.
    """

    def __init__(
        self, worker: type, args: tuple[Any, ...], *, num_gpus: float, max_pending: int
    ) -> None:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0.0)
        if num_gpus > gpus:  # the actor would wait for a GPU forever
            raise ValueError(
                f"eval.num_gpus: {num_gpus:g} for the evaluator; the Ray cluster has {gpus:g} GPUs"
            )
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray
        rex = ray.exceptions
        # The evaluator's process is gone: killed, crashed, or stopped by Ray's memory monitor
        # (which fails the running task with OutOfMemoryError rather than the actor).
        self._died = (
            rex.RayActorError,
            rex.WorkerCrashedError,
            rex.NodeDiedError,
            rex.OutOfMemoryError,
        )
        # On the learner's node: it has the policy's files and the run directory (a
        # docker-compose Ray head, for one, has neither). Pinned when the evaluator needs no GPU
        # (it always fits; a soft preference was measured to land elsewhere); preferred when it
        # does, since the learner's node may have none to spare.
        here = NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=num_gpus > 0
        )
        self._cls = ray.remote(num_cpus=0, num_gpus=num_gpus, max_restarts=0)(worker).options(
            scheduling_strategy=here
        )
        self._args = args
        self.max_pending = max_pending
        self.actor: Any = self._cls.remote(*self._args)
        self.pending: list[tuple[int, Any]] = []  # (step, ref), in submission order
        # The weights of each pending snapshot, kept until it is settled so that one whose
        # evaluator died can be evaluated again (Ray holds them in its object store meanwhile).
        self._weights: dict[int, dict[str, torch.Tensor]] = {}
        self._done: list[tuple[int, dict[str, float]]] = []
        self.failed = 0
        self.restarts = 0
        self._retried: set[int] = set()  # steps already evaluated again once

    def submit(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        while len(self.pending) >= self.max_pending:
            t0 = time.perf_counter()
            self._settle(self.pending[:1])
            log.info("learner waited %.1fs for the evaluator", time.perf_counter() - t0)
        self._weights[step] = weights
        self.pending.append((step, self._start(step)))

    def _start(self, step: int) -> Any:
        if self.actor is None:
            self.actor = self._cls.remote(*self._args)
        return self.actor.evaluate_weights.remote(step, self._weights[step])

    def results(self, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        while wait and self.pending:  # a retried snapshot is pending again
            self._settle(list(self.pending))
        if not wait and self.pending:
            refs = [ref for _, ref in self.pending]
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
            done = set(ready)
            self._settle([(s, r) for s, r in self.pending if r in done])
        out, self._done = sorted(self._done, key=lambda r: r[0]), []
        return out

    def _settle(self, items: list[tuple[int, Any]]) -> None:
        """Collect ``items`` (waiting for them). A snapshot whose evaluator died is submitted
        again to a new one, once (it stays pending); any other failure is logged and its step
        left unevaluated."""
        for step, ref in items:
            self.pending.remove((step, ref))
            try:
                self._done.append(self._ray.get(ref))
            except self._died as exc:
                self.actor = None
                if step in self._retried:
                    self._skip(step, exc)
                    continue
                self._retried.add(step)
                self.restarts += 1
                log.warning("the evaluator died (%s); evaluating step %d again", exc, step)
                self.pending.append((step, self._start(step)))
                continue
            except Exception as exc:  # an evaluation is not worth the run
                self._skip(step, exc)
                continue
            self._weights.pop(step, None)

    def _skip(self, step: int, exc: BaseException) -> None:
        self.failed += 1
        self._weights.pop(step, None)
        log.error("evaluation of step %d failed and is skipped: %s", step, exc)

    def close(self) -> None:
        if self.actor is not None:
            self._ray.kill(self.actor)
            self.actor = None
        self.pending.clear()
        self._weights.clear()

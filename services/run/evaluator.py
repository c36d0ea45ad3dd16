"""Held-out evaluation beside training: a Ray actor evaluates snapshots of the learner's weights.

Evaluating on the learner between steps (greedy plus ``n_samples`` sampled answers per held-out
prompt) took about half of the learner's wall time in a quickstart run. Here the learner hands
the weights it has just published to an evaluator actor and trains on; the result joins the
step's row when it lands. At most ``eval.max_pending`` snapshots wait, so a slow evaluator holds
training back instead of filling memory with weights. A failed evaluation is logged and dropped,
and a dead evaluator is started again for the next snapshot: evaluation never stops training.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from services.run.components import build_evaluator, component_logging, ray_node_id
from services.run.config import RunConfig

log = logging.getLogger(__name__)

EVALUATOR = "evaluator"


class EvalWorker:
    """The evaluator's process (``ray.remote`` is applied by :class:`RayEvaluator`): the
    policy's architecture and tokenizer, the held-out prompts, and one evaluation per call."""

    def __init__(self, cfg: RunConfig, policy_path: str, run_dir: str) -> None:
        from services.policy.model import load_policy

        t0 = time.perf_counter()
        component_logging(Path(run_dir), EVALUATOR, capture_output=True)
        torch.set_num_threads(1)  # cores are shared with the learner and the rollout engines
        model, tokenizer = load_policy(policy_path)
        use_gpu = cfg.eval.num_gpus > 0 and torch.cuda.is_available()
        self.model = model.to("cuda" if use_gpu else "cpu")
        self.evaluate = build_evaluator(cfg, tokenizer)
        log.info(
            "%s ready in %.1fs (pid %d, node %s)",
            EVALUATOR,
            time.perf_counter() - t0,
            os.getpid(),
            ray_node_id(),
        )

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


class RayEvaluator:
    """Snapshot evaluation in a Ray actor (the learner's ``snapshot_eval``).

    Raises ValueError naming ``eval.num_gpus`` when the cluster has fewer GPUs than it asks for.

    Args:
        cfg: the run's config (``eval`` says what to measure and what to reserve).
        policy_path: the policy's directory (architecture, tokenizer).
        run_dir: the evaluator logs to ``run_dir/logs/evaluator.log``.
    """

    def __init__(self, cfg: RunConfig, policy_path: str, run_dir: str | Path) -> None:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0.0)
        if cfg.eval.num_gpus > gpus:  # the actor would wait for a GPU forever
            raise ValueError(
                f"eval.num_gpus: {cfg.eval.num_gpus:g} for the evaluator; the Ray cluster has "
                f"{gpus:g} GPUs"
            )
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray
        # On the learner's node: it has the policy's files and the run directory (a
        # docker-compose Ray head, for one, has neither). Pinned when the evaluator needs no GPU
        # (it always fits; a soft preference was measured to land elsewhere); preferred when it
        # does, since the learner's node may have none to spare.
        here = NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=cfg.eval.num_gpus > 0
        )
        self._cls = ray.remote(num_cpus=0, num_gpus=cfg.eval.num_gpus, max_restarts=0)(
            EvalWorker
        ).options(scheduling_strategy=here)
        self._args = (cfg, policy_path, str(run_dir))
        self.max_pending = cfg.eval.max_pending
        self.actor: Any = self._cls.remote(*self._args)
        self.pending: list[tuple[int, Any]] = []  # (step, ref), in submission order
        self._done: list[tuple[int, dict[str, float]]] = []
        self.failed = 0

    def submit(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        while len(self.pending) >= self.max_pending:
            t0 = time.perf_counter()
            self._settle(self.pending[:1])
            log.info("learner waited %.1fs for the evaluator", time.perf_counter() - t0)
        if self.actor is None:
            self.actor = self._cls.remote(*self._args)
        self.pending.append((step, self.actor.evaluate_weights.remote(step, weights)))

    def results(self, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        if wait:
            self._settle(list(self.pending))
        elif self.pending:
            refs = [ref for _, ref in self.pending]
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
            done = set(ready)
            self._settle([(s, r) for s, r in self.pending if r in done])
        out, self._done = sorted(self._done, key=lambda r: r[0]), []
        return out

    def _settle(self, items: list[tuple[int, Any]]) -> None:
        """Collect ``items`` (waiting for them); a failure is logged and its step left
        unevaluated."""
        for step, ref in items:
            self.pending.remove((step, ref))
            try:
                self._done.append(self._ray.get(ref))
            except Exception as exc:  # an evaluation is not worth the run
                self.failed += 1
                log.error("evaluation of step %d failed and is skipped: %s", step, exc)
                if isinstance(exc, self._ray.exceptions.RayActorError):
                    self.actor = None  # started again for the next snapshot

    def close(self) -> None:
        if self.actor is not None:
            self._ray.kill(self.actor)
            self.actor = None
        self.pending.clear()

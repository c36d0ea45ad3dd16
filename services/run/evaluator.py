"""Wiring a run's held-out evaluation from its config: between steps (:func:`build_evaluator`) or
in the background evaluator actor (:class:`RayEvaluator`); the evaluation itself is in
:mod:`services.evaluation`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from services.evaluation.background import BackgroundEvaluator, SnapshotEvaluator
from services.evaluation.heldout import HeldoutEvaluation
from services.run.config import RunConfig
from services.run.logs import component_logging, ray_node_id

log = logging.getLogger(__name__)

EVALUATOR = "evaluator"


def build_evaluator(cfg: RunConfig, tokenizer: Any) -> HeldoutEvaluation:
    """Held-out evaluation of a policy module, as every run reports it (``cfg.eval``): greedy
    accuracy as ``heldout_accuracy``, pass@k, maj@k and mean response length as ``eval/*``."""
    evaluation = HeldoutEvaluation(cfg.task, cfg.rollout, cfg.eval, tokenizer)
    if evaluation.left_out:
        log.info(
            "evaluation: %d of %d held-out prompts exceed rollout.max_prompt_tokens=%d "
            "and are left out",
            evaluation.left_out,
            evaluation.left_out + len(evaluation.prompts),
            cfg.rollout.max_prompt_tokens,
        )
    return evaluation


class EvalWorker(SnapshotEvaluator):
    """The evaluator's process (``ray.remote`` is applied by :class:`RayEvaluator`): logging to
    ``run_dir/logs/evaluator.log``, the policy's architecture on the evaluation's device, and
    the run's held-out evaluation."""

    def __init__(self, cfg: RunConfig, policy_path: str, run_dir: str) -> None:
        from services.policy.model import load_policy

        t0 = time.perf_counter()
        component_logging(Path(run_dir), EVALUATOR, capture_output=True)
        torch.set_num_threads(1)  # cores are shared with the learner and the rollout engines
        model, tokenizer = load_policy(policy_path)
        use_gpu = cfg.eval.num_gpus > 0 and torch.cuda.is_available()
        super().__init__(model.to("cuda" if use_gpu else "cpu"), build_evaluator(cfg, tokenizer))
        log.info(
            "%s ready in %.1fs (pid %d, node %s)",
            EVALUATOR,
            time.perf_counter() - t0,
            os.getpid(),
            ray_node_id(),
        )


class RayEvaluator(BackgroundEvaluator):
    """Snapshot evaluation in an :class:`EvalWorker` actor, as ``cfg.eval`` says (the learner's
    ``snapshot_eval``).

    Raises ValueError naming ``eval.num_gpus`` when the cluster has fewer GPUs than it asks for.

    Args:
        cfg: the run's config (``eval`` says what to measure and what to reserve).
        policy_path: the policy's directory (architecture, tokenizer).
        run_dir: the evaluator logs to ``run_dir/logs/evaluator.log``.
    """

    def __init__(self, cfg: RunConfig, policy_path: str, run_dir: str | Path) -> None:
        super().__init__(
            EvalWorker,
            (cfg, policy_path, str(run_dir)),
            num_gpus=cfg.eval.num_gpus,
            max_pending=cfg.eval.max_pending,
        )

"""The synchronous trainer: rollout -> selection -> learner step -> weights back, lock-step.

This is `d3s train CONFIG` and the on-policy baseline of the asynchronous service. It uses the
same pieces the service does (RolloutWorker, selector.curate, LearnerEngine) in one process;
with learner.world_size > 1, rank 0 generates and every rank takes its shard of the batch.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from learner import distributed as D
from learner.batch import LearnerBatch
from learner.engine import LearnerEngine
from selector.curate import curate
from services.common.seeding import step_seed
from services.policy.model import load_policy
from services.policy.evaluate import evaluate_greedy
from services.rollout.hf_engine import HFRolloutEngine
from services.rollout.worker import RolloutWorker
from services.run.config import RunConfig
from services.run.prepare import prepare_policy
from services.run.progress import StepProgress
from services.tasks.source import TaskSource
from services.telemetry.run_log import RunLogger, plot_run
from services.transport.schema import CuratedBatch
from services.weightsync.checksum import state_checksum, verify_sync

log = logging.getLogger(__name__)


def to_learner_batch(b: CuratedBatch) -> LearnerBatch:
    return LearnerBatch.from_arrays(b.input_ids, b.prompt_lengths, b.seq_lengths, b.behav_logp, b.advantages)


class SyncTrainer:
    def __init__(self, cfg: RunConfig, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.train.run_dir)
        self.preset = cfg.algorithm.build_preset()

    def run(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to train.total_steps, or stop after step ``stop_at`` (the schedule still spans
        total_steps, so a stopped run resumes exactly where an uninterrupted one would be)."""
        if self.cfg.learner.world_size > 1 and not torch.distributed.is_initialized():
            from learner.launch import spawn_local

            return spawn_local(self.cfg.learner.world_size, _rank_main, self.cfg, str(self.run_dir), stop_at)[0]
        return self._run(stop_at)

    def _run(self, stop_at: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        policy_path = prepare_policy(cfg)
        model, tokenizer = load_policy(policy_path)
        rollout_model = copy.deepcopy(model)
        learner = LearnerEngine(model, cfg.learner, cfg.train.total_steps)
        lead = learner.rank == 0
        ckpt_dir = self.run_dir / "checkpoints"
        totals = {"learner_tokens_total": 0.0, "learner_seconds_total": 0.0, "learner_forward_tokens_total": 0.0,
                  "skipped_batches": 0.0, "samples_total": 0.0}
        start = 0
        if cfg.train.resume:
            state = learner.load_checkpoint(ckpt_dir)
            if state is not None:
                start = int(state["step"])
                totals.update(state.get("totals", {}))
        tasks = TaskSource.from_config(cfg.task)
        engine = HFRolloutEngine(rollout_model, tokenizer, cfg.rollout.max_new_tokens, cfg.rollout.temperature,
                                 cfg.rollout.top_p)
        worker = RolloutWorker(engine, tasks, cfg.rollout.samples_per_prompt, name="sync")
        self._publish(learner, worker, version=start)
        logger = RunLogger(self.run_dir) if lead else None
        if lead:
            log.info("run %s: preset=%s loss=%s, %d prompts x %d samples per step (%d samples), steps %d..%d, run dir %s",
                     cfg.name, self.preset.name, cfg.learner.policy_loss, cfg.rollout.prompts_per_step,
                     cfg.rollout.samples_per_prompt, cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
                     start, cfg.train.total_steps, self.run_dir)
        heldout = tasks.heldout()
        last_acc = None
        if lead and start == 0:
            last_acc = evaluate_greedy(rollout_model, tokenizer, heldout, cfg.rollout.max_new_tokens)
            logger.log(0, {"heldout_accuracy": last_acc, **totals})
            log.info("step 0: held-out accuracy %.3f", last_acc)
        bar = StepProgress(cfg.train.total_steps, start, enabled=lead and cfg.train.progress_bar)
        t_run = time.perf_counter()
        try:
            end = cfg.train.total_steps if stop_at is None else min(stop_at, cfg.train.total_steps)
            for step in range(start, end):
                row = self._step(step, learner, worker, totals)
                if lead:
                    if (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.total_steps:
                        last_acc = evaluate_greedy(rollout_model, tokenizer, heldout, cfg.rollout.max_new_tokens)
                        row["heldout_accuracy"] = last_acc
                    row["verifier_errors"] = float(tasks.verifier_errors)
                    logger.log(step + 1, row)
                    bar.update(step + 1, row, last_acc)
                if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == end:
                    learner.save_checkpoint(ckpt_dir, step + 1, {"totals": totals, "preset": self.preset.name})
        finally:
            bar.close()
            if logger:
                logger.close()
        summary = {"final_heldout_accuracy": last_acc, "steps": cfg.train.total_steps,
                   "wall_seconds": time.perf_counter() - t_run, **totals}
        if lead:
            rollout_model.save_pretrained(self.run_dir / "final_policy")
            tokenizer.save(self.run_dir / "final_policy")
            plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "learning_curve.png", f"{cfg.name} ({self.preset.name})")
            log.info("done: held-out accuracy %.3f, %d learner tokens, %.1f learner s; curve %s", last_acc or 0.0,
                     totals["learner_tokens_total"], totals["learner_seconds_total"], self.run_dir / "learning_curve.png")
        return summary

    def _step(self, step: int, learner: LearnerEngine, worker: RolloutWorker, totals: dict[str, float]) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        seed = step_seed(cfg.train.seed, step)
        payload = None
        if learner.rank == 0:
            groups, gen_s = worker.produce(cfg.rollout.prompts_per_step, seed)
            res = curate(groups, self.preset, step, cfg.train.total_steps, cfg.algorithm.adv_eps,
                         torch.Generator().manual_seed(seed))
            payload = (res.batch, res.stats, gen_s)
        batch, stats, gen_s = D.broadcast_object(payload)
        row: dict[str, float] = {**stats, "gen_seconds": gen_s, "policy_version": float(worker.version)}
        if batch is None:
            totals["skipped_batches"] += 1
            log.info("step %d: every kept advantage is zero; batch skipped (%d so far)", step, totals["skipped_batches"])
        else:
            _, token_ratio = self.preset.ratios(step, cfg.train.total_steps)
            m = learner.train_step(to_learner_batch(batch), self.preset, token_ratio,
                                   torch.Generator().manual_seed(seed + 1))
            totals["learner_tokens_total"] += m["tokens_kept"]
            totals["learner_forward_tokens_total"] += m["tokens_forward"]
            totals["learner_seconds_total"] += m["learner_seconds"]
            totals["samples_total"] += m["samples_in"]
            row.update(m)
            self._publish(learner, worker, version=step + 1)
        row.update(totals)
        row["step_seconds"] = time.perf_counter() - t0
        return row

    @staticmethod
    def _publish(learner: LearnerEngine, worker: RolloutWorker, version: int) -> None:
        state = learner.state_dict_cpu()
        if learner.rank == 0:
            digest = state_checksum(state)
            worker.load_weights(state, version)
            verify_sync(digest, worker.engine.model, version)


def _rank_main(cfg: RunConfig, run_dir: str, stop_at: int | None) -> dict[str, Any]:
    return SyncTrainer(cfg, Path(run_dir))._run(stop_at)



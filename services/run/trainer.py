"""The synchronous trainer: rollout -> selection -> learner step -> weights back, lock-step.

This is ``d3s train CONFIG`` and the on-policy baseline of the asynchronous service. It uses the
same pieces the service does (the rollout worker, :func:`selector.curate.curate`, the learner
engine, the run reporter) in one process; with learner.world_size > 1, rank 0 generates and
every rank takes its shard of the batch.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from learner import distributed
from learner.batch import LearnerBatch
from learner.engine import LearnerEngine
from selector.curate import curate
from selector.dynamic import DynamicSamplingExhausted, StepDraws, split_flat
from services.common.seeding import step_seed
from services.policy.lora import apply_lora, is_lora, load_synced, synced_state
from services.policy.model import load_policy, save_policy
from services.rollout.worker import RolloutWorker
from services.run.build_rollout import build_worker, engine_dtype
from services.run.config import RunConfig
from services.run.evaluator import build_evaluator
from services.run.prepare import prepare_policy
from services.run.progress import StepProgress, warmstart_progress
from services.telemetry.reporter import RunReporter
from services.transport.records import ScoredGroup
from services.weightsync.checksum import state_checksum, verify_sync

log = logging.getLogger(__name__)

_TOTALS = (
    "learner_tokens_total",
    "learner_seconds_total",
    "learner_forward_tokens_total",
    "skipped_batches",
    "samples_total",
    "weight_sync_seconds_total",
    "weight_sync_bytes_total",
)


class SyncTrainer:
    def __init__(self, cfg: RunConfig, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.train.run_dir)
        self.preset = cfg.algorithm.build_preset()

    def run(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to train.total_steps, or stop after step ``stop_at`` (the schedules still span
        their horizon, so a stopped run resumes exactly where an uninterrupted one would be)."""
        if self.cfg.learner.world_size > 1 and not torch.distributed.is_initialized():
            from learner.launch import spawn_local

            return spawn_local(
                self.cfg.learner.world_size, _rank_main, self.cfg, str(self.run_dir), stop_at
            )[0]
        return self._run(stop_at)

    def _run(self, stop_at: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        total = cfg.train.total_steps
        torch.manual_seed(cfg.train.seed)
        with warmstart_progress(
            enabled=cfg.train.progress_bar and distributed.rank() == 0
        ) as progress:
            policy_path = prepare_policy(cfg, progress)
            model, tokenizer = load_policy(policy_path)
        rollout_model = copy.deepcopy(model)
        if cfg.learner.lora is not None:  # base plus adapter; each publish fills the adapter
            rollout_model = apply_lora(rollout_model, cfg.learner.lora)
        learner = LearnerEngine(model, cfg.learner, cfg.train.horizon)
        learner.set_sync_dtype(engine_dtype(cfg))
        lead = learner.rank == 0
        ckpt_dir = self.run_dir / "checkpoints"
        totals = dict.fromkeys(_TOTALS, 0.0)
        start = 0
        if cfg.train.resume:
            state = learner.load_checkpoint(ckpt_dir)
            if state is not None:
                start = int(state["step"])
                totals.update(state.get("totals", {}))
        worker = build_worker(cfg, rollout_model, tokenizer, "sync", model_path=policy_path)
        self._publish(learner, worker, rollout_model, version=start)
        reporter = self._reporter(tokenizer, rollout_model, start, totals) if lead else None
        bar = StepProgress(total, start, enabled=lead and cfg.train.progress_bar)
        t_run = time.perf_counter()
        end = total if stop_at is None else min(stop_at, total)
        try:
            for step in range(start, end):
                row = self._step(step, learner, worker, rollout_model, totals)
                if reporter is not None:
                    row["verifier_errors"] = float(worker.tasks.verifier_errors)
                    row["prompts_skipped_too_long"] = float(worker.prompts_skipped_too_long)
                    if worker.overlong is not None:
                        row["responses_overlong"] = float(worker.responses_overlong)
                    if worker.prefilter is not None:
                        row["prompts_prefiltered"] = float(worker.prompts_prefiltered)
                        if worker.last_prefilter_report is not None:
                            row.update(worker.last_prefilter_report.metrics())
                    reporter.record(step + 1, row)
                    bar.update(step + 1, row, reporter.last_eval.get("heldout_accuracy"))
                if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == end:
                    learner.save_checkpoint(
                        ckpt_dir, step + 1, {"totals": totals, "preset": self.preset.name}
                    )
        finally:
            bar.close()
            if reporter is not None:
                reporter.close()
            # vLLM runs in processes of its own, which would outlive an interrupted run.
            shutdown = getattr(worker.engine, "shutdown", None)
            if shutdown is not None:
                shutdown()
        last_eval = reporter.last_eval if reporter is not None else {}
        summary = {
            "final_heldout_accuracy": last_eval.get("heldout_accuracy"),
            **last_eval,
            "steps": total,
            "wall_seconds": time.perf_counter() - t_run,
            **totals,
        }
        if reporter is not None:
            save_policy(rollout_model, tokenizer, self.run_dir / "final_policy")
            png = reporter.finish(f"{cfg.name} ({self.preset.name})")
            log.info(
                "done: held-out %s, %d learner tokens, %.1f learner s; curve %s",
                last_eval,
                totals["learner_tokens_total"],
                totals["learner_seconds_total"],
                png,
            )
        return summary

    def _reporter(
        self, tokenizer: Any, rollout_model: torch.nn.Module, start: int, totals: dict[str, float]
    ) -> RunReporter:
        """The run's metric log, evaluating ``rollout_model`` on the held-out prompts when due;
        a fresh run's step 0 is recorded (and evaluated) here."""
        cfg = self.cfg
        evaluate = build_evaluator(cfg, tokenizer)
        reporter = RunReporter(
            self.run_dir,
            cfg.train.total_steps,
            cfg.train.eval_every,
            lambda: evaluate(rollout_model),
            resume_step=start,
            **cfg.logger_kwargs(),
        )
        log.info(
            "run %s: preset=%s, %d prompts x %d samples per step (%d samples), steps "
            "%d..%d, run dir %s",
            cfg.name,
            self.preset.name,
            cfg.rollout.prompts_per_step,
            cfg.rollout.samples_per_prompt,
            cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
            start,
            cfg.train.total_steps,
            self.run_dir,
        )
        if start == 0:
            reporter.record(0, dict(totals))
        return reporter

    def _step(
        self,
        step: int,
        learner: LearnerEngine,
        worker: RolloutWorker,
        rollout_model: torch.nn.Module,
        totals: dict[str, float],
    ) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        seed = step_seed(cfg.train.seed, step)
        payload = None
        if learner.rank == 0:
            try:
                groups, gen_s, drawn = self._draw(step, worker, seed)
            except DynamicSamplingExhausted as exc:
                payload = exc  # every rank raises it, none waits for a batch that never comes
            else:
                res = curate(
                    groups,
                    self.preset,
                    step,
                    cfg.train.horizon,
                    cfg.algorithm.adv_eps,
                    torch.Generator().manual_seed(seed),
                )
                payload = (res.rows, {**res.stats, **drawn}, res.token_ratio, gen_s)
        payload = distributed.broadcast_object(payload)
        if isinstance(payload, DynamicSamplingExhausted):
            raise payload
        rows, stats, token_ratio, gen_s = payload
        row: dict[str, float] = {
            **stats,
            "gen_seconds": gen_s,
            "policy_version": float(worker.version),
        }
        if rows is None:
            totals["skipped_batches"] += 1
            log.info(
                "step %d: every kept advantage is zero; batch skipped (%d so far)",
                step,
                totals["skipped_batches"],
            )
        else:
            m = learner.train_step(
                LearnerBatch.from_rows(rows),
                self.preset,
                token_ratio,
                torch.Generator().manual_seed(seed + 1),
            )
            totals["learner_tokens_total"] += m["tokens_kept"]
            totals["learner_forward_tokens_total"] += m["tokens_forward"]
            totals["learner_seconds_total"] += m["learner_seconds"]
            totals["samples_total"] += m["samples_in"]
            row.update(m)
            sync_s, sync_bytes = self._publish(learner, worker, rollout_model, version=step + 1)
            # as d3s run's learner reports them (with LoRA: the adapter's bytes)
            row.update(weight_sync_seconds=sync_s, weight_sync_bytes=float(sync_bytes))
            totals["weight_sync_seconds_total"] += sync_s
            totals["weight_sync_bytes_total"] += sync_bytes
        row.update(totals)
        row["step_seconds"] = time.perf_counter() - t0
        return row

    def _draw(
        self, step: int, worker: RolloutWorker, seed: int
    ) -> tuple[list[ScoredGroup], float, dict[str, float]]:
        """The step's groups, generation seconds and draw metrics. With dynamic sampling, rounds
        are generated with the step's weights until ``prompts_per_step`` groups have reward
        variance (zero-variance ones dropped), at most ``max_draws_factor x prompts_per_step``
        groups in all; the first round uses the step's seed, so it is the round a run without
        dynamic sampling generates.

        Raises:
            DynamicSamplingExhausted: the bound was reached with the batch not full.
        """
        need = self.cfg.rollout.prompts_per_step
        ds = self.cfg.algorithm.dynamic_sampling
        draws = StepDraws(need, ds.max_draws(need) if ds.enabled else None, step)
        kept: list[ScoredGroup] = []
        gen_s, rounds = 0.0, 0
        while len(kept) < need:
            size = need if rounds == 0 else draws.next_round(len(kept))
            groups, s = worker.produce(size, seed if rounds == 0 else step_seed(seed, rounds))
            gen_s += s
            rounds += 1
            signal, flat = split_flat(groups) if draws.filtering else (groups, [])
            draws.keep(signal)
            kept.extend(signal)
            draws.drop(flat)
        if rounds > 1 or draws.dropped:
            log.info(
                "step %d: dynamic sampling drew %d groups in %d rounds, dropped %d with no "
                "reward variance",
                step,
                draws.drawn,
                rounds,
                draws.dropped,
            )
        return draws.take(kept), gen_s, {**draws.metrics(), "gen_rounds": float(rounds)}

    @staticmethod
    def _publish(
        learner: LearnerEngine,
        worker: RolloutWorker,
        rollout_model: torch.nn.Module,
        version: int,
    ) -> tuple[float, int]:
        """Version ``version`` into the engine and into ``rollout_model``, the copy that
        evaluation and the final policy read: the HF engine samples from that copy itself, a
        vLLM engine holds its weights in its own workers, so the copy is loaded beside it.
        Returns the sync's seconds (host copy, load, check) and the bytes it moved."""
        t0 = time.perf_counter()
        state = learner.state_dict_cpu()
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        if learner.rank == 0:
            if worker.engine.model is None:
                # Loaded here from the same tensors: nothing crossed a boundary to checksum.
                worker.load_weights(state, version)
                if is_lora(rollout_model):
                    load_synced(rollout_model, state)
                else:
                    rollout_model.load_state_dict(state)
                return time.perf_counter() - t0, nbytes
            digest = state_checksum(state)
            worker.load_weights(state, version)
            model = worker.engine.model
            verify_sync(digest, synced_state(model) if is_lora(model) else model, version)
        return time.perf_counter() - t0, nbytes


def _rank_main(cfg: RunConfig, run_dir: str, stop_at: int | None) -> dict[str, Any]:
    return SyncTrainer(cfg, Path(run_dir))._run(stop_at)

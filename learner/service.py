"""The learner service: curated batches from Redis in, one optimizer step and weights v+1 out.

It is the consumer group ``learner`` on the batches stream. Batch ``s`` is trained with the
weights of version ``s`` (the learner has taken exactly ``s`` steps), after which version
``s + 1`` is published to the rollout actors and ONE atomic step acknowledges the batch, copies
it into the replay log (:mod:`learner.replay`), and writes the counters, the metrics and the
trained ledger. A batch whose step is below the learner's is a duplicate from before a crash:
acknowledged, counted, not trained (reading the stream and settling such batches is
:mod:`learner.inbox`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from learner.batch import LearnerBatch
from learner.engine import LearnerEngine
from learner.inbox import GROUP, BatchInbox
from learner.replay import BatchGap, ReplayLog
from learner.settings import LearnerServiceSettings
from services.common.seeding import step_seed
from services.policy.limits import ModelLimits
from services.telemetry.reporter import BackgroundEval, RunReporter
from services.transport.bundle import Transport
from services.transport.queue import Delivery
from services.transport.records import CuratedBatch
from services.transport.waiting import Stalled, WaitPolicy
from services.weightsync.base import WeightPublisher

log = logging.getLogger(__name__)

# The policy module -> held-out metrics.
Evaluator = Callable[[torch.nn.Module], dict[str, float]]
# The policy module -> the directory it was exported to.
Exporter = Callable[[torch.nn.Module], Path]


_TOTALS = (
    "learner_tokens_total",
    "learner_forward_tokens_total",
    "learner_seconds_total",
    "samples_total",
    "weight_sync_seconds_total",
    "weight_sync_bytes_total",
    "learner_wait_seconds_total",
)

__all__ = ["GROUP", "BatchGap", "LearnerService", "LearnerStalled"]


class LearnerStalled(Stalled):
    """No batch arrived within ``service.wait_timeout_s``."""


class LearnerService:
    """Trains the batches of a run in step order and publishes the weights after each.

    Args:
        transport: the run's Redis.
        engine: the DeepSpeed learner engine, or with world size > 1 rank 0's
            ``learner.multirank.LeaderEngine`` (the other ranks follow it).
        settings: the run-level settings.
        consumer: consumer name in the ``learner`` group.
        evaluate: held-out evaluation of the policy (every ``eval_every`` steps); None: none.
        snapshot_eval: evaluates a snapshot of the published weights beside training instead
            of ``evaluate`` between steps.
        export: writes the final policy; None: no export.
        publisher: hands each version to the rollout engines (the configured weight-sync
            transport, :mod:`services.weightsync`); None publishes nothing but the audit trail.
            A resumed learner republishes its checkpoint's version with ``rewind=True``.
        limits: the model's vocabulary and context; a batch outside them is dead-lettered.
        logger_kwargs: passed to the run's metric logger (TensorBoard on/off, W&B settings).
        block_ms: how long one read waits for a batch.
        reclaim_idle_ms: batches another learner consumer held this long are taken over.
    """

    def __init__(
        self,
        transport: Transport,
        engine: LearnerEngine,
        settings: LearnerServiceSettings,
        consumer: str = "learner-0",
        *,
        evaluate: Evaluator | None = None,
        snapshot_eval: BackgroundEval | None = None,
        export: Exporter | None = None,
        publisher: WeightPublisher | None = None,
        limits: ModelLimits | None = None,
        logger_kwargs: Mapping[str, Any] | None = None,
        block_ms: int = 1000,
        reclaim_idle_ms: int = 30_000,
    ) -> None:
        self.t = transport
        self.engine = engine
        self.settings = settings
        self.consumer = consumer
        self.ckpt_dir = Path(settings.run_dir) / "checkpoints"
        self.evaluate = evaluate
        self.snapshot_eval = snapshot_eval
        self._snapshot: tuple[int, dict[str, torch.Tensor]] | None = None
        self._sync_bytes = 0  # of the last version published
        self.export = export
        self.publisher = publisher
        self.logger_kwargs = dict(logger_kwargs or {})
        self.waiter = WaitPolicy(transport.control, settings.wait_timeout_s, error=LearnerStalled)
        self.replay = ReplayLog(transport)
        self.inbox = BatchInbox(
            transport,
            consumer,
            self.waiter,
            limits,
            self.replay.stream,
            self.ckpt_dir,
            block_ms=block_ms,
            reclaim_idle_ms=reclaim_idle_ms,
        )
        self.totals: dict[str, float] = dict.fromkeys(_TOTALS, 0.0)
        self.reporter: RunReporter | None = None
        self._last_ckpt_step = -1
        self._idle_since: float | None = None  # replayed steps wait for nothing
        self.summary: dict[str, Any] = {
            "batches_trained": 0,
            "batches_replayed": 0,
            "batches_duplicate": 0,
        }

    @property
    def step(self) -> int:
        """Steps trained so far, which is also the version of the weights the learner holds."""
        return self.engine.steps_done

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Train until ``total_steps``; then export, plot and mark the run done.

        Returns a summary (steps, held-out metrics, totals, counts). Returns early, without the
        export, when ``should_stop`` or the run's stop flag says so.
        """
        self.waiter.should_stop = should_stop
        self.t.queue.ensure_consumer_group(self.t.keys.batches, GROUP)
        self._resume()
        evaluate = (lambda: self.evaluate(self.engine.module)) if self.evaluate else None
        self.reporter = RunReporter(
            self.settings.run_dir,
            self.settings.total_steps,
            self.settings.eval_every,
            evaluate,
            self._to_redis,
            resume_step=self.step,
            background=self.snapshot_eval,
            snapshot=self.snapshot,
            eval_sink=self._eval_to_redis,
            **self.logger_kwargs,
        )
        try:
            # The checkpoint's version first (it may be older than what was published before a
            # crash), then the replayed steps publish the versions after it in order.
            self._publish(rewind=True)
            self._replay()
            if self.step == 0:
                self.reporter.record(0, dict(self.totals))
            if self._train_loop():
                self._finish()
        finally:
            self.reporter.close()
        return {
            **self.summary,
            **self.totals,
            **self.reporter.last_eval,
            "steps": self.step,
            "final_heldout_accuracy": self.reporter.last_eval.get("heldout_accuracy"),
        }

    def _train_loop(self) -> bool:
        self._idle_since = time.perf_counter()
        queue = self.inbox.pending()
        while self.step < self.settings.total_steps:
            if self.waiter.stop_reason() is not None:
                log.info("learner %s: stop requested at step %d", self.consumer, self.step)
                return False
            if not queue:
                queue = self.inbox.take()
                if not queue:
                    self.waiter.check_stall(
                        lambda: (
                            f"learner: no curated batch arrived for {self.settings.wait_timeout_s:.0f}"
                            f"s at step {self.step}; is the selector running?"
                        )
                    )
                    continue
            queue.sort(key=lambda d: d.record.step if isinstance(d.record, CuratedBatch) else -1)
            self._handle(queue.pop(0))
            self.waiter.progressed()
            self._idle_since = time.perf_counter()
        return True

    def _handle(self, d: Delivery) -> None:
        settled = self.inbox.settle(d, self.step)
        if settled == "duplicate":
            self.summary["batches_duplicate"] += 1
        elif settled == "invalid":
            self.summary["batches_rejected"] = self.summary.get("batches_rejected", 0) + 1
        if settled is not None:
            return
        batch = d.record
        assert isinstance(batch, CuratedBatch)  # settle() took every other record
        row = self._train(batch)
        result = self.t.queue.commit(
            self.t.keys.batches,
            GROUP,
            [d.entry_id],
            outputs=[(self.t.keys.replay, batch.batch_id, batch)],
            incr={"batches_consumed": 1, "groups_trained": len(batch.group_ids)},
            hset={
                self.t.keys.metrics: _numeric(row),
                self.t.keys.trained: {batch.batch_id: batch.step},
            },
            consumer=self.consumer,
        )
        if not result.committed:
            raise RuntimeError(
                f"learner {self.consumer}: batch {batch.batch_id} was taken over by another "
                "learner consumer while this one trained it; run exactly one learner per run"
            )
        if batch.batch_id in result.written:
            self.replay.remember(batch.step, result.written[batch.batch_id])
        self.summary["batches_trained"] += 1
        self._after_step(row)

    # ---- one step ------------------------------------------------------------------------------

    def _train(self, batch: CuratedBatch) -> dict[str, Any]:
        """Train ``batch`` and publish the new weights; returns the step's row."""
        # Idle time: from the end of the previous step (or the start) until this batch was in hand.
        waited = time.perf_counter() - self._idle_since if self._idle_since is not None else 0.0
        self.totals["learner_wait_seconds_total"] += waited
        depth = self.t.backlogs()
        gen = torch.Generator().manual_seed(step_seed(self.settings.seed, batch.step) + 1)
        m = self.engine.train_step(
            LearnerBatch.from_rows(batch), self.settings.preset, batch.token_ratio, gen
        )
        sync_s = self._publish(rewind=False)
        self.totals["learner_tokens_total"] += m["tokens_kept"]
        self.totals["learner_forward_tokens_total"] += m["tokens_forward"]
        self.totals["learner_seconds_total"] += m["learner_seconds"]
        self.totals["samples_total"] += m["samples_in"]
        self.totals["weight_sync_seconds_total"] += sync_s
        self.totals["weight_sync_bytes_total"] += self._sync_bytes
        log.info(
            "learner: step %d/%d trained %s: %d samples, %d/%d tokens kept, loss %.4f, reward "
            "%.3f, %.2fs + weight sync %.3fs",
            self.step,
            self.settings.total_steps,
            batch.batch_id,
            int(m["samples_in"]),
            int(m["tokens_kept"]),
            int(m["tokens_valid"]),
            m["loss"],
            batch.stats.get("reward_mean", math.nan),
            m["learner_seconds"],
            sync_s,
        )
        return {
            **batch.stats,
            **m,
            **self.totals,
            "weight_sync_seconds": sync_s,
            "weight_sync_bytes": float(self._sync_bytes),  # with LoRA: the adapter's
            "learner_wait_seconds": waited,
            "queue_groups": float(depth["groups"]),
            "queue_batches": float(depth["batches"]),
            "dead_letters": float(depth["dead"]),
            "policy_version_mean": float(batch.policy_versions.mean()),
            "learner_version": float(self.step),
        }

    def _after_step(self, row: dict[str, Any]) -> None:
        step = self.step
        assert self.reporter is not None
        # The row before the checkpoint: a kill in between loses neither (the step is retrained
        # from the replay log and its row written again); the other order could lose the row.
        self.reporter.record(step, row)
        if step % self.settings.checkpoint_every == 0 or step == self.settings.total_steps:
            self._checkpoint()

    def _publish(self, rewind: bool) -> float:
        """Publish the current weights as version ``self.step``; returns the seconds it took."""
        t0 = time.perf_counter()
        due = (
            self.snapshot_eval is not None
            and self.reporter is not None
            and self.reporter.due(self.step)
        )
        weights = None
        if self.publisher is not None:
            # A collective broadcast sends from the training device; the others take a host copy.
            from_device = self.publisher.from_device
            weights = self.engine.device_weights() if from_device else self.engine.state_dict_cpu()
            self.publisher.publish(self.step, weights, rewind=rewind)
            self._sync_bytes = _nbytes(weights)
            if from_device:
                weights = None
        if due:
            # A host copy just published is the snapshot to evaluate: no second gather.
            self._snapshot = (
                self.step,
                weights if weights is not None else self.engine.state_dict_cpu(),
            )
        else:
            self._snapshot = None
        self.t.state.record_published_version(self.step)
        return time.perf_counter() - t0

    def snapshot(self, step: int) -> dict[str, torch.Tensor]:
        """The weights after ``step`` on the host, for an evaluation beside training."""
        if self._snapshot is not None and self._snapshot[0] == step:
            weights, self._snapshot = self._snapshot[1], None
            return weights
        return self.engine.state_dict_cpu()

    def _to_redis(self, step: int, row: dict[str, Any]) -> None:
        self.t.state.set_metrics(_numeric(row))
        self.t.state.record_step(step, row)

    def _eval_to_redis(self, step: int, row: dict[str, Any]) -> None:
        self.t.state.set_metrics(_numeric(row))
        self.t.state.merge_step(step, row)

    # ---- checkpoints, resume, replay -----------------------------------------------------------

    def _checkpoint(self) -> None:
        step = self.step
        if step == self._last_ckpt_step:
            return
        path = self.engine.save_checkpoint(
            self.ckpt_dir, step, {"totals": dict(self.totals), "preset": self.settings.preset.name}
        )
        self._last_ckpt_step = step
        self.replay.checkpointed(step)
        self.t.state.record_checkpoint(step, str(path or self.ckpt_dir))

    def _resume(self) -> None:
        state = self.engine.load_checkpoint(self.ckpt_dir)
        if state is None:
            log.info(
                "learner %s: no checkpoint in %s; starting at step 0", self.consumer, self.ckpt_dir
            )
            return
        self.totals.update(
            {k: float(v) for k, v in state.get("totals", {}).items() if k in _TOTALS}
        )
        self._last_ckpt_step = self.step
        log.info("learner %s: resumed at step %d from %s", self.consumer, self.step, self.ckpt_dir)

    def _replay(self) -> None:
        """Retrain the batches committed after the checkpoint the engine was loaded from."""
        start = self.step
        for entry_id, batch in self.replay.missing(self.step, str(self.ckpt_dir)):
            row = self._train(batch)
            self.t.state.set_metrics(_numeric(row))
            self.replay.remember(batch.step, entry_id)
            self.summary["batches_replayed"] += 1
            self._after_step(row)
        if self.step > start:
            log.warning(
                "learner %s: retrained steps %d..%d from the replay stream (trained "
                "after the last checkpoint, before the restart)",
                self.consumer,
                start,
                self.step - 1,
            )

    # ---- the end -------------------------------------------------------------------------------

    def _finish(self) -> None:
        self._checkpoint()
        if self.export is not None:
            log.info("learner: final policy written to %s", self.export(self.engine.module))
        assert self.reporter is not None
        png = self.reporter.finish(self.settings.title)
        if png is not None:
            log.info("learner: learning curve %s", png)
        self.t.control.mark_done()
        log.info(
            "learner: done after %d steps; %.0f learner tokens, %.1f learner s, held-out %s",
            self.step,
            self.totals["learner_tokens_total"],
            self.totals["learner_seconds_total"],
            self.reporter.last_eval or "n/a",
        )


def _nbytes(weights: Any) -> int:
    """Bytes a version carries (a gathered source: as its layout says)."""
    if isinstance(weights, Mapping):
        return sum(t.numel() * t.element_size() for t in weights.values())
    return sum(
        math.prod(shape) * torch.empty(0, dtype=dt).element_size()
        for shape, dt in weights.layout().values()
    )


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}

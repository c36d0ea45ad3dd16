"""The learner service: curated batches from Redis in, one optimizer step and weights v+1 out.

It is the consumer group ``learner`` on ``{ns}:batches``. Batch ``s`` is trained with the
weights of version ``s`` (the learner has taken exactly ``s`` steps), after which version
``s + 1`` is published to the rollout actors and ONE atomic step acknowledges the batch, copies it
into the replay stream, and writes the counters, the metrics hash and ``{ns}:trained``.

Resume without losing steps: checkpoints are taken every ``train.checkpoint_every`` steps, but
the batches trained after the last one were already acknowledged. So each commit also keeps the
batch in ``{ns}:replay`` (trimmed at every checkpoint); a restarted learner loads the checkpoint
and retrains the replayed batches it is missing before it reads new ones. A batch whose step is
below the learner's is a duplicate from before a crash: acknowledged, counted, not trained.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from learner.engine import LearnerEngine
from services.common.seeding import step_seed
from services.policy.model import save_policy
from services.policy.evaluate import evaluate_greedy
from services.run.config import RunConfig
from services.run.trainer import to_learner_batch
from services.tasks.source import TaskSource
from services.telemetry.run_log import RunLogger, plot_run
from services.transport.schema import CuratedBatch, decode
from services.transport.streams import Delivery, Transport
from services.weightsync.checksum import state_checksum

log = logging.getLogger(__name__)

GROUP = "learner"

# (version, state_dict, checksum, rewind) -> None; rewind: a resumed learner republishes an
# older version than it had published before the crash.
WeightPublisher = Callable[[int, dict[str, torch.Tensor], str, bool], None]

_TOTALS = ("learner_tokens_total", "learner_forward_tokens_total", "learner_seconds_total",
           "samples_total", "weight_sync_seconds_total")  # fmt: skip


def replay_key(transport: Transport) -> str:
    """Stream of batches trained since the last checkpoint (what a resumed learner retrains)."""
    return f"{transport.namespace}:replay"


def trained_key(transport: Transport) -> str:
    """Hash batch_id -> step at which the learner trained it."""
    return f"{transport.namespace}:trained"


def weight_versions_key(transport: Transport) -> str:
    """List of every weight version the learner published, in order (an audit trail)."""
    return f"{transport.namespace}:weight_versions"


class LearnerStalled(RuntimeError):
    """No batch arrived within ``service.wait_timeout_s``."""


class BatchGap(RuntimeError):
    """A batch is ahead of the learner: batches in between were lost (the message says how)."""


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


class LearnerService:
    """Trains the batches of a run in step order and publishes the weights after each.

    Args:
        transport: the run's transport.
        engine: the DeepSpeed learner engine, or with world size > 1 rank 0's
            ``learner.multirank.LeaderEngine`` (the other ranks follow it).
        cfg: the run config.
        consumer: consumer name in the ``learner`` group.
        run_dir: checkpoints, metrics.jsonl, TensorBoard, final_policy and the learning curve go
            here (default ``cfg.train.run_dir``).
        tokenizer: the policy's tokenizer, for held-out evaluation and the final export; without
            it neither happens.
        publish_weights: hands each version to the rollout actors (the Ray weight store under
            ``d3s run``); None publishes nothing but the audit trail.
        block_ms: how long one read waits for a batch.
        reclaim_idle_ms: batches another learner consumer held this long are taken over.
    """

    def __init__(
        self,
        transport: Transport,
        engine: LearnerEngine,
        cfg: RunConfig,
        consumer: str = "learner-0",
        *,
        run_dir: Path | str | None = None,
        tokenizer: Any = None,
        publish_weights: WeightPublisher | None = None,
        block_ms: int = 1000,
        reclaim_idle_ms: int = 30_000,
    ) -> None:
        self.t = transport
        self.engine = engine
        self.cfg = cfg
        self.consumer = consumer
        self.run_dir = Path(run_dir or cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tokenizer = tokenizer
        self.publish_weights = publish_weights
        self.block_ms = block_ms
        self.reclaim_idle_ms = reclaim_idle_ms
        self.preset = cfg.algorithm.build_preset()
        self.total_steps = cfg.train.total_steps
        self.totals: dict[str, float] = dict.fromkeys(_TOTALS, 0.0)
        self.last_accuracy: float | None = None
        self._heldout = TaskSource.from_config(cfg.task).heldout() if tokenizer is not None else []
        self._logger: RunLogger | None = None
        self._last_ckpt_step = -1
        self._replay_ids: dict[int, str] = {}  # step -> replay entry id, for trimming
        self.summary: dict[str, Any] = {"batches_trained": 0, "batches_replayed": 0,
                                        "batches_duplicate": 0}  # fmt: skip

    @property
    def step(self) -> int:
        """Steps trained so far, which is also the version of the weights the learner holds."""
        return self.engine.steps_done

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Train until ``total_steps``; then export, plot and mark the run done.

        Returns a summary (steps, accuracy, totals, counts). Returns early, without the
        export, when ``should_stop`` or the run's stop flag says so.
        """
        self.t.ensure_consumer_group(self.t.batches_stream, GROUP)
        self._resume()
        self._logger = RunLogger(self.run_dir)
        try:
            # The checkpoint's version first (it may be older than what was published before a
            # crash), then the replayed steps publish the versions after it in order.
            self._publish(rewind=True)
            self._replay()
            if self.step == 0 and self._heldout:
                self._evaluate_and_log(0, {**self.totals})
            finished = self._train_loop(should_stop)
            if finished:
                self._finish()
        finally:
            self._logger.close()
        return {**self.summary, **self.totals, "steps": self.step,
                "final_heldout_accuracy": self.last_accuracy}  # fmt: skip

    def _train_loop(self, should_stop: Callable[[], bool] | None) -> bool:
        timeout = self.cfg.service.wait_timeout_s
        waited_since = time.monotonic()
        queue = self.t.read(self.t.batches_stream, GROUP, self.consumer, 1000, pending=True)
        if queue:
            log.info("learner %s: %d batches were pending from before a restart", self.consumer,
                     len(queue))
        last_reclaim = time.monotonic()
        while self.step < self.total_steps:
            if (should_stop and should_stop()) or self.t.stop_reason() is not None:
                log.info("learner %s: stop requested at step %d", self.consumer, self.step)
                return False
            if not queue and time.monotonic() - last_reclaim > 5.0:
                last_reclaim = time.monotonic()
                queue = self.t.reclaim(self.t.batches_stream, GROUP, self.consumer,
                                       self.reclaim_idle_ms, count=100)
            if not queue:
                queue = self.t.read(self.t.batches_stream, GROUP, self.consumer, 1,
                                    block_ms=self.block_ms)
            if not queue:
                if self.t.paused():
                    waited_since = time.monotonic()
                elif time.monotonic() - waited_since > timeout:
                    raise LearnerStalled(
                        f"learner: no curated batch arrived for {timeout:.0f}s at step "
                        f"{self.step}; is the selector running?"
                    )
                continue
            queue.sort(key=lambda d: d.record.step if isinstance(d.record, CuratedBatch) else -1)
            delivery = queue.pop(0)
            self._handle(delivery)
            waited_since = time.monotonic()
        return True

    def _handle(self, d: Delivery) -> None:
        batch = d.record
        if not isinstance(batch, CuratedBatch):
            self.t.dead_letter(self.t.batches_stream, GROUP, self.consumer, d.entry_id,
                               f"a {type(batch).__name__} record in the batches stream")
            return
        if batch.step < self.step:
            # Trained before a crash (its commit or a replay covered it): acknowledge only.
            self.t.commit(self.t.batches_stream, GROUP, [d.entry_id], incr={"batches_duplicate": 1},
                          consumer=self.consumer)
            self.summary["batches_duplicate"] += 1
            log.warning("learner: batch %s (step %d) was already trained; acknowledged as a "
                        "duplicate", batch.batch_id, batch.step)
            return
        if batch.step > self.step:
            raise BatchGap(
                f"learner at step {self.step} received batch {batch.batch_id} of step "
                f"{batch.step}: the batches in between are gone (neither queued nor in "
                f"{replay_key(self.t)}). Checkpoints in {self.ckpt_dir} and the Redis state of "
                f"namespace {self.t.namespace!r} do not belong together; start a fresh run "
                "directory and namespace, or restore the matching checkpoint"
            )
        row, metrics = self._train(batch)
        result = self.t.commit(
            self.t.batches_stream, GROUP, [d.entry_id],
            outputs=[(replay_key(self.t), batch.batch_id, batch)],
            incr={"batches_consumed": 1, "groups_trained": len(batch.group_ids)},
            hset={self.t.metrics_key: metrics, trained_key(self.t): {batch.batch_id: batch.step}},
            consumer=self.consumer,
        )  # fmt: skip
        if not result.committed:
            raise RuntimeError(
                f"learner {self.consumer}: batch {batch.batch_id} was taken over by another "
                "learner consumer while this one trained it; run exactly one learner per run"
            )
        if batch.batch_id in result.written:
            self._replay_ids[batch.step] = result.written[batch.batch_id]
        self.summary["batches_trained"] += 1
        self._after_step(row)

    # ---- one step ------------------------------------------------------------------------------

    def _train(self, batch: CuratedBatch) -> tuple[dict[str, Any], dict[str, float]]:
        """Train ``batch`` and publish the new weights; returns (log row, metrics for Redis)."""
        step = batch.step
        gen = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, step) + 1)
        m = self.engine.train_step(to_learner_batch(batch), self.preset, batch.token_ratio, gen)
        sync_s = self._publish(rewind=False)
        self.totals["learner_tokens_total"] += m["tokens_kept"]
        self.totals["learner_forward_tokens_total"] += m["tokens_forward"]
        self.totals["learner_seconds_total"] += m["learner_seconds"]
        self.totals["samples_total"] += m["samples_in"]
        self.totals["weight_sync_seconds_total"] += sync_s
        row: dict[str, Any] = {
            **batch.stats, **m, **self.totals, "weight_sync_seconds": sync_s,
            "policy_version_mean": float(batch.policy_versions.mean()),
            "learner_version": float(self.step),
        }  # fmt: skip
        metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        log.info(
            "learner: step %d/%d trained %s: %d samples, %d/%d tokens kept, loss %.4f, reward "
            "%.3f, %.2fs + weight sync %.3fs", self.step, self.total_steps, batch.batch_id,
            int(m["samples_in"]), int(m["tokens_kept"]), int(m["tokens_valid"]), m["loss"],
            batch.stats.get("reward_mean", math.nan), m["learner_seconds"], sync_s,
        )  # fmt: skip
        return row, metrics

    def _after_step(self, row: dict[str, Any]) -> None:
        step = self.step
        if step % self.cfg.train.checkpoint_every == 0 or step == self.total_steps:
            self._checkpoint()
        if step % self.cfg.train.eval_every == 0 or step == self.total_steps:
            self._evaluate_and_log(step, row)
        else:
            assert self._logger is not None
            self._logger.log(step, row)

    def _publish(self, rewind: bool) -> float:
        """Publish the current weights as version ``self.step``; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.publish_weights is not None:
            state = self.engine.state_dict_cpu()
            self.publish_weights(self.step, state, state_checksum(state), rewind)
        self.t.client.rpush(weight_versions_key(self.t), self.step)
        self.t.client.hset(self.t.metrics_key, "learner_version", self.step)
        return time.perf_counter() - t0

    def _evaluate_and_log(self, step: int, row: dict[str, Any]) -> None:
        if self._heldout:
            t0 = time.perf_counter()
            self.last_accuracy = evaluate_greedy(self.engine.module, self.tokenizer, self._heldout,
                                                 self.cfg.rollout.max_new_tokens)
            row = {**row, "heldout_accuracy": self.last_accuracy}
            self.t.client.hset(self.t.metrics_key, mapping={
                "heldout_accuracy": repr(self.last_accuracy), "heldout_step": step})
            log.info("learner: step %d held-out accuracy %.3f (%d prompts, %.1fs)", step,
                     self.last_accuracy, len(self._heldout), time.perf_counter() - t0)
        assert self._logger is not None
        self._logger.log(step, row)

    # ---- checkpoints, resume, replay -----------------------------------------------------------

    def _checkpoint(self) -> None:
        step = self.step
        if step == self._last_ckpt_step:
            return
        self.engine.save_checkpoint(self.ckpt_dir, step, {"totals": dict(self.totals),
                                                          "preset": self.preset.name})
        self._last_ckpt_step = step
        # What the checkpoint holds need not be replayed any more.
        done = [s for s in self._replay_ids if s < step]
        if done:
            last = self._replay_ids[max(done)]
            self.t.client.xtrim(replay_key(self.t), minid=_next_id(last), approximate=False)
            for s in done:
                del self._replay_ids[s]

    def _resume(self) -> None:
        state = self.engine.load_checkpoint(self.ckpt_dir)
        if state is None:
            log.info("learner %s: no checkpoint in %s; starting at step 0", self.consumer,
                     self.ckpt_dir)
            return
        self.totals.update({k: float(v) for k, v in state.get("totals", {}).items() if k in _TOTALS})
        self._last_ckpt_step = self.step
        log.info("learner %s: resumed at step %d from %s", self.consumer, self.step, self.ckpt_dir)

    def _replay(self) -> None:
        """Retrain the batches committed after the checkpoint the engine was loaded from."""
        entries = self.t.client.xrange(replay_key(self.t), "-", "+")
        if not entries:
            return
        start = self.step
        for raw_id, fields in entries:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            batch = decode(fields)
            if not isinstance(batch, CuratedBatch) or batch.step < self.step:
                continue
            if batch.step > self.step:
                raise BatchGap(
                    f"replay of {replay_key(self.t)} jumps from step {self.step} to "
                    f"{batch.step}: the checkpoint in {self.ckpt_dir} is older than the replay "
                    "stream covers"
                )
            row, metrics = self._train(batch)
            self.t.client.hset(self.t.metrics_key, mapping=metrics)
            self._replay_ids[batch.step] = entry_id
            self.summary["batches_replayed"] += 1
            self._after_step(row)
        if self.step > start:
            log.warning("learner %s: retrained steps %d..%d from the replay stream (trained "
                        "after the last checkpoint, before the restart)", self.consumer, start,
                        self.step - 1)

    # ---- the end -------------------------------------------------------------------------------

    def _finish(self) -> None:
        self._checkpoint()
        if self.tokenizer is not None:
            out = save_policy(self.engine.module, self.tokenizer, self.run_dir / "final_policy")
            log.info("learner: final policy written to %s", out)
        metrics_path = self.run_dir / "metrics.jsonl"
        if metrics_path.exists():
            png = plot_run(metrics_path, self.run_dir / "learning_curve.png",
                           f"{self.cfg.name} ({self.preset.name}, {self.cfg.service.mode})")
            log.info("learner: learning curve %s", png)
        self.t.mark_done()
        log.info("learner: done after %d steps; %.0f learner tokens, %.1f learner s, held-out "
                 "accuracy %s", self.step, self.totals["learner_tokens_total"],
                 self.totals["learner_seconds_total"],
                 f"{self.last_accuracy:.3f}" if self.last_accuracy is not None else "n/a")

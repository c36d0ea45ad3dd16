"""The learner's side of the batches stream: reading batches (its own pending ones first, then
new ones or those a dead learner consumer held) and settling those it must not train.

A batch is settled here, without training, when it is not a batch record (dead-lettered), when
its step is below the learner's (a duplicate from before a crash: acknowledged), or when the
model cannot take it (dead-lettered with the reason). A batch above the learner's step means
the batches in between are lost: :class:`~learner.replay.BatchGap`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from learner.replay import BatchGap
from services.policy.limits import ModelLimits
from services.transport.bundle import Transport
from services.transport.queue import Delivery
from services.transport.records import CuratedBatch
from services.transport.waiting import WaitPolicy

log = logging.getLogger(__name__)

GROUP = "learner"


class BatchInbox:
    """Reads the batches stream as ``consumer`` of the ``learner`` group.

    Args:
        transport: the run's Redis.
        consumer: consumer name in the ``learner`` group.
        waiter: the learner's wait policy (it says when to look for a dead consumer's batches).
        limits: the model's vocabulary and context; a batch outside them is dead-lettered.
        replay_stream, ckpt_dir: named in the error when batches are missing.
        block_ms: how long one read waits for a batch.
        reclaim_idle_ms: batches another learner consumer held this long are taken over.
    """

    def __init__(
        self,
        transport: Transport,
        consumer: str,
        waiter: WaitPolicy,
        limits: ModelLimits | None,
        replay_stream: str,
        ckpt_dir: Path,
        *,
        block_ms: int = 1000,
        reclaim_idle_ms: int = 30_000,
    ) -> None:
        self.t = transport
        self.consumer = consumer
        self.waiter = waiter
        self.limits = limits
        self.replay_stream = replay_stream
        self.ckpt_dir = ckpt_dir
        self.block_ms = block_ms
        self.reclaim_idle_ms = reclaim_idle_ms

    def pending(self) -> list[Delivery]:
        """The batches this consumer read before a restart and never acknowledged."""
        queue = self.t.queue.read(self.t.keys.batches, GROUP, self.consumer, 1000, pending=True)
        if queue:
            log.info(
                "learner %s: %d batches were pending from before a restart",
                self.consumer,
                len(queue),
            )
        return queue

    def take(self) -> list[Delivery]:
        """Batches a dead learner consumer held (now and then), else new ones."""
        if self.waiter.reclaim_due():
            reclaimed = self.t.queue.reclaim(
                self.t.keys.batches, GROUP, self.consumer, self.reclaim_idle_ms, count=100
            )
            if reclaimed:
                return reclaimed
        return self.t.queue.read(
            self.t.keys.batches, GROUP, self.consumer, 1, block_ms=self.block_ms
        )

    def settle(self, d: Delivery, step: int) -> str | None:
        """None when ``d`` holds the batch of ``step``, to train; otherwise how it was settled
        here: ``"foreign"`` (not a batch record) or ``"invalid"`` (dead-lettered),
        ``"duplicate"`` (acknowledged). Raises :class:`BatchGap` for a batch past ``step``."""
        batch = d.record
        if not isinstance(batch, CuratedBatch):
            self._dead_letter(d, f"a {type(batch).__name__} record in the batches stream")
            return "foreign"
        if batch.step < step:
            # Trained before a crash (its commit or a replay covered it): acknowledge only.
            self.t.queue.commit(
                self.t.keys.batches,
                GROUP,
                [d.entry_id],
                incr={"batches_duplicate": 1},
                consumer=self.consumer,
            )
            log.warning(
                "learner: batch %s (step %d) was already trained; acknowledged as a duplicate",
                batch.batch_id,
                batch.step,
            )
            return "duplicate"
        if batch.step > step:
            raise BatchGap(
                f"learner at step {step} received batch {batch.batch_id} of step "
                f"{batch.step}: the batches in between are gone (neither queued nor in "
                f"{self.replay_stream}). Checkpoints in {self.ckpt_dir} and the Redis state of "
                f"namespace {self.t.namespace!r} do not belong together; start a fresh run "
                "directory and namespace, or restore the matching checkpoint"
            )
        problem = self.invalid(batch)
        if problem:
            # A bad batch must not crash the learner on every restart. The selector checks the
            # same limits, so this is a batch it did not make; the real one may still come.
            self._dead_letter(d, problem)
            log.error("learner: batch %s dead-lettered: %s", batch.batch_id, problem)
            return "invalid"
        return None

    def invalid(self, batch: CuratedBatch) -> str:
        """Why the model cannot train ``batch`` ('' when it can)."""
        limits = self.limits
        if limits is None:
            return ""
        top = int(batch.input_ids.max()) if batch.input_ids.size else 0
        if top >= limits.vocab_size:
            return f"token id {top} is outside the model's vocabulary of {limits.vocab_size}"
        longest = int(batch.seq_lengths.max()) if batch.seq_lengths.size else 0
        if limits.max_positions is not None and longest > limits.max_positions:
            return (
                f"a row of {longest} tokens exceeds the model's context of {limits.max_positions}"
            )
        return ""

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        self.t.queue.dead_letter(self.t.keys.batches, GROUP, self.consumer, d.entry_id, reason)

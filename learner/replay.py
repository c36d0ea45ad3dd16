"""The learner's replay log: the batches trained since its last checkpoint.

Checkpoints are taken every ``checkpoint_every`` steps, but the batches trained after the last
one were already acknowledged in the batches stream. So every learner commit also copies its
batch into the replay stream (in the same atomic step), and a checkpoint trims what it covers.
A restarted learner loads its checkpoint and retrains the replayed batches it is missing before
it reads new ones: a crash between checkpoints loses no training step.
"""

from __future__ import annotations

from services.transport.bundle import Transport
from services.transport.records import CuratedBatch, decode


class BatchGap(RuntimeError):
    """A batch is ahead of the learner: batches in between were lost (the message says how)."""


class ReplayLog:
    """The replay stream of one run, as the learner sees it."""

    def __init__(self, transport: Transport) -> None:
        self.t = transport
        self._entry_of_step: dict[int, str] = {}

    @property
    def stream(self) -> str:
        return self.t.keys.replay

    def missing(self, step: int, checkpoint_dir: str) -> list[tuple[str, CuratedBatch]]:
        """The replayed batches from ``step`` on, in order, as (entry id, batch).

        Raises :class:`BatchGap` when the stream skips a step after ``step`` (the checkpoint is
        older than what the stream covers).
        """
        out: list[tuple[str, CuratedBatch]] = []
        expected = step
        for entry_id, fields in self.t.state.replay_entries():
            batch = decode(fields)
            if not isinstance(batch, CuratedBatch) or batch.step < expected:
                continue
            if batch.step > expected:
                raise BatchGap(
                    f"replay of {self.stream} jumps from step {expected} to {batch.step}: the "
                    f"checkpoint in {checkpoint_dir} is older than the replay stream covers"
                )
            out.append((entry_id, batch))
            expected += 1
        return out

    def remember(self, step: int, entry_id: str) -> None:
        """The replay entry of the batch trained at ``step``."""
        self._entry_of_step[step] = entry_id

    def checkpointed(self, step: int) -> None:
        """A checkpoint at ``step`` holds every earlier step: trim their entries."""
        covered = [s for s in self._entry_of_step if s < step]
        if covered:
            self.t.state.trim_replay(self._entry_of_step[max(covered)])
            for s in covered:
                del self._entry_of_step[s]

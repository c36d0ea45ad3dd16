"""What a rollout actor needs of a run (the entry point builds it from the run config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RolloutSettings:
    """Run-level settings of the rollout actors.

    ``prompts_per_step`` is shared by ``num_actors`` actors; ``lock_step`` (``mode: sync``)
    makes each actor generate exactly one round per weight version; ``max_group_backlog`` is
    the groups stream's bound (backpressure); ``wait_timeout_s`` bounds every wait;
    ``max_staleness`` lets an actor start a round only if its groups can still be trained;
    ``inflight_updates`` loads new weights between decoding steps of a round.
    """

    prompts_per_step: int
    samples_per_prompt: int
    num_actors: int
    total_steps: int
    seed: int
    lock_step: bool
    max_group_backlog: int
    wait_timeout_s: float
    max_staleness: int = 1
    inflight_updates: bool = False

"""A rollout worker: prompts -> G samples each -> verifier rewards -> ScoredGroup records.

Plain Python, so the synchronous trainer calls it in-process and the Ray actor wraps it.
"""

from __future__ import annotations

import time

import numpy as np

from services.rollout.hf_engine import HFRolloutEngine
from services.tasks.source import TaskSource
from services.transport.schema import ScoredGroup


class RolloutWorker:
    def __init__(self, engine: HFRolloutEngine, tasks: TaskSource, samples_per_prompt: int, name: str = "rollout-0"):
        self.engine = engine
        self.tasks = tasks
        self.samples_per_prompt = samples_per_prompt
        self.name = name
        self._seq = 0

    @property
    def version(self) -> int:
        return self.engine.version

    def load_weights(self, state_dict, version: int) -> None:
        self.engine.load_state_dict(state_dict, version)

    def produce(self, n_prompts: int, seed: int) -> tuple[list[ScoredGroup], float]:
        """Generate and score n_prompts groups with a seed; returns (groups, generation seconds)."""
        rng = np.random.default_rng(seed)
        prompts = self.tasks.train_prompts(n_prompts, rng)
        g = self.samples_per_prompt
        rb = self.engine.generate(prompts, g, seed)
        rewards = self.tasks.score(prompts, rb.texts, g)
        now = time.time()
        groups = []
        for i, p in enumerate(prompts):
            rows = slice(i * g, (i + 1) * g)
            self._seq += 1
            groups.append(
                ScoredGroup(
                    group_id=f"{self.name}-{seed}-{self._seq}",
                    prompt_id=p.prompt_id,
                    policy_version=rb.policy_version,
                    prompt=np.asarray(rb.prompt_ids[i], dtype=np.int32),
                    responses=rb.responses[rows].numpy().astype(np.int32),
                    response_lengths=rb.response_lengths[rows].numpy().astype(np.int32),
                    behav_logp=rb.behav_logp[rows].numpy().astype(np.float32),
                    rewards=rewards[i],
                    created_at=now,
                    actor=self.name,
                    task=p.task,
                )
            )
        return groups, rb.gen_seconds

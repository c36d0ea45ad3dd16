"""A rollout worker: prompts -> rendered prompt text -> G samples each -> verifier rewards ->
ScoredGroup records.

Plain Python, so the synchronous trainer calls it in-process and the Ray actor wraps it; it drives
any :class:`~services.rollout.engine.RolloutEngine` (HF or vLLM).

Prompt length. With ``max_prompt_tokens`` set, a drawn prompt whose rendered text encodes to more
tokens is skipped, counted in ``prompts_skipped_too_long``, and replaced by a fresh draw, so a
round still has its ``n_prompts`` groups. Nothing is ever truncated: a cut prompt would train
the policy on a question it was never asked.
"""

from __future__ import annotations

import time

import numpy as np

from services.policy.tokenizer import encode_text
from services.rollout.engine import RolloutEngine
from services.tasks.base import Prompt
from services.tasks.prompting import PromptFormat
from services.tasks.source import TaskSource
from services.transport.records import ScoredGroup

# A round gives up when it has drawn this many times its prompt count without enough that fit.
MAX_DRAWS_PER_PROMPT = 50


class RolloutWorker:
    """Generates and scores groups with ``engine`` on prompts of ``tasks``.

    Args:
        engine: The sampler (its tokenizer encodes the rendered prompts).
        tasks: Training prompts and verifiers.
        samples_per_prompt: G, responses per prompt.
        name: Prefix of the group ids (the actor's name).
        prompt_format: How a question becomes the prompt text (None: as it is).
        max_prompt_tokens: Longest rendered prompt, in tokens; longer ones are skipped and
            counted (None: no limit).

    Attributes:
        prompts_skipped_too_long: Prompts skipped so far for exceeding ``max_prompt_tokens``.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tasks: TaskSource,
        samples_per_prompt: int,
        name: str = "rollout-0",
        *,
        prompt_format: PromptFormat | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.engine = engine
        self.tasks = tasks
        self.samples_per_prompt = samples_per_prompt
        self.name = name
        self.prompt_format = prompt_format or PromptFormat()
        self.max_prompt_tokens = max_prompt_tokens
        self.prompts_skipped_too_long = 0
        self._seq = 0

    @property
    def version(self) -> int:
        return self.engine.version

    def load_weights(self, state_dict, version: int) -> None:
        self.engine.load_state_dict(state_dict, version)

    def draw_prompts(self, n_prompts: int, rng: np.random.Generator) -> list[Prompt]:
        """``n_prompts`` training prompts, rendered, each within ``max_prompt_tokens``.

        Raises:
            RuntimeError: when ``MAX_DRAWS_PER_PROMPT * n_prompts`` draws did not give enough
                prompts that fit (the limit is below almost every prompt of the task).
        """
        tokenizer = self.engine.tokenizer
        kept: list[Prompt] = []
        drawn = 0
        while len(kept) < n_prompts:
            if drawn >= MAX_DRAWS_PER_PROMPT * n_prompts:
                raise RuntimeError(
                    f"rollout.max_prompt_tokens={self.max_prompt_tokens}: only {len(kept)} of "
                    f"{drawn} prompts drawn fit; raise the limit or filter the task's data"
                )
            batch = self.tasks.train_prompts(n_prompts - len(kept), rng)
            drawn += len(batch)
            for p in self.prompt_format.apply(tokenizer, batch):
                if self.max_prompt_tokens is not None and (
                    len(encode_text(tokenizer, p.text)) > self.max_prompt_tokens
                ):
                    self.prompts_skipped_too_long += 1
                    continue
                kept.append(p)
        return kept

    def produce(self, n_prompts: int, seed: int) -> tuple[list[ScoredGroup], float]:
        """Generate and score n_prompts groups with a seed; returns (groups, generation seconds)."""
        rng = np.random.default_rng(seed)
        prompts = self.draw_prompts(n_prompts, rng)
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

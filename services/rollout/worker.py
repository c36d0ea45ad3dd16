"""A rollout worker: prompts -> rendered prompt text -> G samples each -> verifier rewards (plus
the ``reward.overlong`` shaping, :mod:`services.rollout.reward`) -> ScoredGroup records.

Plain Python, so the synchronous trainer calls it in-process and the Ray actor wraps it; it drives
any :class:`~services.rollout.engine.RolloutEngine` (HF or vLLM).

Prompt length. With ``max_prompt_tokens`` set, a drawn prompt whose rendered text encodes to more
tokens is skipped, counted in ``prompts_skipped_too_long``, and replaced by a fresh draw, so a
round still has its ``n_prompts`` groups. Nothing is ever truncated: a cut prompt would train
the policy on a question it was never asked.

Prompt selection. With a :class:`~services.rollout.prefilter.Prefilter`, a drawn prompt (that
fits) is skipped with its predicted-zero-variance skip probability, counted in
``prompts_prefiltered``, and replaced by a fresh draw, until the round drew
``max_draws_factor`` times its prompts; the rest of the round is then filled without skipping.
The skip coins come from their own generator seeded by the round's seed, so a round is
reproducible and the prompts drawn with the prefilter off are unchanged.
"""

from __future__ import annotations

import time

import numpy as np

from services.policy.tokenizer import encode_text
from services.rollout.engine import NO_STOP, BetweenSteps, RolloutEngine
from services.rollout.prefilter import Prefilter, RoundReport
from services.rollout.reward import OverlongConfig
from services.tasks.base import Prompt
from services.tasks.prompting import PromptFormat
from services.tasks.source import TaskSource
from services.transport.records import ScoredGroup

# A round gives up when it has drawn this many times its prompt count without enough that fit.
MAX_DRAWS_PER_PROMPT = 50
# Entropy mixed into a round's seed for the prefilter's skip coins (a stream of their own).
_SKIP_STREAM = 0x5E1EC7


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
        prefilter: Pre-rollout prompt selection (None: every drawn prompt that fits is used).
        overlong: Overlong shaping added to the verifier's rewards (None: the verifier's
            rewards as they are); the prefilter sees the verifier's, its right and wrong.

    Attributes:
        prompts_skipped_too_long: Prompts skipped so far for exceeding ``max_prompt_tokens``.
        prompts_prefiltered: Prompts skipped so far by ``prefilter``.
        last_prefilter_report: What ``prefilter`` saw of the latest round (None: no round yet,
            or no prefilter).
        responses_overlong: Responses so far whose reward ``overlong`` lowered (in its buffer,
            beyond ``max_len`` or truncated).
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
        prefilter: Prefilter | None = None,
        overlong: OverlongConfig | None = None,
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
        self.prefilter = prefilter
        self.prompts_prefiltered = 0
        self.last_prefilter_report: RoundReport | None = None
        self.overlong = overlong
        self.responses_overlong = 0
        self._seq = 0

    @property
    def version(self) -> int:
        return self.engine.version

    def load_weights(self, state_dict, version: int) -> None:
        self.engine.load_state_dict(state_dict, version)

    def draw_prompts(
        self, n_prompts: int, rng: np.random.Generator, skip_rng: np.random.Generator | None = None
    ) -> list[Prompt]:
        """``n_prompts`` training prompts, rendered, each within ``max_prompt_tokens`` and each
        past the prefilter's coin (``skip_rng``, default ``rng``) while the round's draws are
        within ``prefilter.config.max_draws_factor * n_prompts``.

        Raises:
            RuntimeError: when ``MAX_DRAWS_PER_PROMPT * n_prompts`` draws past the prefilter's
                did not give enough prompts that fit (the limit is below almost every prompt of
                the task).
        """
        tokenizer = self.engine.tokenizer
        coins = skip_rng if skip_rng is not None else rng
        max_filtered = (
            self.prefilter.config.max_draws_factor * n_prompts if self.prefilter is not None else 0
        )
        kept: list[Prompt] = []
        drawn = 0
        while len(kept) < n_prompts:
            if drawn >= MAX_DRAWS_PER_PROMPT * n_prompts + max_filtered:
                raise RuntimeError(
                    f"rollout.max_prompt_tokens={self.max_prompt_tokens}: only {len(kept)} of "
                    f"{drawn} prompts drawn fit; raise the limit or filter the task's data"
                )
            filtering = drawn < max_filtered
            batch = self.tasks.train_prompts(n_prompts - len(kept), rng)
            drawn += len(batch)
            fits = [
                p
                for p in self.prompt_format.apply(tokenizer, batch)
                if self.max_prompt_tokens is None
                or len(encode_text(tokenizer, p.text)) <= self.max_prompt_tokens
            ]
            self.prompts_skipped_too_long += len(batch) - len(fits)
            if filtering and self.prefilter is not None and fits:
                # The weight version is the learner step the round belongs to: the p's adapt
                # once per step, whichever actor draws first at a new one.
                chances = self.prefilter.skip_chances([p.prompt_id for p in fits], self.version)
                passed = [p for p, c in zip(fits, chances, strict=True) if coins.random() >= c]
                self.prompts_prefiltered += len(fits) - len(passed)
                fits = passed
            kept.extend(fits)
        return kept

    def produce(
        self, n_prompts: int, seed: int, between_steps: BetweenSteps | None = None
    ) -> tuple[list[ScoredGroup], float]:
        """Generate and score n_prompts groups with a seed; returns (groups, generation seconds).

        ``between_steps`` runs between the engine's decoding steps (in-flight weight updates).
        """
        rng = np.random.default_rng(seed)
        prompts = self.draw_prompts(n_prompts, rng, np.random.default_rng([seed, _SKIP_STREAM]))
        g = self.samples_per_prompt
        step = self.version  # before generating: in-flight updates may move it meanwhile
        rb = self.engine.generate(prompts, g, seed, between_steps=between_steps)
        versions = None if rb.token_versions is None else rb.token_versions.numpy()
        lengths = rb.response_lengths.numpy()
        verified = self.tasks.score(prompts, rb.texts, g)
        if self.prefilter is not None:
            self.last_prefilter_report = self.prefilter.observe(
                [p.prompt_id for p in prompts], verified, step
            )
        rewards = self._shaped(verified, lengths, rb.stop_token.numpy() == NO_STOP)
        now = time.time()
        groups = []
        for i, p in enumerate(prompts):
            rows = slice(i * g, (i + 1) * g)
            self._seq += 1
            oldest, token_versions = group_versions(
                None if versions is None else versions[rows], lengths[rows], rb.policy_version
            )
            groups.append(
                ScoredGroup(
                    group_id=f"{self.name}-{seed}-{self._seq}",
                    prompt_id=p.prompt_id,
                    policy_version=oldest,
                    prompt=np.asarray(rb.prompt_ids[i], dtype=np.int32),
                    responses=rb.responses[rows].numpy().astype(np.int32),
                    response_lengths=rb.response_lengths[rows].numpy().astype(np.int32),
                    behav_logp=rb.behav_logp[rows].numpy().astype(np.float32),
                    rewards=rewards[i],
                    created_at=now,
                    actor=self.name,
                    task=p.task,
                    token_versions=token_versions,
                    source=p.source,
                )
            )
        return groups, rb.gen_seconds

    def _shaped(self, verified: np.ndarray, lengths: np.ndarray, cut: np.ndarray) -> np.ndarray:
        """The training rewards [B, G]: the verifier's plus the overlong shaping, if any."""
        if self.overlong is None:
            return verified
        shaping = self.overlong.shaping(lengths, cut).reshape(verified.shape)
        self.responses_overlong += int((shaping < 0).sum())
        return (verified + shaping).astype(np.float32)


def group_versions(
    versions: np.ndarray | None, lengths: np.ndarray, batch_version: int
) -> tuple[int, np.ndarray | None]:
    """A group's ``policy_version`` (its oldest token's version) and its ``token_versions``
    (None when one version sampled the whole group).

    Args:
        versions: int [G, T], the batch's token versions for this group's rows (0 at
            padding), or None when the whole batch came from ``batch_version``.
        lengths: int [G], response lengths.
    """
    if versions is None:
        return batch_version, None
    inside = versions[np.arange(versions.shape[1])[None, :] < lengths[:, None]]
    if not inside.size or inside.min() == inside.max():
        return (int(inside[0]) if inside.size else batch_version), None
    return int(inside.min()), versions.astype(np.int32)

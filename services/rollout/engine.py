"""What every rollout engine offers, and the batch it returns.

Two engines derive from :class:`RolloutEngine`: :class:`services.rollout.hf_engine.HFRolloutEngine`
(a plain sampling loop over any Hugging Face causal LM, CPU or GPU) and
:class:`services.rollout.vllm_engine.VLLMRolloutEngine` (vLLM, imported only when chosen). Both
return a :class:`RolloutBatch` whose ``behav_logp`` is the log-prob of each sampled token under
the distribution it was drawn from, which the learner's importance weights divide by.

:class:`RolloutEngine` does once what does not depend on how tokens are sampled: the sampling
settings and stop tokens, prompt encoding and its checks, the refusal to generate from a
half-loaded model, and the assembly of the sampled rows into a :class:`RolloutBatch` with each
token's weight version. An engine adds how it picks tokens (``_rule``), how it samples
(``_sample``) and how it loads weights.

The functions here are shared by both engines too: sampling-setting checks, the stop tokens
(by default EOS and the chat template's end-of-turn token, from
:func:`services.policy.tokenizer.default_stop_token_ids`, which greedy evaluation uses too) and
the packing of per-row token lists into right-padded tensors.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from services.policy.tokenizer import decode_ids, default_stop_token_ids, encode_text, special_ids
from services.tasks.base import Prompt

# Returned in ``RolloutBatch.stop_token`` for a row that the length limit ended.
NO_STOP = -1


@dataclass
class RolloutBatch:
    """``n`` sampled responses for each of ``B`` prompts; ``N = B * n`` rows.

    Rows are grouped by prompt: rows ``i*n .. i*n+n-1`` belong to ``prompts[i]``.
    A response is its tokens up to and including the first stop token (the stop token counts
    as a response token, so the learner is trained to emit it), or ``max_new_tokens`` tokens if
    no stop token came. ``T`` is the longest response in the batch (``<= max_new_tokens``).

    Attributes:
        prompts: The B prompts.
        prompt_ids: B unpadded token lists (no special tokens).
        responses: int64 [N, T], right-padded with the tokenizer's pad id.
        response_lengths: int64 [N], valid tokens per row (>= 1).
        behav_logp: float32 [N, T], log-prob of each sampled token under the sampling
            distribution (temperature and top-p applied); 0 at padding.
        response_mask: bool [N, T], True on the first ``response_lengths[i]`` tokens.
        texts: N decoded responses (special tokens dropped).
        stop_token: int64 [N], the stop token id that ended each row, or ``NO_STOP`` (-1)
            where ``max_new_tokens`` did.
        n: Samples per prompt.
        policy_version: The engine's weight version when the batch started: the version of its
            oldest token.
        token_versions: int64 [N, T], the weight version that sampled each token (0 at
            padding), where weights changed during generation (in-flight updates); ``None``
            when every token came from ``policy_version``.
        gen_seconds: Wall time of generation.
    """

    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    responses: torch.Tensor
    response_lengths: torch.Tensor
    behav_logp: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    stop_token: torch.Tensor
    n: int = 1
    policy_version: int = 0
    token_versions: torch.Tensor | None = None
    gen_seconds: float = field(default=0.0, compare=False)

    def __len__(self) -> int:
        return self.responses.shape[0]


# Called by an engine between two decoding steps of a generation; it may load newer weights
# into the engine (in place, KV caches kept), which then samples the following tokens.
BetweenSteps = Callable[[], None]


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Raise ValueError naming the bad sampling setting."""
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature} (greedy decoding is the engine's greedy())"
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def resolve_stop_token_ids(tokenizer, stop_token_ids: Sequence[int] | None) -> list[int]:
    """``stop_token_ids`` checked against the vocabulary, or the defaults when ``None``.

    Raises:
        ValueError: on an empty list or an id outside the tokenizer's vocabulary.
    """
    if stop_token_ids is None:
        return default_stop_token_ids(tokenizer)
    ids = [int(i) for i in stop_token_ids]
    if not ids:
        raise ValueError("stop_token_ids is empty; generation could not stop")
    vocab = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"stop_token_ids {bad} outside the tokenizer's vocabulary of {vocab}")
    return list(dict.fromkeys(ids))


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> int:
    """Length of ``tokens`` up to and including the first stop token (all of it if none)."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return i + 1
    return len(tokens)


def pack_rows(
    tokens: Sequence[Sequence[int]],
    logps: Sequence[Sequence[float]],
    stop_ids: Sequence[int],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad N responses, each already cut after its first stop token.

    Args:
        tokens: N non-empty token lists.
        logps: N lists of behaviour log-probs, one per token.
        stop_ids: Token ids that end a response.
        pad_id: Fill for positions past a row's end.

    Returns:
        responses int64 [N, T], lengths int64 [N], behav_logp float32 [N, T] (0 at padding),
        mask bool [N, T], stop_token int64 [N] (the row's last token if it is a stop token,
        else ``NO_STOP``).
    """
    if len(tokens) != len(logps):
        raise ValueError(f"{len(tokens)} token rows but {len(logps)} log-prob rows")
    lengths = [len(t) for t in tokens]
    if any(k == 0 for k in lengths) or any(
        len(lp) != k for lp, k in zip(logps, lengths, strict=True)
    ):
        raise ValueError("every row needs >= 1 token and one log-prob per token")
    n, t_max = len(tokens), max(lengths)
    responses = torch.full((n, t_max), pad_id, dtype=torch.long)
    behav = torch.zeros((n, t_max), dtype=torch.float32)
    for i, (tok, lp) in enumerate(zip(tokens, logps, strict=True)):
        responses[i, : len(tok)] = torch.as_tensor(list(tok), dtype=torch.long)
        behav[i, : len(lp)] = torch.as_tensor(list(lp), dtype=torch.float32)
    length_t = torch.tensor(lengths, dtype=torch.long)
    mask = torch.arange(t_max).unsqueeze(0) < length_t.unsqueeze(1)
    stops = set(stop_ids)
    stop_token = torch.tensor(
        [t[-1] if t[-1] in stops else NO_STOP for t in tokens], dtype=torch.long
    )
    return responses, length_t, behav, mask, stop_token


@dataclass
class Sampled:
    """What an engine sampled for N = B * n rows, before :class:`RolloutEngine` assembles the
    batch: the fields of the same names in :class:`RolloutBatch`, on the CPU, and ``versions``,
    each row's weight version of every response token (``response_lengths[i]`` of them)."""

    responses: torch.Tensor
    response_lengths: torch.Tensor
    behav_logp: torch.Tensor
    response_mask: torch.Tensor
    stop_token: torch.Tensor
    versions: list[list[int]]


def batch_versions(
    versions: Sequence[Sequence[int]], shape: torch.Size, start_version: int
) -> tuple[int, torch.Tensor | None]:
    """A batch's ``policy_version`` (its oldest token's version; ``start_version`` when it has
    none) and ``token_versions`` (int64 ``shape``, 0 at padding; None when every token came
    from ``start_version``) from each row's per-token versions."""
    seen = {v for row in versions for v in row}
    if not seen - {start_version}:
        return start_version, None
    out = torch.zeros(shape, dtype=torch.long)
    for i, row in enumerate(versions):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return min(seen), out


class RolloutEngine(ABC):
    """A sampler the rollout worker drives; a subclass adds ``_rule``, ``_sample``, ``model``
    and weight loading.

    Args:
        tokenizer, max_new_tokens, temperature, top_p, stop_token_ids: as the engines take them
            (checked here, :func:`check_sampling` and :func:`resolve_stop_token_ids`).

    Attributes:
        version: Weight version of the last load (0 before any).
        dirty: True while the model holds parts of two versions (a streamed update is under
            way, or failed midway); the engine refuses to generate then.
        tokenizer: The tokenizer prompts are encoded and responses decoded with.
        max_new_tokens: Response length limit, stop token included.
        stop_token_ids: Token ids that end a response.
        max_positions: Longest prompt + response the engine holds (None: no known limit); a
            subclass sets it, and ``positions_source`` names where it comes from in errors.
        joins_weight_group: True where the engine's own workers join the learner's weight
            group with the collective transport (vLLM), so the rollout actor receives nothing
            itself (:func:`services.rollout.vllm_weights.rollout_receiver`).
    """

    joins_weight_group = False
    max_positions: int | None = None
    positions_source = "the model's config"

    def __init__(
        self,
        tokenizer: Any,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_token_ids: Sequence[int] | None,
    ) -> None:
        check_sampling(temperature, top_p, max_new_tokens)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.pad_id, self.eos_id = special_ids(tokenizer)
        self.stop_token_ids = resolve_stop_token_ids(tokenizer, stop_token_ids)
        self.version = 0
        self.dirty = False

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module | None:
        """The local ``torch.nn.Module`` where the engine holds one in this process (HF
        engine), else ``None`` (vLLM keeps its model inside its workers)."""

    # ---- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[Prompt],
        n: int,
        seed: int,
        *,
        between_steps: BetweenSteps | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` responses per prompt (deterministic for a given seed and weights).

        ``between_steps`` runs between decoding steps (in-flight weight updates); weights it
        loads sample the later tokens, and tokens sampled after it changed ``version`` record
        the new version.
        """
        return self._run(prompts, n, self._rule(int(seed)), between_steps)

    def greedy(self, prompts: list[Prompt]) -> RolloutBatch:
        """One argmax response per prompt; ``behav_logp`` is the temperature-1 log-prob."""
        return self._run(prompts, 1, self._rule(None))

    @abstractmethod
    def _rule(self, seed: int | None) -> Any:
        """How tokens are picked, in the engine's terms: sampled with ``seed``, or the argmax
        (``None``)."""

    @abstractmethod
    def _sample(
        self, prompt_ids: list[list[int]], n: int, rule: Any, between_steps: BetweenSteps | None
    ) -> Sampled:
        """``n`` responses per prompt picked by ``rule``, rows grouped by prompt."""

    def _check_whole(self) -> None:
        if self.dirty:
            raise RuntimeError(
                "the engine holds part of a weights version (an update failed midway); it "
                "generates again once a whole version has loaded"
            )

    def encode_prompts(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Each prompt's token ids (no special tokens added).

        Raises:
            ValueError: on no prompts, a prompt that encodes to no tokens, or one too long for
                ``max_new_tokens`` more within ``max_positions``.
        """
        if not prompts:
            raise ValueError("no prompts")
        prompt_ids = [encode_text(self.tokenizer, p.text) for p in prompts]
        if any(not ids for ids in prompt_ids):
            raise ValueError("a prompt encodes to no tokens")
        longest = max(len(s) for s in prompt_ids)
        limit = self.max_positions
        if limit is not None and longest + self.max_new_tokens > limit:
            raise ValueError(
                f"prompt of {longest} tokens + {self.max_new_tokens} new tokens exceeds the "
                f"engine's {limit} positions ({self.positions_source})"
            )
        return prompt_ids

    def _run(
        self,
        prompts: list[Prompt],
        n: int,
        rule: Any,
        between_steps: BetweenSteps | None = None,
    ) -> RolloutBatch:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self._check_whole()
        t0 = time.perf_counter()
        prompt_ids = self.encode_prompts(prompts)
        start_version = self.version  # in-flight loads may move it while sampling
        s = self._sample(prompt_ids, n, rule, between_steps)
        policy_version, token_versions = batch_versions(
            s.versions, s.responses.shape, start_version
        )
        texts = [
            decode_ids(self.tokenizer, row[: int(k)].tolist())
            for row, k in zip(s.responses, s.response_lengths, strict=True)
        ]
        return RolloutBatch(
            prompts=list(prompts),
            prompt_ids=prompt_ids,
            responses=s.responses,
            response_lengths=s.response_lengths,
            behav_logp=s.behav_logp,
            response_mask=s.response_mask,
            texts=texts,
            stop_token=s.stop_token,
            n=n,
            policy_version=policy_version,
            token_versions=token_versions,
            gen_seconds=time.perf_counter() - t0,
        )

    def report(self) -> dict[str, Any]:
        """What the engine adds to its rollout actor's report (none by default)."""
        return {}

    # ---- weights -------------------------------------------------------------------------------

    @abstractmethod
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace all weights in place (a full Hugging Face state dict) and set ``version``."""

    @abstractmethod
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None
    ) -> None:
        """Copy named tensors into the live model in place (any subset, streamed) and set
        ``version`` (None: one part of an update between :meth:`begin_update` and
        :meth:`finish_update`)."""

    @abstractmethod
    def begin_update(self) -> None:
        """A version starts arriving in parts: :attr:`dirty` until :meth:`finish_update`."""

    @abstractmethod
    def finish_update(self, version: int) -> None:
        """Every part of ``version`` loaded: set ``version``, clear :attr:`dirty`."""

    @abstractmethod
    def abort_update(self) -> None:
        """The update failed midway: the model stays :attr:`dirty`."""

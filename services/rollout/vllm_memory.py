"""RAM for a vLLM rollout engine on CPU: its KV cache, and whether a run fits beside it.

On CPU vLLM keeps the KV cache in RAM, next to the learner. Left to itself it sizes the cache
from ``gpu_memory_utilization`` read as a share of *all* RAM (0.9: 21 GiB of a 24 GiB box) and
refuses to start when that much is not free. It takes an explicit size instead from the engine
argument ``kv_cache_memory_bytes`` or from ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB), the variable
winning when both are set. The CPU engine is therefore always given a size:
``rollout.vllm.cpu_kv_cache_gib``, else one derived here from the model and the batch; a
``VLLM_CPU_KVCACHE_SPACE`` in the environment still wins, as it does in vLLM, and is what the fit
check counts and names.

Nothing here imports vLLM: ``d3s validate`` runs these checks in any venv.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.rollout.config import RolloutConfig

GIB = 1 << 30
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
KV_FIELD = "rollout.vllm.cpu_kv_cache_gib"
# vLLM's CPU backend allocates the cache in blocks of this many tokens (its default there), so a
# sequence takes whole blocks.
CPU_BLOCK_TOKENS = 128
KV_MARGIN = 1.25
KV_FLOOR_GIB = 1.0
KV_STEP_GIB = 0.25  # the derived size is rounded up to this, so logs show round numbers
# Lower bounds of what the rest of a run holds, per parameter: the learner's float32 weights and
# gradients on every rank and Adam's two float32 moments once (ZeRO shards them; without ZeRO
# there are more), and the background evaluator's float32 copy.
LEARNER_RANK_BYTES_PER_PARAM = 8
OPTIMIZER_BYTES_PER_PARAM = 8
EVALUATOR_BYTES_PER_PARAM = 4
# The learner's logits and their gradient, float32 [tokens, vocab] each, for one micro-batch's
# response targets.
LOGITS_BYTES_PER_TOKEN_AND_ID = 8
# Resident memory of processes before weights, caches and activations, lower bounds of what
# SmolLM2's run measured on CPU: a process with torch loaded (learner rank, evaluator: 0.5 GiB),
# and a vLLM engine's worker and engine-core processes with the rollout actor that drives them
# (about 2.3 GiB beyond weights and KV cache).
PROCESS_RUNTIME_BYTES = GIB // 2
ENGINE_RUNTIME_BYTES = 2 * GIB
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1}


@dataclass(frozen=True)
class ModelMemory:
    """What sizes a model's memory: its parameters and the shape of its attention."""

    params: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None
    checkpoint_dtype_bytes: int
    """Bytes per element of the checkpoint's dtype (``dtype: auto`` loads that)."""


@dataclass(frozen=True)
class CpuKVCache:
    """The KV cache one CPU engine gets, and where the size came from."""

    gib: float
    source: str
    """``rollout.vllm.cpu_kv_cache_gib``, ``VLLM_CPU_KVCACHE_SPACE`` or ``derived``."""
    derived_gib: float
    """What the model and the batch call for (reported beside a size set by hand)."""

    @property
    def field(self) -> str:
        """The setting a user changes to change the size."""
        return KV_ENV if self.source == KV_ENV else KV_FIELD


def read_model_memory(path: str | Path) -> ModelMemory:
    """Shape and parameter count of the local Hugging Face model at ``path``: the count from its
    safetensors headers, else from its config (a directory holding only config.json)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    text = getattr(config, "get_text_config", lambda: config)()
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    layers = int(text.num_hidden_layers)
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "float32"
    dtype_bytes = _DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)
    positions = getattr(text, "max_position_embeddings", None)
    params = _safetensors_params(Path(path))
    if params is None:
        inner = int(getattr(text, "intermediate_size", None) or 4 * hidden)
        attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
        untied = not getattr(text, "tie_word_embeddings", False)
        params = (1 + untied) * int(text.vocab_size) * hidden + hidden  # embeddings, final norm
        params += layers * (attention + 3 * hidden * inner + 2 * hidden)
    return ModelMemory(
        params,
        int(text.vocab_size),
        layers,
        kv_heads,
        head_dim,
        int(positions) if positions else None,
        dtype_bytes,
    )


def _safetensors_params(directory: Path) -> int | None:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def engine_dtype_bytes(model: ModelMemory, dtype: str) -> int:
    """Bytes per element of the engine's weights and KV cache under ``rollout.vllm.dtype``."""
    return model.checkpoint_dtype_bytes if dtype == "auto" else _DTYPE_BYTES[dtype]


def kv_bytes_per_token(model: ModelMemory, dtype: str) -> int:
    """One token's keys and values over all layers."""
    return (
        2
        * model.num_layers
        * model.num_kv_heads
        * model.head_dim
        * engine_dtype_bytes(model, dtype)
    )


def _blocks(tokens: int) -> int:
    return -(-tokens // CPU_BLOCK_TOKENS) * CPU_BLOCK_TOKENS


def derived_kv_cache_gib(rollout: RolloutConfig, model: ModelMemory) -> float:
    """KV cache for one step's sequences at once (``prompts_per_step x samples_per_prompt``,
    each the longest request: ``max_prompt_tokens + max_new_tokens`` within ``max_model_len``),
    and at least one ``max_model_len`` sequence (vLLM refuses a cache that cannot hold one);
    plus a 25% margin, rounded up to a quarter GiB, at least 1 GiB. Fewer concurrent sequences
    would still run (vLLM queues what does not fit), only slower."""
    v = rollout.vllm_settings
    limit = v.max_model_len or model.max_positions
    longest = rollout.max_new_tokens + (rollout.max_prompt_tokens or limit or 0)
    if limit is not None:
        longest = min(longest, limit)
    per_token = kv_bytes_per_token(model, v.dtype)
    batch = rollout.prompts_per_step * rollout.samples_per_prompt * _blocks(longest) * per_token
    one_sequence = _blocks(limit or longest) * per_token
    gib = max(batch, one_sequence) * KV_MARGIN / GIB
    return max(KV_FLOOR_GIB, math.ceil(gib / KV_STEP_GIB) * KV_STEP_GIB)


def cpu_kv_cache(
    rollout: RolloutConfig, model: ModelMemory, environ: Mapping[str, str] | None = None
) -> CpuKVCache:
    """The KV cache size a CPU engine runs with: ``VLLM_CPU_KVCACHE_SPACE`` if set (vLLM itself
    lets it override the engine argument), else ``rollout.vllm.cpu_kv_cache_gib``, else derived.

    Raises:
        ValueError: when ``VLLM_CPU_KVCACHE_SPACE`` is not a positive whole number (vLLM reads it
            with ``int()`` and would fail inside its engine process).
    """
    env = os.environ if environ is None else environ
    derived = derived_kv_cache_gib(rollout, model)
    raw = env.get(KV_ENV, "")
    if raw != "":
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(
                f"{KV_ENV}: {raw!r} in the environment is not a positive whole number of GiB "
                f"(vLLM reads it with int()); unset it to use {KV_FIELD}"
            )
        return CpuKVCache(float(value), KV_ENV, derived)
    given = rollout.vllm_settings.cpu_kv_cache_gib
    if given is not None:
        return CpuKVCache(given, KV_FIELD, derived)
    return CpuKVCache(derived, "derived", derived)


def available_ram_bytes() -> int | None:
    """RAM free for a new process now: the kernel's MemAvailable, within the cgroup's limit when
    this process has one; None where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def rest_of_run_bytes(
    model: ModelMemory,
    rollout: RolloutConfig,
    *,
    learner_ranks: int,
    micro_batch_tokens: int | None,
    background_eval: bool,
) -> dict[str, int]:
    """Lower bounds of what the run holds in RAM besides the engines' KV caches, by part.
    ``micro_batch_tokens`` None: one step's samples in one micro-batch (the learner's default).
    The learner forms logits only at response targets (learner/forward.py): one step's samples
    x ``max_new_tokens``, at most a micro-batch's positions."""
    tokens = rollout.prompts_per_step * rollout.samples_per_prompt * rollout.max_new_tokens
    if micro_batch_tokens is not None:
        tokens = min(tokens, micro_batch_tokens)
    parts = {
        "learner": model.params
        * (LEARNER_RANK_BYTES_PER_PARAM * learner_ranks + OPTIMIZER_BYTES_PER_PARAM)
        + learner_ranks * PROCESS_RUNTIME_BYTES,
        "learner logits": learner_ranks * tokens * model.vocab_size * LOGITS_BYTES_PER_TOKEN_AND_ID,
        "engines": rollout.num_actors
        * (
            model.params * engine_dtype_bytes(model, rollout.vllm_settings.dtype)
            + ENGINE_RUNTIME_BYTES
        ),
    }
    if background_eval:
        parts["evaluator"] = model.params * EVALUATOR_BYTES_PER_PARAM + PROCESS_RUNTIME_BYTES
    return parts


def check_cpu_fit(
    rollout: RolloutConfig,
    model: ModelMemory,
    *,
    learner_ranks: int,
    micro_batch_tokens: int | None,
    background_eval: bool,
    available: int | None,
    environ: Mapping[str, str] | None = None,
) -> CpuKVCache:
    """The KV cache each CPU engine gets, after checking that ``num_actors`` of them fit in
    ``available`` bytes beside the rest of the run (None: not checked).

    Raises:
        ValueError: naming the setting (``rollout.vllm.cpu_kv_cache_gib`` or
            ``VLLM_CPU_KVCACHE_SPACE``) and the largest size that would fit.
    """
    kv = cpu_kv_cache(rollout, model, environ)
    if available is None:
        return kv
    parts = rest_of_run_bytes(
        model,
        rollout,
        learner_ranks=learner_ranks,
        micro_batch_tokens=micro_batch_tokens,
        background_eval=background_eval,
    )
    rest = sum(parts.values())
    actors = rollout.num_actors
    if kv.gib * GIB * actors + rest <= available:
        return kv
    fits = (available - rest) / actors / GIB
    shown = ", ".join(f"{name} {b / GIB:.1f}" for name, b in parts.items())
    what = {
        "derived": "derived from the model and the batch",
        KV_FIELD: "as configured",
        KV_ENV: "from the environment",
    }[kv.source]
    advice = (
        f"set {kv.field} to at most {math.floor(fits * 4) / 4:g}"
        if fits >= KV_FLOOR_GIB
        else "free memory, or lower learner.micro_batch_tokens, rollout.num_actors or the "
        "model's size"
    )
    raise ValueError(
        f"{kv.field}: {kv.gib:g} GiB of KV cache ({what}) for each of {actors} vLLM engine(s) "
        f"on CPU does not fit in the {available / GIB:.1f} GiB of RAM available here beside "
        f"the rest of the run (at least {rest / GIB:.1f} GiB: {shown}); {advice}"
    )

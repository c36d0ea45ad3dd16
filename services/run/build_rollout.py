"""Building a rollout actor from the run config: its engine (HF or vLLM), its worker (tasks,
prompt rendering, length limit, prefilter) and the receiver its weights arrive through."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from services.run.config import RunConfig
from services.transport.bundle import Transport

log = logging.getLogger(__name__)


def build_worker(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    name: str,
    device: str | None = None,
    *,
    model_path: str | Path | None = None,
    history: Any = None,
) -> Any:
    """A rollout worker (engine + tasks + prompt rendering and length limit). The engine is the
    HF one around ``model`` (``device``: where it runs, None: where the model is), or with
    ``rollout.engine: vllm`` a vLLM engine that loads ``model_path`` (``model`` unused). With
    ``rollout.prefilter.enabled`` it selects prompts with the streaks and p's in ``history``
    (a run's :class:`RunState`; None: in this process's memory, the in-process trainer)."""
    from services.rollout.prefilter import MemoryHistoryStore, Prefilter, PromptHistory
    from services.rollout.worker import RolloutWorker
    from services.tasks.prompting import PromptFormat
    from services.tasks.source import TaskSource

    r = cfg.rollout
    if r.engine == "vllm":
        engine: Any = build_vllm_engine(cfg, tokenizer, model_path)
    else:
        from services.policy.lora import apply_lora, is_lora
        from services.rollout.hf_engine import HFRolloutEngine

        lora = cfg.learner.lora
        if lora is not None and not is_lora(model):  # base plus adapter; syncs fill the adapter
            model = apply_lora(model, lora)
        engine = HFRolloutEngine(
            model, tokenizer, r.max_new_tokens, r.temperature, r.top_p, device=device
        )
    return RolloutWorker(
        engine,
        TaskSource.from_config(cfg.task),
        r.samples_per_prompt,
        name=name,
        prompt_format=PromptFormat.from_task(cfg.task),
        max_prompt_tokens=r.max_prompt_tokens,
        prefilter=Prefilter(
            r.prefilter,
            PromptHistory(
                history if history is not None else MemoryHistoryStore(), r.prefilter.p_init
            ),
        )
        if r.prefilter.enabled
        else None,
        overlong=cfg.reward.overlong,
    )


def build_vllm_engine(cfg: RunConfig, tokenizer: Any, model_path: str | Path | None) -> Any:
    """The vLLM engine of ``rollout.engine: vllm``, loading the policy at ``model_path``; with
    ``learner.lora`` every weight version is an adapter on it."""
    from services.rollout.vllm_engine import VLLMRolloutEngine

    if model_path is None:
        raise ValueError("rollout.engine: vllm needs the policy's model directory")
    r = cfg.rollout
    v = r.vllm_settings
    kv = None
    if r.num_gpus == 0:
        from services.rollout.vllm_memory import cpu_kv_cache, read_model_memory

        kv = cpu_kv_cache(r, read_model_memory(model_path))
        log.info(
            "vLLM KV cache on CPU: %g GiB (%s; the model and batch call for %g)",
            kv.gib,
            kv.source,
            kv.derived_gib,
        )
    return VLLMRolloutEngine(
        model_path,
        tokenizer,
        r.max_new_tokens,
        r.temperature,
        r.top_p,
        gpu_memory_utilization=v.gpu_memory_utilization,
        tensor_parallel_size=v.tensor_parallel_size,
        enforce_eager=v.enforce_eager,
        max_model_len=v.max_model_len,
        dtype=v.dtype,
        seed=cfg.train.seed,
        cpu_kv_cache_gib=None if kv is None else kv.gib,
        # With learner.lora every version is an adapter; a round may run under any version
        # still within max_staleness, so that many adapters (and the newest) fit one batch.
        lora=cfg.learner.lora,
        lora_slots=cfg.service.max_staleness + 1,
    )


def build_rollout(
    cfg: RunConfig, transport: Transport, policy_path: str, index: int, name: str
) -> Any:
    """Rollout actor ``index`` (named ``name``), generating into ``transport``."""
    from services.policy.model import load_policy, load_tokenizer
    from services.rollout.actor import RolloutActor
    from services.rollout.vllm_weights import rollout_receiver

    if cfg.rollout.engine == "vllm":  # vLLM loads the weights itself, in its own workers
        model, tokenizer = None, load_tokenizer(policy_path)
    else:
        model, tokenizer = load_policy(policy_path)
    worker = build_worker(
        cfg,
        model,
        tokenizer,
        name,
        device=rollout_device(cfg),
        model_path=policy_path,
        history=transport.state,
    )
    ws = cfg.weight_sync
    receiver = rollout_receiver(worker.engine, ws, cfg.service.namespace, name, transport.client)
    log.info(
        "%s: engine on %s, weights by %s",
        name,
        getattr(worker.engine, "device", cfg.rollout.engine),
        cfg.weight_sync.transport,
    )
    return RolloutActor(cfg.rollout_settings(), transport, receiver, worker, index)


def engine_dtype(cfg: RunConfig) -> Any:
    """The dtype the rollout engines compute in, which a LoRA adapter is published in: the HF
    engine's bfloat16 on a GPU, its model's float32 on CPU; vLLM's ``rollout.vllm.dtype``
    (``auto``: bfloat16 on a GPU, else float32)."""
    import torch

    gpu = cfg.rollout.num_gpus > 0
    if cfg.rollout.engine == "vllm":
        name = cfg.rollout.vllm_settings.dtype
        if name in ("bfloat16", "float16", "float32"):
            return getattr(torch, name)
    return torch.bfloat16 if gpu else torch.float32


def rollout_device(cfg: RunConfig) -> str | None:
    """``cuda`` when the rollout actors reserve GPUs (``rollout.num_gpus``) and one is visible
    (Ray's CUDA_VISIBLE_DEVICES makes the reserved one ``cuda:0``); None keeps the CPU."""
    import torch

    return "cuda" if cfg.rollout.num_gpus > 0 and torch.cuda.is_available() else None

"""Learner CUDA path on a Qwen2.5-0.5B-shaped random model: bf16, ZeRO-2, micro-batches, checkpointing.

Run on a GPU machine from the repository root (needs torch with CUDA, transformers, deepspeed):
    python bench/gpu_learner.py
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from transformers import Qwen2Config, Qwen2ForCausalLM

from learner.batch import LearnerBatch
from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from selector.presets import get_preset

V, N, P, W = 151936, int(os.environ.get("N", 128)), 200, 700
print(torch.__version__, torch.cuda.get_device_name(), flush=True)


def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=V,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    m = Qwen2ForCausalLM(cfg)
    return m


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, W), generator=g)
    prompt = torch.full((N,), P)
    seq = prompt + torch.randint(100, W - P + 1, (N,), generator=g)
    pos = torch.arange(W)[None]
    behav = torch.where(
        (pos >= prompt[:, None]) & (pos < seq[:, None]), -torch.rand(N, W, generator=g) * 12, 0.0
    )
    return LearnerBatch(ids, prompt, seq, behav, torch.randn(N, generator=g))


results = []
eng = None
for label, kw in [
    ("budget=16384 ckpt", dict(micro_batch_tokens=16384, gradient_checkpointing=True)),
    ("budget=16384 no-ckpt", dict(micro_batch_tokens=16384, gradient_checkpointing=False)),
    ("budget=65536 ckpt", dict(micro_batch_tokens=65536, gradient_checkpointing=True)),
]:
    m = model()
    nparams = sum(p.numel() for p in m.parameters())
    eng = LearnerEngine(
        m, LearnerConfig(device="cuda", bf16="on", zero_stage=2, lr=1e-6, **kw), schedule_steps=10
    )
    for preset, ratio in (("grpo", 1.0), ("d3s", 0.3)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(3):
            b = batch(step)
            torch.cuda.synchronize()
            t = time.perf_counter()
            mt = eng.train_step(b, get_preset(preset), ratio)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        r = dict(
            config=label,
            preset=preset,
            params=nparams,
            N=N,
            width=W,
            loss=mt["loss"],
            grad_norm=mt["grad_norm"],
            micro_batches=mt["micro_batches"],
            tokens_valid=mt["tokens_valid"],
            tokens_forward=mt["tokens_forward"],
            step_s=min(times[1:]),
            step_s_first=times[0],
            padded_tokens_per_s=N * W / min(times[1:]),
            valid_tokens_per_s=float(b.seq_lengths.sum()) / min(times[1:]),
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            NTV_fp32_gib=N * (W - 1) * V * 4 / 2**30,
        )
        results.append(r)
        print(json.dumps(r), flush=True)
    del eng, m
    import gc

    gc.collect()
    torch.cuda.empty_cache()
with open(os.path.join(os.environ.get("OUT", "."), "gpu_learner.json"), "w") as fh:
    json.dump(results, fh, indent=1)

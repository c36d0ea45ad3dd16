"""Weight-sync time for a ~0.5B-parameter model on one CUDA GPU (random weights, bf16).

Two paths, each timed end to end until the receiving model holds the new weights:

- ``files``: :class:`~services.weightsync.files.FilesPublisher` writes a safetensors file (from
  the GPU model) and :class:`~services.weightsync.files.FilesReceiver` loads it into a second
  model on the same GPU, sampled checksum verified on both sides.
- ``bucketed``: the collective transport's packing without the network: the state dict is
  flattened into bf16 buckets of ``--bucket-mb`` on the GPU (``plan_buckets`` / ``flatten``),
  unflattened into views and loaded with ``load_state_dict`` into the second model: the
  device-side cost a broadcast adds to the wire time.

    python -m bench.gpu_weight_sync --reps 3 --dirs /dev/shm,/tmp
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from services.weightsync.collective.buckets import flatten, plan_buckets, unflatten
from services.weightsync.files import FilesPublisher, FilesReceiver


def build_model(device: str) -> torch.nn.Module:
    """A Qwen2-0.5B-shaped causal LM with random weights (no hub access needed)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def _sync() -> None:
    torch.cuda.synchronize()


def time_files(
    src: torch.nn.Module, dst: torch.nn.Module, directory: Path, reps: int
) -> dict[str, float]:
    pub, recv = FilesPublisher(directory, keep_last=2), FilesReceiver(directory)
    pubs, recvs = [], []
    for v in range(reps + 1):  # the first is a warm-up
        _sync()
        t0 = time.perf_counter()
        pub.publish(v, src.state_dict())
        t1 = time.perf_counter()
        assert recv.receive(dst) == v
        _sync()
        t2 = time.perf_counter()
        if v:
            pubs.append(t1 - t0)
            recvs.append(t2 - t1)
    return {
        "publish_s": statistics.median(pubs),
        "receive_s": statistics.median(recvs),
        "total_s": statistics.median(p + r for p, r in zip(pubs, recvs, strict=True)),
    }


def time_bucketed(
    src: torch.nn.Module, dst: torch.nn.Module, bucket_mb: float, reps: int
) -> dict[str, float]:
    state = {n: t.detach() for n, t in src.state_dict().items()}
    buckets = plan_buckets(state, int(bucket_mb * (1 << 20)))
    bufs: list[torch.Tensor | None] = [None] * len(buckets)
    packs, loads = [], []
    for r in range(reps + 1):
        _sync()
        t0 = time.perf_counter()
        for i, b in enumerate(buckets):
            bufs[i] = flatten(state, b, bufs[i])
        _sync()
        t1 = time.perf_counter()
        views: dict[str, torch.Tensor] = {}
        for buf, b in zip(bufs, buckets, strict=True):
            views.update(unflatten(buf, b))
        dst.load_state_dict(views, strict=False)
        _sync()
        t2 = time.perf_counter()
        if r:
            packs.append(t1 - t0)
            loads.append(t2 - t1)
    return {
        "buckets": len(buckets),
        "pack_s": statistics.median(packs),
        "load_s": statistics.median(loads),
        "total_s": statistics.median(p + q for p, q in zip(packs, loads, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--dirs", default="/dev/shm,/tmp", help="comma-separated parent dirs for files")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    t0 = time.perf_counter()
    src, dst = build_model("cuda"), build_model("cuda")
    params = sum(p.numel() for p in src.parameters())
    mib = sum(t.numel() * t.element_size() for t in src.state_dict().values()) / 2**20
    out = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "params": params,
        "state_dict_mib_with_tied": round(mib, 1),
        "build_s": round(time.perf_counter() - t0, 1),
        "bucket_mb": args.bucket_mb,
        "bucketed": time_bucketed(src, dst, args.bucket_mb, args.reps),
    }
    assert torch.equal(
        dst.model.layers[3].mlp.up_proj.weight, src.model.layers[3].mlp.up_proj.weight
    )
    for parent in args.dirs.split(","):
        with torch.no_grad():  # new weights, so the files path moves a real change
            for p in src.parameters():
                p.add_(1e-3)
        with tempfile.TemporaryDirectory(dir=parent) as d:
            out[f"files:{parent}"] = time_files(src, dst, Path(d), args.reps)
        assert torch.equal(dst.lm_head.weight, src.lm_head.weight)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

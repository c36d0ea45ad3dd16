"""Weight sync into a running vLLM engine: the collective path (the engine's worker is a member
of the learner's broadcast group and receives into its parameters) against a bare
``torch.distributed`` broadcast of the same bytes between the same two processes, and against
the bytes-through-``collective_rpc`` path, side by side in one run.

    python -m bench.weight_sync --engine vllm [--model DIR] [--reps 5] [--bucket-mb 64]

Per version, measured in this (the learner's) process from the first byte sent until the
engine's call returned:

- ``bare``: one ``broadcast`` of a flat buffer of the model's bytes from this process into a
  buffer in the vLLM worker process (a gloo group of the two; the transport's lower bound:
  nothing packed, checked or loaded);
- ``collective``: :class:`~services.weightsync.collective.CollectivePublisher.publish` of the
  state dict, the worker receiving the buckets, verifying the sampled checksum and loading them
  into vLLM's model (``load_weights`` with the layerwise reload), then the prefix-cache reset;
- ``rpc``: :meth:`~services.rollout.vllm_engine.VLLMRolloutEngine.load_state_dict`, the tensors
  as bytes in ``collective_rpc`` arguments (the path before the worker joined the group).

Needs vLLM (``make venv-vllm``); the default model is SmolLM2-135M-Instruct (``d3s
prepare-model``). Writes ``bench/results/weight_sync_vllm.md`` and ``.json`` unless ``--out ''``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.weightsync.base import split_aliases
from services.weightsync.collective import CollectivePublisher, parse_address
from services.weightsync.collective.group import broadcast

DEFAULT_MODEL = Path(".cache/models/smollm2-135m-instruct")


# ---- run inside the vLLM worker through collective_rpc (``self`` is the worker) ---------------


def _bare_join(worker: Any, address: str, timeout_s: float) -> None:
    host, port = parse_address(address)
    store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))
    timeout = datetime.timedelta(seconds=timeout_s)
    worker._bench_pg = dist.ProcessGroupGloo(dist.PrefixStore("bare/", store), 1, 2, timeout)


def _bare_receive(worker: Any, numel: int) -> int:
    buf = getattr(worker, "_bench_buf", None)
    if buf is None or buf.numel() != numel:
        buf = worker._bench_buf = torch.empty(numel, dtype=torch.uint8)
    broadcast(worker._bench_pg, buf)
    return int(buf[:8].sum())


# ---- the learner's side ------------------------------------------------------------------------


def _in_thread(fn) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def go() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, errors


def _joined(t: threading.Thread, errors: list[BaseException]) -> None:
    t.join(timeout=600)
    if t.is_alive() or errors:
        raise RuntimeError(f"the learner side failed: {errors or 'timed out'}")


def measure(model_dir: Path, reps: int, bucket_mb: float) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from services.policy.model import load_tokenizer
    from services.rollout.vllm_engine import VLLMRolloutEngine
    from services.rollout.vllm_weights import EngineWeightReceiver, WeightGroupOptions

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    states = [hf.state_dict()]
    g = torch.Generator().manual_seed(0)
    # A second set of weights, so consecutive versions differ (nothing is cached by identity).
    states.append({n: t + 1e-3 * torch.randn(t.shape, generator=g) for n, t in states[0].items()})
    nbytes = sum(t.numel() * t.element_size() for t in split_aliases(states[0])[0].values())
    engine = VLLMRolloutEngine(
        model_dir,
        load_tokenizer(model_dir),
        max_new_tokens=8,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
    )
    timeout = 600.0
    out: dict[str, Any] = {"model": str(model_dir), "bytes": nbytes, "tensors": len(states[0])}
    try:
        # bare: a two-process gloo group, one broadcast of the model's bytes per version.
        store = dist.TCPStore(
            "127.0.0.1", 0, None, True, datetime.timedelta(seconds=timeout), wait_for_workers=False
        )
        address = f"127.0.0.1:{store.port}"
        holder: dict[str, Any] = {}

        def make_pg() -> None:
            holder["pg"] = dist.ProcessGroupGloo(
                dist.PrefixStore("bare/", store), 0, 2, datetime.timedelta(seconds=timeout)
            )

        t, errs = _in_thread(make_pg)
        engine.collective_rpc(_bare_join, address, timeout)
        _joined(t, errs)
        # The bytes the collective path sends: tied tensors once (lm_head is embed_tokens).
        unique, _ = split_aliases(states[0])
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in unique.values()])
        bare = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            t, errs = _in_thread(lambda: broadcast(holder["pg"], flat))
            engine.collective_rpc(_bare_receive, flat.numel())
            _joined(t, errs)
            bare.append(time.perf_counter() - t0)

        # collective: the engine's worker in the learner's weight group.
        pub = CollectivePublisher(bucket_bytes=int(bucket_mb * (1 << 20)), catchup_every=0)
        receiver = EngineWeightReceiver.join(engine, "rollout-0", WeightGroupOptions(pub.address))
        collective, timings, loads = [], [], []
        for v in range(1, reps + 2):
            state = states[v % 2]
            t0 = time.perf_counter()
            t, errs = _in_thread(lambda s=state, v=v: pub.publish(v, s))
            while not receiver.has_update():
                time.sleep(0.001)
            got = receiver.receive()
            _joined(t, errs)
            collective.append(time.perf_counter() - t0)
            timings.append(dict(pub.last_timing))
            loads.append(receiver.last_load_s)
            assert got == v, (got, v)
        receiver.close()
        pub.close()

        # rpc: the tensors as bytes in collective_rpc arguments.
        rpc = []
        for v in range(reps + 1):
            t0 = time.perf_counter()
            engine.load_state_dict(states[v % 2], version=100 + v)
            rpc.append(time.perf_counter() - t0)
    finally:
        engine.shutdown()
    # The first of each is a warm-up (buffers allocated, groups connected): left out.
    for name, xs in (("bare", bare), ("collective", collective), ("rpc", rpc)):
        out[f"{name}_s"] = statistics.median(xs[1:])
        out[f"{name}_all_s"] = xs
    out["publisher_timing"] = timings[1:]
    out["vllm_load_s"] = statistics.median(loads[1:])
    out["collective_without_load_s"] = out["collective_s"] - out["vllm_load_s"]
    out["bare_over_collective_without_load"] = out["bare_s"] / out["collective_without_load_s"]
    out["bare_over_collective"] = out["bare_s"] / out["collective_s"]
    out["rpc_over_collective"] = out["rpc_s"] / out["collective_s"]
    return out


def report(r: dict[str, Any], command: str) -> str:
    mib = r["bytes"] / (1 << 20)
    pack = statistics.median(t["pack_s"] for t in r["publisher_timing"])
    bcast = statistics.median(t["broadcast_s"] for t in r["publisher_timing"])
    return "\n".join(
        [
            "# Weight sync into a running vLLM engine (CPU)",
            "",
            f"`{command}`: {r['model']}, {r['tensors']} tensors, {mib:.0f} MiB float32; median "
            f"of {len(r['bare_all_s']) - 1} syncs after one warm-up, each from the first byte "
            "sent until the engine's call returned.",
            "",
            "| path | seconds per version | speed vs bare broadcast |",
            "|---|---|---|",
            f"| bare `torch.distributed` broadcast of the same bytes, same two processes | "
            f"{r['bare_s']:.3f} | 1.00x |",
            f"| collective: worker in the weight group, receive + checksum + load into vLLM | "
            f"{r['collective_s']:.3f} | {r['bare_over_collective']:.2f}x |",
            f"| bytes through `collective_rpc` (the old path) | {r['rpc_s']:.3f} | "
            f"{r['bare_s'] / r['rpc_s']:.2f}x |",
            f"| collective without vLLM's own load (receive + checksum) | "
            f"{r['collective_without_load_s']:.3f} | "
            f"{r['bare_over_collective_without_load']:.2f}x |",
            "",
            f"The old path takes {r['rpc_over_collective']:.2f}x as long as the collective one. "
            f"Of the collective path's time, {r['vllm_load_s']:.3f} s (median) is vLLM's own "
            "weight loading in the worker (`load_weights` and the layerwise reload that repacks "
            "weights for the CPU kernels), which any way into the engine pays; the publisher "
            f"spent {pack:.3f} s packing buckets and {bcast:.3f} s in the broadcast calls.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--out", default="bench/results/weight_sync_vllm")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The bare-broadcast probe sends two functions of this module to the worker; vLLM passes a
    # callable through collective_rpc only with pickle allowed. Benchmark only: the product's
    # calls are named worker-extension methods with plain arguments.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model directory: run `d3s prepare-model` first")
    result = measure(args.model, args.reps, args.bucket_mb)
    command = (
        f"python -m bench.weight_sync --engine vllm --model {args.model} --reps {args.reps} "
        f"--bucket-mb {args.bucket_mb}"
    )
    text = report(result, command)
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    return result

"""Process-group start-up for the learner: gloo on CPU, NCCL on CUDA, any world size."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from services.common.net import free_port

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("learner.device: 'cuda' requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(
    device: torch.device, timeout_s: int = 600, cpu_shm_comm: bool = False
) -> None:
    """Join (or, alone, create) the process group DeepSpeed uses. Idempotent.

    A single process without launcher variables gets rank 0 of 1 on a free loopback port, so
    `d3s train` needs no launcher on a laptop.
    """
    import deepspeed
    import deepspeed.ops

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cpu" and not cpu_shm_comm:
        # Skips a ~1 minute C++ build of DeepSpeed's shared-memory all-reduce on first start.
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log.info(
        "joining process group: backend=%s rank=%s/%s master=%s:%s",
        backend,
        os.environ["RANK"],
        os.environ["WORLD_SIZE"],
        os.environ["MASTER_ADDR"],
        os.environ["MASTER_PORT"],
    )
    if os.environ["WORLD_SIZE"] == "1":
        # Alone: an in-memory store. The env:// rendezvous would start a TCPStore listening on
        # every interface ("::"), which a local run must not open; DeepSpeed then reuses the group.
        dist.init_process_group(
            backend,
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=timeout_s),
        )
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_rows(x: torch.Tensor, n_rows: list[int]) -> torch.Tensor:
    """Concatenate each rank's [n_r, ...] tensor in rank order; n_rows gives every rank's n_r."""
    if world_size() == 1:
        return x
    width = max(n_rows)
    pad = x.new_zeros((width - x.shape[0], *x.shape[1:]))
    parts = [x.new_zeros((width, *x.shape[1:])) for _ in n_rows]
    dist.all_gather(parts, torch.cat([x, pad]))
    return torch.cat([p[:n] for p, n in zip(parts, n_rows, strict=True)])


def broadcast_object(obj: object, src: int = 0) -> object:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

"""Start N local learner ranks without an external launcher (gloo on CPU, NCCL per GPU).

On a cluster, the `deepspeed` or `torchrun` launcher sets RANK/WORLD_SIZE/MASTER_* and this is
not used; on one machine `d3s train` with learner.world_size: 2 comes through here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from services.common.net import free_port


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    out = fn(*args)
    results[rank] = out


def spawn_local(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run fn(*args) on ranks 0..world_size-1 in fresh processes; return each rank's result.

    fn must be importable by name (spawned processes re-import it), and its result picklable.
    A rank that raises makes this raise, with that rank's traceback.
    """
    port = free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world_size, port, fn, args, results), nprocs=world_size, join=True)
        return [results.get(r) for r in range(world_size)]

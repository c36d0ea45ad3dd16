"""Weight versions and their checksums: a sync that silently changes weights stops the run."""

from __future__ import annotations

import hashlib

import torch


def state_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over parameter names and float32 bytes, in name order; equal weights, equal digest."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class WeightSyncError(RuntimeError):
    pass


def verify_sync(expected: str, model: torch.nn.Module, version: int) -> None:
    got = state_checksum(model.state_dict())
    if got != expected:
        raise WeightSyncError(f"weights of version {version} arrived corrupted: checksum {got[:12]} != {expected[:12]}")

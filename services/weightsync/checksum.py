"""Weight versions and their checksums: a sync that silently changes weights stops the run."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

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


def verify_sync(
    expected: str, model: torch.nn.Module | Mapping[str, torch.Tensor], version: int
) -> None:
    """Raise unless the model (or the named tensors a sync wrote) hashes to ``expected``."""
    got = state_checksum(dict(model) if isinstance(model, Mapping) else model.state_dict())
    if got != expected:
        raise WeightSyncError(
            f"weights of version {version} arrived corrupted: checksum {got[:12]} != {expected[:12]}"
        )


# ---- the cheap per-sync verification --------------------------------------------------------
# A full sha256 reads every byte of the model on both sides each step; the sample below reads a
# fixed, strided handful of elements of every k-th tensor instead. It catches what breaks in
# practice (a wrong, truncated, shifted, zeroed or wrongly-cast tensor, a mixed-up bucket) at a
# cost independent of model size, and leaves the full digest to tests and audits.

SAMPLE_PREFIX = "sample:"


def _sample_elements(t: torch.Tensor, max_elements: int, salt: int) -> torch.Tensor:
    """Up to ``max_elements`` + 1 elements of ``t`` (any shape) as float32 on CPU: a strided
    walk from an offset that depends on ``salt`` (so tensors are not all read at index 0),
    plus the last element (catches truncation)."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.float32)
    if n <= max_elements:
        picked = flat
    else:
        stride = -(-n // max_elements)
        picked = torch.cat([flat[salt % stride :: stride], flat[-1:]])
    return picked.to("cpu", torch.float32)


def sampled_names(names: list[str] | set[str], every: int = 1) -> set[str]:
    """The names :func:`sample_checksum` reads: every ``every``-th in name order."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return set(sorted(names)[::every])


def sample_part(name: str, t: torch.Tensor, max_elements: int = 1024) -> bytes:
    """What the sample digest takes from one tensor: its name, shape and sampled elements."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    salt = int.from_bytes(hashlib.blake2s(name.encode(), digest_size=4).digest(), "little")
    return (
        name.encode()
        + repr(tuple(t.shape)).encode()
        + _sample_elements(t, max_elements, salt).numpy().tobytes()
    )


def combine_sample_parts(parts: dict[str, bytes]) -> str:
    """The sample digest of per-tensor :func:`sample_part` results, in name order (so a
    publisher that has the tensors one bucket at a time gets the same digest)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        h.update(parts[name])
    return SAMPLE_PREFIX + h.hexdigest()


def bucket_digest(parts: dict[str, bytes]) -> bytes:
    """32 bytes over one bucket's :func:`sample_part` results in name order: what the publisher
    sends after each bucket, so a receiver checks a bucket before it loads it."""
    h = hashlib.sha256()
    for name in sorted(parts):
        h.update(parts[name])
    return h.digest()


def sample_checksum(
    named_tensors: dict[str, torch.Tensor],
    every: int = 1,
    max_elements: int = 1024,
    cast: dict[str, torch.dtype] | None = None,
) -> str:
    """Digest of a fixed, deterministic sample: every ``every``-th tensor in name order, each
    through :func:`_sample_elements`, in float32, with its name and shape.

    Both sides compute it from what they hold; equal tensors give equal digests whatever their
    device or dtype layout (bf16 and float16 widen exactly to float32). ``cast`` maps a name to
    a dtype the tensor is first rounded to (compare received values with a narrower model).
    Returns ``"sample:<hex>"`` so it is never confused with :func:`state_checksum`.
    """
    if every < 1 or max_elements < 1:
        raise ValueError(f"every and max_elements must be >= 1, got {every}, {max_elements}")
    parts = {}
    for name in sampled_names(named_tensors, every):
        t = named_tensors[name]
        if cast is not None and name in cast:
            t = t.to(cast[name])
        parts[name] = sample_part(name, t, max_elements)
    return combine_sample_parts(parts)


def verify_checksum(
    expected: str,
    named_tensors: dict[str, torch.Tensor],
    version: int,
    where: str,
    every: int = 1,
    max_elements: int = 1024,
) -> None:
    """Raise :class:`WeightSyncError` unless ``named_tensors`` match ``expected``: a sample
    digest (``sample:...``) or, for publishers that still send one, a full :func:`state_checksum`."""
    if expected.startswith(SAMPLE_PREFIX):
        got = sample_checksum(named_tensors, every, max_elements)
    else:
        got = state_checksum(named_tensors)
    if got != expected:
        raise WeightSyncError(
            f"weights of version {version} arrived corrupted ({where}): sampled checksum "
            f"{got.removeprefix(SAMPLE_PREFIX)[:12]} != published "
            f"{expected.removeprefix(SAMPLE_PREFIX)[:12]}; stopping rather than generating with "
            "weights the learner never had"
        )

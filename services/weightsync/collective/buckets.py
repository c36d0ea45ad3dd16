"""The bucket layout of a version: which tensors share one flat buffer, how they are packed into
it and viewed out of it, and the plan of one outgoing version.

A bucket holds tensors of one wire dtype, about ``bucket_bytes`` in all, at fixed offsets; both
sides compute the same layout from the header, so only the flat buffers travel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from services.weightsync.base import GatheredWeights, NamedTensors, split_aliases
from services.weightsync.checksum import bucket_digest

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, wire dtype)

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class Bucket:
    """One flat buffer's layout: its wire dtype, total elements, and (name, shape, offset) of
    each tensor in it."""

    dtype: str
    numel: int
    tensors: tuple[tuple[str, tuple[int, ...], int], ...]

    def to_json(self) -> list[Any]:
        return [self.dtype, self.numel, [[n, list(s), o] for n, s, o in self.tensors]]

    @staticmethod
    def from_json(obj: list[Any]) -> Bucket:
        dtype, numel, tensors = obj
        return Bucket(dtype, int(numel), tuple((n, tuple(s), int(o)) for n, s, o in tensors))


def plan_buckets(named: dict[str, torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Group tensors (already in wire dtype) into buckets of one dtype and about
    ``bucket_bytes`` each, in the mapping's order; a tensor larger than a bucket gets one of its
    own; ``bucket_bytes == 0`` puts every tensor in its own bucket (one broadcast per tensor)."""
    return plan_layout({n: (tuple(t.shape), t.dtype) for n, t in named.items()}, bucket_bytes)


def plan_layout(layout: Layout, bucket_bytes: int) -> list[Bucket]:
    """:func:`plan_buckets` from shapes and (wire) dtypes alone, before any tensor exists."""
    buckets: list[Bucket] = []
    open_: dict[torch.dtype, tuple[list[tuple[str, tuple[int, ...], int]], int]] = {}

    def close(dtype: torch.dtype) -> None:
        entries, numel = open_.pop(dtype)
        buckets.append(Bucket(str(dtype).removeprefix("torch."), numel, tuple(entries)))

    for name, (shape, dtype) in layout.items():
        size = math.prod(shape)
        if dtype in open_:
            entries, numel = open_[dtype]
            if (numel + size) * _itemsize(dtype) > bucket_bytes:
                close(dtype)
        entries, numel = open_.setdefault(dtype, ([], 0))
        entries.append((name, tuple(shape), numel))
        open_[dtype] = (entries, numel + size)
    for dtype in list(open_):
        close(dtype)
    return buckets


def flatten(
    named: dict[str, torch.Tensor], bucket: Bucket, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The bucket's flat buffer ``[bucket.numel]``, reusing ``out`` when it fits."""
    first = named[bucket.tensors[0][0]]
    if (
        out is None
        or out.numel() != bucket.numel
        or out.dtype != first.dtype
        or out.device != first.device
    ):
        out = torch.empty(bucket.numel, dtype=first.dtype, device=first.device)
    for name, _shape, offset in bucket.tensors:
        n = named[name].numel()
        out[offset : offset + n].copy_(named[name].reshape(-1))
    return out


def unflatten(flat: torch.Tensor, bucket: Bucket) -> dict[str, torch.Tensor]:
    """Views into ``flat`` shaped as the bucket's tensors (no copy)."""
    out = {}
    for name, shape, offset in bucket.tensors:
        n = 1
        for d in shape:
            n *= d
        out[name] = flat[offset : offset + n].view(shape)
    return out


def bucket_nbytes(bucket: Bucket) -> int:
    return bucket.numel * _itemsize(_DTYPES[bucket.dtype])


def slot_view(slot: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """The bucket's flat buffer ``[bucket.numel]`` at the start of a byte buffer."""
    return slot[: bucket_nbytes(bucket)].view(_DTYPES[bucket.dtype])


def pack_into(flat: torch.Tensor, whole: dict[str, torch.Tensor], bucket: Bucket) -> None:
    """Copy the bucket's tensors into ``flat`` at their offsets (cast to its dtype)."""
    for name, _shape, offset in bucket.tensors:
        t = whole[name].detach()
        flat[offset : offset + t.numel()].copy_(t.reshape(-1), non_blocking=True)


def digest_tensor(parts: dict[str, bytes], device: torch.device) -> torch.Tensor:
    """The bucket's 32-byte digest of its sampled-checksum parts, as a tensor to broadcast."""
    return torch.frombuffer(bytearray(bucket_digest(parts)), dtype=torch.uint8).to(device)


class _Held(GatheredWeights):
    """A plain mapping of whole tensors as a :class:`GatheredWeights` (nothing to gather)."""

    def __init__(self, named_tensors: NamedTensors) -> None:
        self.unique, self._aliases = split_aliases(named_tensors)

    def layout(self) -> Layout:
        return {n: (tuple(t.shape), t.dtype) for n, t in self.unique.items()}

    def aliases(self) -> dict[str, str]:
        return self._aliases

    def device(self) -> torch.device:
        return next(iter(self.unique.values())).device if self.unique else torch.device("cpu")

    @contextlib.contextmanager
    def gather(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        yield {n: self.unique[n] for n in names}


@dataclass(frozen=True)
class Outgoing:
    """One version as the publisher sends it (and writes it to the catch-up files)."""

    source: GatheredWeights
    transient: bool  # the source gathers each bucket and lets it go once packed (ZeRO-3)
    aliases: dict[str, str]
    layout: Layout  # in wire dtypes
    buckets: list[Bucket]
    device: torch.device


def plan_outgoing(
    named_tensors: NamedTensors | GatheredWeights, wire: torch.dtype | None, bucket_bytes: int
) -> Outgoing:
    """The version's layout in wire dtypes (``wire`` replaces every floating dtype; None keeps
    each tensor's own) and its buckets."""
    source = named_tensors if isinstance(named_tensors, GatheredWeights) else _Held(named_tensors)
    layout = {
        n: (shape, dt if wire is None or not dt.is_floating_point else wire)
        for n, (shape, dt) in source.layout().items()
    }
    return Outgoing(
        source=source,
        transient=not isinstance(source, _Held),
        aliases=source.aliases(),
        layout=layout,
        buckets=plan_layout(layout, bucket_bytes),
        device=source.device(),
    )

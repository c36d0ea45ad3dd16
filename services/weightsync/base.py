"""One interface for every weight-sync transport.

A :class:`WeightPublisher` lives in learner rank 0 and is handed ``(version, named tensors)``
after each step; a :class:`WeightReceiver` lives in each rollout engine, which polls
:meth:`WeightReceiver.latest_version` between generations and calls
:meth:`WeightReceiver.receive` to load the newest weights into its model. Every version carries
a sampled checksum (:func:`~services.weightsync.checksum.sample_checksum`) computed by the
publisher from the bytes it sends and by the receiver from the bytes it got; a mismatch raises
:class:`~services.weightsync.checksum.WeightSyncError`, which the rollout actor turns into a
run stop.

Versions normally grow; a learner that resumes from a checkpoint republishes the checkpoint's
version with ``rewind=True``, and receivers then load it although it is older than theirs:
a receiver loads whatever is *different* from what it holds, not only what is newer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Union

import torch

from services.weightsync.checksum import WeightSyncError, sample_checksum

NamedTensors = Mapping[str, torch.Tensor]
LoadFn = Callable[[dict[str, torch.Tensor]], None]
Into = Union[torch.nn.Module, LoadFn]  # noqa: UP007 (a runtime alias, py3.10 safe)


class GatheredWeights(ABC):
    """Weights that exist whole only a few tensors at a time: ZeRO-3 shards each parameter
    across the learner's ranks, and a broadcast that gathers one bucket's parameters, sends them
    and lets them go never holds the full model twice (:meth:`gather` is collective: every rank
    calls it for the same names in the same order)."""

    @abstractmethod
    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Each unique tensor's full shape and dtype, in publishing order."""

    @abstractmethod
    def aliases(self) -> dict[str, str]:
        """Names that share another name's tensor (tied embeddings): alias -> name."""

    @abstractmethod
    def device(self) -> torch.device:
        """Where the gathered tensors are (picks the broadcast backend: NCCL for CUDA)."""

    @abstractmethod
    def gather(self, names: list[str]) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """A context in which the named tensors are whole (on the learner's device)."""


class WeightPublisher(ABC):
    """Learner side of a transport."""

    #: True when :meth:`publish` sends straight from the tensors' device (a broadcast), so the
    #: learner hands over the weights where training holds them instead of a host copy.
    from_device: bool = False

    @abstractmethod
    def publish(self, version: int, named_tensors: NamedTensors, *, rewind: bool = False) -> float:
        """Make ``named_tensors`` (any device, any floating dtype) version ``version`` for every
        receiver; returns the wall seconds it took. ``rewind``: a resumed learner republishes an
        older version than it published before, which receivers must then load."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release sockets, groups and threads."""


class WeightReceiver(ABC):
    """Rollout-engine side of a transport."""

    #: the version loaded last, -1 before the first
    version: int = -1
    #: True when :meth:`receive` loads the weights into the engine itself (inside vLLM's workers)
    #: and hands nothing to ``into``; the caller then only records the version.
    loads_engine: bool = False

    @abstractmethod
    def latest_version(self) -> int:
        """The newest published version, -1 before the learner published any. Cheap: polled
        between generations."""

    def has_update(self) -> bool:
        """True when :meth:`receive` has something to load (poll this between generations)."""
        return self.latest_version() not in (-1, self.version)

    @abstractmethod
    def receive(self, into: Into) -> int | None:
        """Load the newest version if it differs from :attr:`version`; returns the version
        loaded, or None when there was nothing new. ``into`` is the engine's model (weights are
        copied into its state dict by name) or a callback given ``{name: tensor}``.
        Raises WeightSyncError when the sampled checksum does not match."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release sockets, groups and threads."""


# ---- helpers shared by the transports ---------------------------------------------------------


def wire_dtype_of(t: torch.Tensor, wire: torch.dtype | None) -> torch.dtype:
    """The dtype ``t`` travels in: its own unless it is floating and a wire dtype is forced."""
    if wire is None or not t.is_floating_point():
        return t.dtype
    return wire


def to_wire(named_tensors: NamedTensors, wire: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies-or-views of the tensors in their wire dtypes (no copy when
    the dtype already matches and the tensor is contiguous)."""
    return {n: t.detach().to(wire_dtype_of(t, wire)).contiguous() for n, t in named_tensors.items()}


def load_into(into: Into, received: dict[str, torch.Tensor], version: int) -> None:
    """Hand ``received`` to the engine: a callback gets it as is; a module gets each tensor
    copied into the parameter or buffer of the same name (cast to its dtype and device), and
    is then checked against what arrived, so a load that silently drops or mangles a tensor
    is caught as well as a corrupted transfer."""
    if not isinstance(into, torch.nn.Module):
        into(received)
        return
    state = into.state_dict()
    missing = sorted(set(received) - set(state))
    if missing:
        raise WeightSyncError(
            f"weights of version {version} name tensors the engine's model does not have: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    with torch.no_grad():
        for name, t in received.items():
            dst = state[name]
            if dst.shape != t.shape:
                raise WeightSyncError(
                    f"weights of version {version}: {name} has shape {tuple(t.shape)}, the "
                    f"engine's model {tuple(dst.shape)}"
                )
            dst.copy_(t)
    cast = {n: state[n].dtype for n in received}
    if sample_checksum({n: state[n] for n in received}) != sample_checksum(received, cast=cast):
        raise WeightSyncError(
            f"weights of version {version} did not load into the engine's model intact"
        )


def split_aliases(named_tensors: NamedTensors) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) travel once:
    returns ``(unique tensors, {alias: name it shares memory with})``, keeping the first name in
    the mapping's order."""
    seen: dict[tuple[Any, ...], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in named_tensors.items():
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


def with_aliases(
    tensors: dict[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """``tensors`` plus each alias pointing at the tensor it shares memory with."""
    missing = sorted(a for a, target in aliases.items() if target not in tensors)
    if missing:
        raise WeightSyncError(f"weights name aliases of tensors that did not arrive: {missing[:5]}")
    return {**tensors, **{a: tensors[target] for a, target in aliases.items()}}

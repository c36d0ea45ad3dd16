"""One interface for every weight-sync transport.

A :class:`WeightPublisher` lives in learner rank 0 and is handed ``(version, named tensors)``
after each step; a :class:`WeightReceiver` lives in each rollout engine, which polls
:meth:`WeightReceiver.latest_version` between generations and calls
:meth:`WeightReceiver.receive` to load the newest weights into its model. Every version carries
a sampled checksum (:func:`~services.weightsync.checksum.sample_checksum`) computed by the
publisher from the bytes it sends and by the receiver from the bytes it got; a mismatch raises
:class:`~services.weightsync.checksum.WeightSyncError`, which the rollout actor turns into a
run stop.

Receivers load a version *bucket by bucket* into a :class:`WeightLoader` (a module and a plain
callback are wrapped into one): ``begin``, ``load`` per bucket, ``finish``. They never hold the
version whole. A version that fails after its first bucket landed leaves the receiver
:attr:`~WeightReceiver.dirty` (its engine holds a mix of two versions); an engine must not
generate until a complete version has loaded again (the collective receiver restores itself
from the catch-up files, or takes the next publish whole).

Versions normally grow; a learner that resumes from a checkpoint republishes the checkpoint's
version with ``rewind=True``, and receivers then load it although it is older than theirs:
a receiver loads whatever is *different* from what it holds, not only what is newer.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Union

import torch

from services.weightsync.checksum import WeightSyncError, sample_checksum

NamedTensors = Mapping[str, torch.Tensor]
LoadFn = Callable[[dict[str, torch.Tensor]], None]


class WeightLoader:
    """Where a receiver puts one version, a bucket at a time: :meth:`begin`, :meth:`load` once
    per bucket (each bucket already checked against its part of the sampled checksum), then
    :meth:`finish`; :meth:`abort` instead of finish when the version fails after begin.

    The tensors given to :meth:`load` are valid only during the call (views into a receive
    buffer the next bucket reuses): copy them into the model, never keep them.
    """

    def begin(self, version: int) -> None:
        """A version starts arriving."""

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def finish(self, version: int) -> None:
        """Every bucket of ``version`` loaded and the whole version's checksum matched."""

    def abort(self) -> None:
        """The version failed after :meth:`begin`; the model holds part of it."""


class _ModuleLoader(WeightLoader):
    """Copies each bucket into the module's state by name and checks what landed."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.version = -1
        self.state: dict[str, torch.Tensor] | None = None

    def begin(self, version: int) -> None:
        self.version, self.state = version, self.module.state_dict()

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.state is None:
            self.begin(self.version)
        copy_into_state(self.state, tensors, self.version)  # type: ignore[arg-type]

    def finish(self, version: int) -> None:
        self.state = None

    abort = finish  # type: ignore[assignment]


class _FnLoader(WeightLoader):
    """Calls ``fn`` with each bucket."""

    def __init__(self, fn: LoadFn) -> None:
        self.fn = fn

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fn(tensors)


Into = Union[torch.nn.Module, LoadFn, WeightLoader]  # noqa: UP007 (a runtime alias, py3.10 safe)


def as_loader(into: Into) -> WeightLoader:
    """``into`` as a :class:`WeightLoader`: a module gets each bucket copied into its state
    (and checked), a callback is called with each bucket."""
    if isinstance(into, WeightLoader):
        return into
    if isinstance(into, torch.nn.Module):
        return _ModuleLoader(into)
    return _FnLoader(into)


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
    #: True while the engine holds part of a version: one is arriving, or one failed midway
    #: (the engine must not generate until a whole version loaded again)
    dirty: bool = False
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

    def _load_version(
        self, into: Into, version: int, buckets: Iterable[dict[str, torch.Tensor]]
    ) -> None:
        """Load ``version`` bucket by bucket (``buckets`` may be a generator that receives and
        checks each one as it is asked for); :attr:`dirty` from the first bucket until the
        last loaded and the version's checksum matched, and left set when it fails."""
        loader = as_loader(into)
        self.dirty = True
        loader.begin(version)
        try:
            for bucket in buckets:
                loader.load(bucket)
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                loader.abort()
            raise
        loader.finish(version)
        self.version = version
        self.dirty = False


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


def copy_into_state(
    state: dict[str, torch.Tensor], received: dict[str, torch.Tensor], version: int
) -> None:
    """Copy each tensor of ``received`` into the state tensor of the same name (cast to its
    dtype and device), then check them against what arrived, so a load that silently drops or
    mangles a tensor is caught as well as a corrupted transfer."""
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


def chunked(
    tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Groups of consecutive tensors of about ``max_bytes`` each (a larger tensor alone)."""
    group: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if group and size + nbytes > max_bytes:
            yield group
            group, size = {}, 0
        group[name] = t
        size += nbytes
    if group:
        yield group


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


def bucket_aliases(
    tensors: dict[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """``tensors`` (one bucket) plus each alias whose tensor is in it."""
    extra = {a: tensors[target] for a, target in aliases.items() if target in tensors}
    return {**tensors, **extra} if extra else tensors


def with_aliases(
    tensors: dict[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """``tensors`` plus each alias pointing at the tensor it shares memory with."""
    missing = sorted(a for a, target in aliases.items() if target not in tensors)
    if missing:
        raise WeightSyncError(f"weights name aliases of tensors that did not arrive: {missing[:5]}")
    return {**tensors, **{a: tensors[target] for a, target in aliases.items()}}

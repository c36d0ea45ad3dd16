"""The Ray object-store transport behind the common interface (one machine or a Ray cluster).

The learner ``ray.put``s the wire-dtype tensors (on CPU) once per version and hands the ref to
the run's :class:`~services.weightsync.ray_store.WeightStore` actor with a sampled checksum;
engines fetch the ref when its version differs from theirs. The store keeps only the latest ref,
so the object store holds one copy of the weights however long the run.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from services.weightsync.base import (
    Into,
    NamedTensors,
    WeightPublisher,
    WeightReceiver,
    to_wire,
)
from services.weightsync.checksum import sample_checksum, verify_checksum
from services.weightsync.ray_store import RayWeightSource, get_or_create_store


class ObjectStorePublisher(WeightPublisher):
    """``store``: the weight store actor handle (default: the run namespace's, created if needed)."""

    def __init__(
        self,
        namespace: str,
        store: Any = None,
        wire: torch.dtype | None = None,
        sample_every: int = 1,
        sample_elements: int = 1024,
    ) -> None:
        self.store = store if store is not None else get_or_create_store(namespace)
        self.wire = wire
        self.sample = (sample_every, sample_elements)

    def publish(self, version: int, named_tensors: NamedTensors, *, rewind: bool = False) -> float:
        import ray

        t0 = time.perf_counter()
        wire = {n: t.to("cpu") for n, t in to_wire(named_tensors, self.wire).items()}
        checksum = sample_checksum(wire, *self.sample)
        ref = ray.put(wire)
        # waiting for the store orders versions: an engine that sees v can fetch v
        ray.get(self.store.publish.remote(version, [ref], checksum, rewind))
        return time.perf_counter() - t0


class ObjectStoreReceiver(WeightReceiver):
    """Polls the run's weight store; accepts sampled checksums and the full ones earlier
    publishers sent."""

    def __init__(
        self,
        namespace: str,
        timeout_s: float = 300.0,
        sample_every: int = 1,
        sample_elements: int = 1024,
    ) -> None:
        self.source = RayWeightSource(namespace, timeout_s)
        self.sample = (sample_every, sample_elements)
        self.version = -1

    def latest_version(self) -> int:
        return self.source.latest_version()

    def receive(self, into: Into) -> int | None:
        if self.latest_version() in (-1, self.version):
            return None
        got = self.source.fetch()
        if got is None or got[0] == self.version:
            return None
        version, tensors, checksum = got
        verify_checksum(checksum, tensors, version, "Ray object store", *self.sample)
        # the object store hands the version over whole: one bucket
        self._load_version(into, version, [tensors])
        return version

"""Methods vLLM grafts onto each of its workers (``worker_extension_cls``), so the rollout
engine can update weights in place through ``collective_rpc``.

vLLM resolves this class by its qualified name inside every worker process and adds it to the
worker's bases; ``self`` is then the worker, which holds the live model in ``model_runner``.
Names start with ``d3s_`` because vLLM refuses an extension attribute the worker already has.
It imports vLLM only inside the worker methods, so its wire helpers load without vLLM.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch

from services.weightsync.base import WeightLoader

WORKER_EXTENSION = f"{__name__}.WeightUpdateExtension"

# A tensor on the wire: (name, dtype name, shape, raw bytes). Plain bytes cross every vLLM
# message layer (msgpack to the engine process, shared-memory broadcast to the workers) as
# they are, whereas a tensor nested in a list comes out of msgpack as a list.
WireTensor = tuple[str, str, list[int], bytes]


def to_wire(name: str, tensor: torch.Tensor) -> WireTensor:
    """``tensor`` as ``(name, dtype, shape, bytes)`` (copied to CPU, any dtype incl. bf16)."""
    t = tensor.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), data


def from_wire(item: WireTensor) -> tuple[str, torch.Tensor]:
    """Inverse of :func:`to_wire`."""
    name, dtype_name, shape, data = item
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name}: unknown dtype {dtype_name!r}")
    if len(data) == 0:
        return name, torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return name, flat.view(dtype).reshape(shape)


def _layerwise_reload():
    """vLLM's in-place reload hooks ``(initialize, finalize)``, or ``None`` on a version
    without them (there ``model.load_weights`` on the live model is the whole update)."""
    try:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
    except ImportError:
        return None
    return initialize_layerwise_reload, finalize_layerwise_reload


class WeightUpdateExtension:
    """Weight loading and inspection on a vLLM worker (``self`` is the worker).

    An update is ``d3s_begin_update``, then ``d3s_load_weights`` once per chunk, then
    ``d3s_finish_update``. Why three calls: after the first load vLLM repacks some weights
    into kernel layouts (on CPU the linear layers) and drops the per-parameter loaders, so
    ``model.load_weights`` cannot be called on the live model as it is. vLLM's layerwise
    reload puts the checkpoint-format parameters back, and re-runs each layer's processing
    as soon as all of that layer's tensors have arrived, copying the result into the original
    storage; the finish call processes what is left (layers sent nothing keep their weights).
    """

    def d3s_begin_update(self) -> None:
        hooks = _layerwise_reload()
        if hooks is not None:
            hooks[0](self.model_runner.get_model())

    def d3s_load_weights(self, weights: list[WireTensor]) -> int:
        """Copy Hugging Face-named tensors (:func:`to_wire` form) into the model with the
        model's own loader (which handles vLLM's fused q/k/v and gate/up projections and
        tensor-parallel sharding); returns how many tensors were given."""
        model = self.model_runner.get_model()
        with torch.no_grad():
            model.load_weights(weights=(from_wire(w) for w in weights))
        return len(weights)

    def d3s_finish_update(self) -> None:
        hooks = _layerwise_reload()
        if hooks is not None:
            with torch.no_grad():
                hooks[1](self.model_runner.get_model(), self.vllm_config.model_config)

    def d3s_weights_digest(self) -> str:
        """sha256 over every parameter of the live model (names and bytes, float32), to check
        that a load changed what the worker computes with."""
        model = self.model_runner.get_model()
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    # ---- the weight group: buckets straight into this worker's parameters ----------------------
    #
    # Why the worker joins the group itself: through collective_rpc every tensor would be
    # serialised in the rollout actor, copied through vLLM's message layers and deserialised
    # here. As a member of the learner's broadcast group (gloo on CPU, NCCL on GPU) the worker
    # receives each bucket once, on its own device, and loads it from there; the RPCs below
    # carry only names, numbers and strings.

    def d3s_join_weight_group(self, address: str, name: str, options: dict[str, Any]) -> str:
        """Join the learner's weight group at ``address`` as ``name`` (suffixed with this
        worker's rank when the engine has several); ``options`` are
        :class:`~services.weightsync.collective.CollectiveReceiver`'s keyword arguments
        (``catchup_dir``, ``timeout_s``, ``sample_every``, ``sample_elements``) and ``digest``
        (hash the live parameters after each load). Returns the member name used."""
        from services.weightsync.collective import CollectiveReceiver

        options = dict(options)
        self._d3s_digest = bool(options.pop("digest", False))
        member = name if self.parallel_config.world_size == 1 else f"{name}-w{self.rank}"
        device = getattr(self, "device", None) or torch.device("cpu")
        self._d3s_receiver = CollectiveReceiver(address, member, device=device, **options)
        return member

    def d3s_weights_latest(self) -> int:
        return self._d3s_receiver.latest_version()

    def d3s_weights_has_update(self) -> bool:
        return self._d3s_receiver.has_update()

    def d3s_weights_receive(self) -> tuple[int | None, str | None, float, bool]:
        """Take part in the pending broadcasts (or load the catch-up files) into the live model,
        bucket by bucket as they arrive; returns ``(version loaded or None, sha256 of the live
        parameters when asked for, seconds spent in vLLM's own weight loading, whether the
        model holds part of a version: one failed midway and is not restored yet)``."""
        loader = _BucketLoader(self)
        version = self._d3s_receiver.receive(loader)
        digest = self.d3s_weights_digest() if version is not None and self._d3s_digest else None
        return version, digest, loader.load_s, self._d3s_receiver.dirty

    def d3s_leave_weight_group(self) -> None:
        receiver = getattr(self, "_d3s_receiver", None)
        if receiver is not None:
            receiver.close()
            self._d3s_receiver = None


class _BucketLoader(WeightLoader):
    """A worker's model as the place the weight group's receiver loads each bucket into as it
    arrives, through vLLM's layerwise reload (begin, the model's own ``load_weights`` per
    bucket, finish). The reload keeps the tensors of a layer whose weights have not all
    arrived until the rest comes, possibly in a later bucket; the receiver reuses its buffers
    for later buckets, so those tensors are copied first (freed once their layer is loaded)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.load_s = 0.0
        self._copy = _layerwise_reload() is not None

    def begin(self, version: int) -> None:
        t0 = time.perf_counter()
        self.worker.d3s_begin_update()
        self.load_s += time.perf_counter() - t0

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        model = self.worker.model_runner.get_model()
        items = ((n, t.clone() if self._copy else t) for n, t in tensors.items())
        with torch.no_grad():
            model.load_weights(weights=items)
        self.load_s += time.perf_counter() - t0

    def finish(self, version: int) -> None:
        t0 = time.perf_counter()
        self.worker.d3s_finish_update()
        self.load_s += time.perf_counter() - t0

    def abort(self) -> None:
        """Close the reload (the layers keep what they got); the receiver stays dirty and a
        whole version (the catch-up files, or the next publish) replaces every layer."""
        self.worker.d3s_finish_update()

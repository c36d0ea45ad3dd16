"""The vLLM weight path: how a new weights version gets into a running vLLM engine's workers.

Everything here rides on one worker extension, :class:`WeightUpdateExtension`, whose methods
vLLM grafts onto each of its workers (``worker_extension_cls``) and the engine calls through
``collective_rpc``; the engine is never restarted. Two ways in, each followed by a prefix-cache
reset (cached KV blocks were computed by the old weights):

- The collective transport: each worker joins the learner's broadcast group itself, as
  :class:`WeightGroupOptions` says (built once, from the config, by :func:`rollout_receiver`),
  and receives the buckets into its own device memory. The rollout actor polls an
  :class:`EngineWeightReceiver`, whose calls carry only names and version numbers.
- Otherwise (object store, files, or a caller holding a state dict) the tensors travel as bytes
  in ``collective_rpc`` arguments, in chunks of at most ``WEIGHT_CHUNK_BYTES``
  (:func:`weight_chunks`, :meth:`VLLMRolloutEngine.load_weights`).

Why the workers join the group themselves: through ``collective_rpc`` every tensor would be
serialised in the rollout actor, copied through vLLM's message layers and deserialised in the
worker. As a member of the learner's group (gloo on CPU, NCCL on GPU) a worker receives each
bucket once, on its own device, and loads it from there. vLLM's own weight-transfer engines
(``init_weight_transfer_engine``) are NCCL or CUDA IPC only; the extension speaks our
transport's protocol (membership, late joiners from the catch-up files, a dead member's
recovery, checksums) on gloo and NCCL alike.

This module imports vLLM only inside the worker methods, so it loads without vLLM.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from services.rollout.vllm_lora import LoraWorkerExtension
from services.weightsync.base import Into, WeightLoader, WeightReceiver
from services.weightsync.config import WeightSyncConfig

WORKER_EXTENSION = f"{__name__}.WeightUpdateExtension"

# One collective_rpc carries at most this many bytes of tensors (at least one tensor), so an
# update never holds a second full copy of the model in the message layer.
WEIGHT_CHUNK_BYTES = 256 << 20

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


def weight_chunks(
    weights: Iterable[tuple[str, torch.Tensor]], max_bytes: int | None = None
) -> Iterator[list[WireTensor]]:
    """Group named tensors, in wire form, into lists of at most ``max_bytes`` of data (a
    bigger tensor travels alone); ``None``: ``WEIGHT_CHUNK_BYTES``, read at each call."""
    limit = WEIGHT_CHUNK_BYTES if max_bytes is None else max_bytes
    chunk: list[WireTensor] = []
    size = 0
    for name, tensor in weights:
        item = to_wire(name, tensor)
        nbytes = len(item[3])
        if chunk and size + nbytes > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += nbytes
    if chunk:
        yield chunk


@dataclass(frozen=True)
class WeightGroupOptions:
    """How a vLLM engine's workers join the learner's weight group (the collective transport).

    Built once (:meth:`from_config`) and handed to every worker, which makes its
    :class:`~services.weightsync.collective.CollectiveReceiver` from it.

    Attributes:
        address: ``host:port`` of the learner's rendezvous store.
        catchup_dir: The catch-up files a late joiner loads first (None: none).
        timeout_s, sample_every, sample_elements: the receiver's (``weight_sync.*``).
        digest: Hash the live parameters after each load (an audit, one pass over them).
    """

    address: str
    catchup_dir: str | None = None
    timeout_s: float = 300.0
    sample_every: int = 1
    sample_elements: int = 1024
    digest: bool = False

    def __post_init__(self) -> None:
        # A plain string crosses vLLM's message layers; a Path would not.
        if self.catchup_dir is not None:
            object.__setattr__(self, "catchup_dir", str(self.catchup_dir))

    @classmethod
    def from_config(cls, ws: WeightSyncConfig, address: str) -> WeightGroupOptions:
        return cls(
            address,
            catchup_dir=None if ws.path is None else str(ws.path),
            timeout_s=ws.timeout_s,
            sample_every=ws.sample_every,
            sample_elements=ws.sample_elements,
            digest=ws.engine_digest,
        )

    def to_wire(self) -> dict[str, Any]:
        """The options as a plain dict (what ``collective_rpc`` carries to the workers)."""
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WeightGroupOptions:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown weight-group options: {sorted(unknown)}")
        return cls(**data)

    def receiver_kwargs(self) -> dict[str, Any]:
        """``CollectiveReceiver``'s keyword arguments (all but ``address`` and ``digest``)."""
        kwargs = self.to_wire()
        del kwargs["address"], kwargs["digest"]
        return kwargs


def rollout_receiver(
    engine: Any, ws: WeightSyncConfig, namespace: str, name: str, redis_client: Any = None
) -> WeightReceiver:
    """The receiver rollout actor ``name`` polls for new weights.

    An engine whose workers join the weight group themselves (``joins_weight_group``: vLLM)
    with the collective transport: its workers become members and receive into their own
    parameters. Otherwise the learner's CPU tensors (gloo for the collective transport) come to
    the actor, which copies them into its engine on whatever device it runs.
    """
    from services.weightsync.factory import lookup_rendezvous, make_receiver

    if ws.transport != "collective" or not engine.joins_weight_group:
        return make_receiver(ws, namespace, name, device="cpu", redis_client=redis_client)
    address = ws.rendezvous
    if address is None:
        if redis_client is None:
            raise ValueError("weight_sync.rendezvous: needed when no Redis client can look it up")
        address = lookup_rendezvous(redis_client, namespace, ws.timeout_s)
    return EngineWeightReceiver.join(engine, name, WeightGroupOptions.from_config(ws, address))


class EngineWeightReceiver(WeightReceiver):
    """The collective transport's receiving end inside a vLLM engine's workers, seen from the
    rollout actor: each call is one ``collective_rpc`` to every worker, carrying no tensor.

    Attributes:
        members: The weight-group member name of each worker.
        digests: version -> sha256 of the first worker's live parameters after that version
            loaded (only when the options asked for digests).
        last_load_s: Seconds the first worker spent in vLLM's own weight loading
            (``load_weights`` and the layerwise reload) for the last version received.
    """

    loads_engine = True

    def __init__(self, engine: Any, members: list[str]) -> None:
        self.engine = engine
        self.members = list(members)
        self.digests: dict[int, str] = {}
        self.last_load_s = 0.0

    @classmethod
    def join(cls, engine: Any, name: str, options: WeightGroupOptions) -> EngineWeightReceiver:
        """Make every worker of ``engine`` (a :class:`VLLMRolloutEngine`) a member ``name`` of
        the learner's weight group, as ``options`` say."""
        members = engine.collective_rpc("d3s_join_weight_group", name, options.to_wire())
        return cls(engine, members)

    def latest_version(self) -> int:
        return int(self.engine.collective_rpc("d3s_weights_latest")[0])

    def has_update(self) -> bool:
        # Every worker of a tensor-parallel engine is its own member: any one with a broadcast
        # pending means all must take part (they received the same publishes).
        return self.dirty or any(self.engine.collective_rpc("d3s_weights_has_update"))

    def receive(self, into: Into | None = None) -> int | None:
        """Load the pending version(s) inside the workers; ``into`` is not used (the workers
        load their own models). Returns the version loaded, or None."""
        with self.engine.swapping_weights():
            try:
                results = self.engine.collective_rpc("d3s_weights_receive")
            except BaseException:
                # a worker may hold part of a version: generate no more until the workers
                # answer a receive clean
                self.engine.dirty = self.dirty = True
                raise
            # A worker whose version failed midway (dirty) restores itself at its next receive;
            # until then the engine does not generate.
            self.engine.dirty = self.dirty = any(r[3] for r in results)
            versions = {(r[0], r[4]) for r in results}
            if len(versions) != 1:
                raise RuntimeError(
                    f"vLLM workers loaded different weight versions (version, adapter id): "
                    f"{sorted(versions, key=str)}"
                )
            version, digest, load_s, _, adapter_id = results[0]
            if version is None:
                return None
            self.version = int(version)
            self.engine.adopt_version(self.version, adapter_id)
        self.last_load_s = float(load_s)
        if digest is not None:
            self.digests[self.version] = digest
        return self.version

    def close(self) -> None:
        if self.engine.running:
            self.engine.collective_rpc("d3s_leave_weight_group")


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


class WeightUpdateExtension(LoraWorkerExtension):
    """Weight loading and inspection on a vLLM worker (``self`` is the worker, which holds the
    live model in ``model_runner``). vLLM resolves this class by its qualified name
    (``WORKER_EXTENSION``) in every worker process and adds it to the worker's bases; names
    start with ``d3s_`` because vLLM refuses an extension attribute the worker already has.

    An update is ``d3s_begin_update``, then ``d3s_load_weights`` once per chunk, then
    ``d3s_finish_update``. Why three calls: after the first load vLLM repacks some weights
    into kernel layouts (on CPU the linear layers) and drops the per-parameter loaders, so
    ``model.load_weights`` cannot be called on the live model as it is. vLLM's layerwise
    reload puts the checkpoint-format parameters back, and re-runs each layer's processing
    as soon as all of that layer's tensors have arrived, copying the result into the original
    storage; the finish call processes what is left (layers sent nothing keep their weights).
    With LoRA (:class:`~services.rollout.vllm_lora.LoraWorkerExtension`) a version is an
    adapter instead, staged and committed as a new adapter id; the base is never reloaded.
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

    def d3s_join_weight_group(self, name: str, options: dict[str, Any]) -> str:
        """Join the learner's weight group as ``name`` (suffixed with this worker's rank when
        the engine has several), as ``options`` (:meth:`WeightGroupOptions.to_wire`) say.
        Returns the member name used."""
        from services.weightsync.collective import CollectiveReceiver

        opts = WeightGroupOptions.from_wire(options)
        self._d3s_digest = opts.digest
        member = name if self.parallel_config.world_size == 1 else f"{name}-w{self.rank}"
        device = getattr(self, "device", None) or torch.device("cpu")
        self._d3s_receiver = CollectiveReceiver(
            opts.address, member, device=device, **opts.receiver_kwargs()
        )
        return member

    def d3s_weights_latest(self) -> int:
        return self._d3s_receiver.latest_version()

    def d3s_weights_has_update(self) -> bool:
        return self._d3s_receiver.has_update()

    def d3s_weights_receive(self) -> tuple[int | None, str | None, float, bool, int | None]:
        """Take part in the pending broadcasts (or load the catch-up files) into the live model,
        bucket by bucket as they arrive; returns ``(version loaded or None, sha256 of the live
        parameters (with LoRA: of the adapter) when asked for, seconds spent in vLLM's own
        weight loading, whether the model holds part of a version: one failed midway and is not
        restored yet, the version's adapter id with LoRA)``. With LoRA, of several versions
        received at once only the last stays registered (no request ever saw the others)."""
        loader = _BucketLoader(self)
        version = self._d3s_receiver.receive(loader)
        adapter_id = loader.adapter_ids[-1] if version is not None and loader.adapter_ids else None
        self.d3s_lora_drop([i for i in loader.adapter_ids if i != adapter_id])
        digest = None
        if version is not None and self._d3s_digest:
            lora = adapter_id is not None
            digest = self.d3s_lora_digest(adapter_id) if lora else self.d3s_weights_digest()
        return version, digest, loader.load_s, self._d3s_receiver.dirty, adapter_id

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
        self.lora = worker.d3s_lora_on()
        self.adapter_ids: list[int] = []  # with LoRA: one per version committed

    def begin(self, version: int) -> None:
        t0 = time.perf_counter()
        if self.lora:
            self.worker.d3s_lora_begin()
        else:
            self.worker.d3s_begin_update()
        self.load_s += time.perf_counter() - t0

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        if self.lora:  # staged until the version is whole; the buffers are reused meanwhile
            self.worker.d3s_lora_stage_tensors({n: t.clone() for n, t in tensors.items()})
        else:
            model = self.worker.model_runner.get_model()
            items = ((n, t.clone() if self._copy else t) for n, t in tensors.items())
            with torch.no_grad():
                model.load_weights(weights=items)
        self.load_s += time.perf_counter() - t0

    def finish(self, version: int) -> None:
        t0 = time.perf_counter()
        if self.lora:
            self.adapter_ids.append(self.worker.d3s_lora_commit())
        else:
            self.worker.d3s_finish_update()
        self.load_s += time.perf_counter() - t0

    def abort(self) -> None:
        """Close the reload (the layers keep what they got); the receiver stays dirty and a
        whole version (the catch-up files, or the next publish) replaces every layer. With
        LoRA the staged part is dropped; the live adapters were never touched."""
        if self.lora:
            self.worker.d3s_lora_begin()
        else:
            self.worker.d3s_finish_update()

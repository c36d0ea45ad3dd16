"""LoRA on the vLLM engine (``learner.lora`` set): each weight version is an adapter of its own.

With LoRA the base weights never change after vLLM loaded them; a synced version is the adapter
alone (:mod:`services.policy.lora`: ``lora_A``/``lora_B`` tensors under PEFT's saved names, in
the engine's dtype). vLLM is started with ``enable_lora`` (:func:`lora_engine_kwargs`) and
every version is registered in its workers as a new adapter id, from the tensors in memory:

* How the tensors get in. vLLM's own ``add_lora`` reads an adapter from a path
  (``adapter_config.json`` + ``adapter_model.safetensors``). Writing every version to disk only
  for vLLM to read it back would cost a file round trip per sync and a place to clean up, and
  with the collective transport the tensors are already inside the worker. So the worker
  extension (:class:`LoraWorkerExtension`) stages the tensors as they arrive (bytes through
  ``collective_rpc``, or the weight group's buckets received in the worker) and builds vLLM's
  ``LoRAModel`` from them with ``LoRAModel.from_lora_tensors``, the very function vLLM's path
  loader ends in, then adds it to the worker's adapter cache. The ``LoRARequest`` that requests
  carry names a path that does not exist: vLLM only reads the path for an id its cache lacks,
  so a request under an id that was removed fails loudly instead of running on something else.
* Ids. A counter in the worker, one id per loaded version (a resumed learner republishing an
  older version gets a new id, so no id ever changes its tensors under a running request).
* Requests. A round's requests all carry the adapter of the version the engine held when the
  round was admitted, and the round records that version for every token: a version loaded
  between decoding steps (in-flight updates) is registered next to it and used from the next
  round on. No pause is needed and the prefix cache stays valid: vLLM keys cached blocks by
  the adapter's name, one per id.
* Removal. :class:`AdapterBook` counts the rounds using each id and removes an id once it is
  neither the newest nor in use, so at most ``max_staleness + 1`` adapters are resident (vLLM
  is given that many batch slots, and one more cache entry for the version being loaded).

:class:`AdapterBook` keeps an audit: every id added and removed, and every round with the
version and id it ran under and a sample of what it produced (a response's tokens and
log-probs), which tests compare with a reference model holding that version merged in.

This module imports vLLM only inside functions, so it loads without vLLM.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from services.policy.lora import LoraConfig

# vLLM accepts only these as max_lora_rank.
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Audit entries kept (oldest dropped first), so a long run's audit stays bounded.
AUDIT_EVENTS = 2_000


def vllm_max_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    for r in VLLM_MAX_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"learner.lora.rank: {rank} exceeds vLLM's largest max_lora_rank (512)")


def lora_engine_kwargs(lora: LoraConfig, slots: int) -> dict[str, Any]:
    """``vllm.LLM`` arguments for adapters of ``lora``'s shape, ``slots`` of them in one batch
    (``max_staleness + 1``: every version a round may still be admitted under); the cache holds
    one more, the version being loaded before the oldest is removed."""
    if slots < 1:
        raise ValueError(f"LoRA adapter slots must be >= 1, got {slots}")
    return {
        "enable_lora": True,
        "max_lora_rank": vllm_max_rank(lora.rank),
        "max_loras": slots,
        "max_cpu_loras": slots + 1,
    }


def peft_fields(lora: LoraConfig) -> dict[str, Any]:
    """What vLLM reads of an adapter's ``adapter_config.json`` (its ``PEFTHelper``)."""
    return {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": list(lora.target_modules)}


def adapter_request(version: int, adapter_id: int) -> Any:
    """The ``LoRARequest`` of adapter ``adapter_id`` (weights ``version``). Its path does not
    exist: the adapter lives in the workers' cache only (see the module's docstring)."""
    from vllm.lora.request import LoRARequest

    name = f"d3s-v{version}-a{adapter_id}"
    return LoRARequest(name, adapter_id, f"/nonexistent/d3s-in-memory-adapter/{name}")


class AdapterBook:
    """The engine's record of the adapters in its workers: which id holds which version, which
    rounds use which id, and when an id may go.

    Attributes:
        current: ``(version, id)`` of the newest adapter, None before the first.
        events: The audit, oldest first: ``{"event": "add" | "remove", "version", "adapter_id"}``
            and ``{"event": "round", "version", "adapter_id", "requests", "sample"}``; a round's
            ``sample`` (:meth:`RoundAdapter.record`) is kept for the first round under each id
            only, so the audit grows with the versions, not the rounds.
    """

    def __init__(self) -> None:
        self.current: tuple[int, int] | None = None
        self.live: dict[int, int] = {}  # adapter id -> version
        self.in_use: Counter[int] = Counter()
        self._sampled: set[int | None] = set()
        self.events: deque[dict[str, Any]] = deque(maxlen=AUDIT_EVENTS)

    def add(self, version: int, adapter_id: int) -> None:
        """Adapter ``adapter_id`` now holds ``version`` in the workers and is the newest."""
        if adapter_id in self.live:
            raise RuntimeError(f"adapter id {adapter_id} registered twice")
        self.live[adapter_id] = version
        self.current = (version, adapter_id)
        self.events.append({"event": "add", "version": version, "adapter_id": adapter_id})

    def acquire(self) -> tuple[int, int] | None:
        """The newest ``(version, id)`` for a round that starts now (held until :meth:`release`);
        None before any adapter (the base model, as version 0's zero adapter computes)."""
        if self.current is not None:
            self.in_use[self.current[1]] += 1
        return self.current

    def release(self, held: tuple[int, int] | None, requests: int, sample: Any = None) -> None:
        """The round that held ``held`` is over (its ``requests`` finished or were aborted)."""
        version, adapter_id = held if held is not None else (None, None)
        if adapter_id is not None:
            self.in_use[adapter_id] -= 1
            if self.in_use[adapter_id] <= 0:
                del self.in_use[adapter_id]
        if adapter_id in self._sampled:
            sample = None
        elif sample is not None:
            self._sampled.add(adapter_id)
        self.events.append(
            {
                "event": "round",
                "version": version,
                "adapter_id": adapter_id,
                "requests": requests,
                "sample": sample,
            }
        )

    def removable(self) -> list[int]:
        """Ids neither the newest nor used by a running round."""
        newest = None if self.current is None else self.current[1]
        return [i for i in self.live if i != newest and not self.in_use[i]]

    def removed(self, adapter_id: int) -> None:
        if self.in_use[adapter_id]:
            raise RuntimeError(f"adapter id {adapter_id} removed while a round uses it")
        version = self.live.pop(adapter_id)
        self.events.append({"event": "remove", "version": version, "adapter_id": adapter_id})


def audit_errors(events: list[dict[str, Any]]) -> list[str]:
    """What an :class:`AdapterBook` audit shows went wrong: a round under an id never added or
    already removed, an id added twice. Empty when every round ran under a live adapter."""
    live: set[int] = set()
    gone: set[int] = set()
    errors = []
    for e in events:
        i = e["adapter_id"]
        if e["event"] == "add":
            if i in live or i in gone:
                errors.append(f"adapter id {i} added twice")
            live.add(i)
        elif e["event"] == "remove":
            live.discard(i)
            gone.add(i)
        elif i is not None and i not in live:
            errors.append(f"a round (version {e['version']}) ran under adapter id {i}, not live")
    return errors


class EngineAdapters:
    """A :class:`~services.rollout.vllm_engine.VLLMRolloutEngine`'s adapters, seen from the
    engine's process: loading a version as a new id, the request a round runs under, removal.

    Attributes:
        book: The :class:`AdapterBook` (its ``events`` are the audit).
    """

    def __init__(self, engine: Any, lora: LoraConfig) -> None:
        self.engine = engine
        self.lora = lora
        self.book = AdapterBook()
        engine.collective_rpc("d3s_lora_setup", peft_fields(lora))

    def begin(self) -> None:
        self.engine.collective_rpc("d3s_lora_begin")

    def stage(self, weights: Any) -> None:
        from services.rollout.vllm_weights import weight_chunks

        for chunk in weight_chunks(weights):
            self.engine.collective_rpc("d3s_lora_stage", chunk)

    def commit(self) -> int:
        """The staged version as a new adapter in every worker; returns its id."""
        ids = set(self.engine.collective_rpc("d3s_lora_commit"))
        if len(ids) != 1:
            raise RuntimeError(f"vLLM workers gave one adapter different ids: {sorted(ids)}")
        return ids.pop()

    def adopt(self, version: int, adapter_id: int | None) -> None:
        """Adapter ``adapter_id`` holds ``version``: rounds from now on run under it, and the
        ids no round uses any more go."""
        if adapter_id is None:
            raise RuntimeError(f"version {version} loaded without an adapter id under LoRA")
        self.book.add(version, adapter_id)
        self.prune()

    def prune(self) -> None:
        llm_engine = self.engine.llm_engine
        for adapter_id in self.book.removable():
            llm_engine.remove_lora(adapter_id)
            self.book.removed(adapter_id)

    @contextlib.contextmanager
    def round(self) -> Iterator[RoundAdapter]:
        """The adapter a round admitted now runs under, held (never removed) until it ends."""
        held = self.book.acquire()
        r = RoundAdapter(None if held is None else adapter_request(*held))
        try:
            if held is not None and held[1] not in self.engine.llm_engine.list_loras():
                raise RuntimeError(f"adapter id {held[1]} (version {held[0]}) is not in vLLM")
            yield r
        finally:
            self.book.release(held, r.requests, r.sample)
            self.prune()

    def digest(self) -> str:
        """sha256 of the newest adapter as the first worker holds it."""
        if self.book.current is None:
            raise RuntimeError("no adapter loaded yet")
        return self.engine.collective_rpc("d3s_lora_digest", self.book.current[1])[0]

    def audit(self) -> list[dict[str, Any]]:
        return list(self.book.events)


@dataclass
class RoundAdapter:
    """What a round runs under (``request``: a ``LoRARequest``, None for the base model) and
    what it reports to the audit."""

    request: Any
    requests: int = 0
    sample: dict[str, Any] | None = None

    def record(self, prompt: list[int], sampled: Any, version: int, *, greedy: bool) -> None:
        """Keep the round's first response (a :class:`~services.rollout.engine.Sampled` row)
        for the audit: its prompt, tokens and log-probs, and the version it ran under."""
        k = int(sampled.response_lengths[0])
        self.sample = {
            "version": version,
            "prompt": list(prompt),
            "tokens": sampled.responses[0, :k].tolist(),
            "logps": sampled.behav_logp[0, :k].tolist(),
            "greedy": greedy,
        }


class LoraWorkerExtension:
    """The worker side (mixed into :class:`services.rollout.vllm_weights.WeightUpdateExtension`;
    ``self`` is a vLLM worker): an adapter version is staged tensor by tensor, then committed
    as a new id in the worker's adapter cache."""

    def d3s_lora_setup(self, fields: dict[str, Any]) -> None:
        """Adapters of this shape (:func:`peft_fields`) arrive from now on."""
        self._d3s_lora = dict(fields)
        self._d3s_lora_staged: dict[str, torch.Tensor] = {}
        self._d3s_lora_next = 0

    def d3s_lora_on(self) -> bool:
        return getattr(self, "_d3s_lora", None) is not None

    def d3s_lora_begin(self) -> None:
        """A version starts arriving (a half-staged one is dropped)."""
        self._d3s_lora_staged = {}

    def d3s_lora_stage(self, weights: list[Any]) -> int:
        """Stage tensors in wire form (``vllm_weights.to_wire``); returns how many."""
        from services.rollout.vllm_weights import from_wire

        self.d3s_lora_stage_tensors(dict(from_wire(w) for w in weights))
        return len(weights)

    def d3s_lora_stage_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._d3s_lora_staged.update(tensors)

    def d3s_lora_commit(self) -> int:
        """The staged tensors as a new adapter in the cache; returns its id."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        staged, self._d3s_lora_staged = self._d3s_lora_staged, {}
        manager = self.model_runner.lora_manager
        # the cache vLLM's own path loader adds to (its add_adapter reads a path)
        cache = manager._adapter_manager
        _check_adapter_names(staged, cache)
        helper = PEFTHelper.from_dict(
            {**self._d3s_lora, "vllm_max_position_embeddings": manager.max_position_embeddings}
        )
        helper.validate_legal(manager.lora_config)
        if len(cache) + 1 > cache.capacity:
            # vLLM would evict the least recently used adapter, which a round may still need.
            raise RuntimeError(
                f"vLLM's adapter cache is full ({len(cache)} of {cache.capacity}): adapters "
                "in use were not removed"
            )
        self._d3s_lora_next += 1
        mapper = getattr(cache.model, "hf_to_vllm_mapper", None)
        lora = LoRAModel.from_lora_tensors(
            lora_model_id=self._d3s_lora_next,
            tensors=staged,
            peft_helper=helper,
            device="cpu",
            dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size,
            weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
        )
        cache.add_adapter(lora)
        return self._d3s_lora_next

    def d3s_lora_drop(self, adapter_ids: list[int]) -> None:
        """Remove adapters that no request was ever given (superseded within one receive)."""
        for i in adapter_ids:
            self.model_runner.lora_manager.remove_adapter(i)

    def d3s_lora_digest(self, adapter_id: int) -> str:
        """sha256 over the tensors vLLM holds for adapter ``adapter_id`` (module names, float32
        bytes), to check that a version's adapter arrived intact."""
        lora = self.model_runner.lora_manager._adapter_manager.get_adapter(adapter_id)
        if lora is None:
            raise KeyError(f"adapter id {adapter_id} is not in the worker's cache")
        h = hashlib.sha256()
        for module, weights in sorted(lora.loras.items()):
            h.update(module.encode())
            for part in (weights.lora_a, weights.lora_b):
                for t in part if isinstance(part, list) else [part]:
                    if t is not None:
                        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _check_adapter_names(tensors: dict[str, torch.Tensor], cache: Any) -> None:
    """Raise ValueError unless ``tensors`` is a whole adapter: only ``lora_A``/``lora_B``
    weights of layers vLLM puts adapters on, each layer with both."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    if not tensors:
        raise ValueError("an adapter version with no tensors")
    expected = set()
    for module in cache.supported_lora_modules:
        expected.update(cache.packed_modules_mapping.get(module, [module]))
    halves: dict[str, set[bool]] = {}
    for name in tensors:
        if ".lora_A." not in name and ".lora_B." not in name:
            raise ValueError(f"{name}: not a LoRA adapter tensor (a full weight under LoRA?)")
        module, is_a = parse_fine_tuned_lora_name(name)
        if module.rsplit(".", 1)[-1] not in expected:
            raise ValueError(f"{name}: vLLM has no adapter on {module} (it has {sorted(expected)})")
        halves.setdefault(module, set()).add(is_a)
    lacking = [m for m, h in halves.items() if len(h) != 2]
    if lacking:
        raise ValueError(f"adapter layers without both lora_A and lora_B: {lacking[:5]}")

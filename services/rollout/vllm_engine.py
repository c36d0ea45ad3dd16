"""Rollout engine on vLLM (``rollout.engine: vllm``), behind the same interface as the HF one.

vLLM is imported inside this module only, and only when an engine is built, so the rest of
the project (and its CI) never needs it.

Behaviour log-probs. The learner's truncated importance weight is
``min(pi_theta(y_t) / mu(y_t), C)``: ``mu`` must be the distribution each token was actually
drawn from, or the weights correct for the wrong thing (raw log-probs would call a token that
top-p made certain "unlikely" and inflate its weight). vLLM is therefore started with
``logprobs_mode="processed_logprobs"``: the log-prob it reports is ``log_softmax`` of the logits
after temperature and top-p/top-k (and any penalties, which we leave off), i.e. of the very
tensor its sampler draws from, in float32; requesting ``logprobs=0`` returns exactly the
sampled token's entry. This is the same quantity the HF engine gathers. For greedy requests
vLLM applies no temperature, so :meth:`VLLMRolloutEngine.greedy` reports the temperature-1
log-prob, as the HF engine's ``greedy`` does.

Stopping. vLLM is told to ignore its own idea of EOS and to stop on ``stop_token_ids`` only,
and it reads no generation config from the checkpoint (``generation_config="vllm"``), so the
stop set and the sampling settings are exactly ours. Prompts go in as token ids and responses
are decoded by our tokenizer (``skip_tokenizer_init``), so prompt encoding is identical for
both engines.

Weights. They load in place through a worker extension, the engine never restarted: as bytes in
``collective_rpc`` calls (:meth:`VLLMRolloutEngine.load_weights`), or with the collective
transport by the workers themselves as members of the learner's weight group. Both live in
:mod:`services.rollout.vllm_weights`; this module holds the engine and its stepped loop.

In-flight updates. ``generate(..., between_steps=hook)`` drives vLLM's engine one step at a time
and calls the hook between steps; a weight load the hook starts pauses the scheduler with its
requests kept (``pause_scheduler("keep")``: no step runs, KV caches stay), loads, relabels the
engine's weight version and resumes. vLLM stamps every step's tokens with the label it ran under,
so each token's version comes back exactly (``CompletionOutput.weight_versions``). The prefix
cache, which may hold blocks of the old weights, is dropped once the round's requests are done.

LoRA (``lora`` given, :mod:`services.rollout.vllm_lora`): every version is an adapter of its own
id and the base weights never change. A round runs under the adapter of the version it was
admitted with, to its end: a version loaded between its steps serves the next round, so every
token of a round records the version it started with.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.rollout.engine import (
    BetweenSteps,
    RolloutEngine,
    Sampled,
    cut_at_stop,
    pack_rows,
)
from services.rollout.vllm_lora import EngineAdapters, lora_engine_kwargs
from services.rollout.vllm_weights import WORKER_EXTENSION, weight_chunks

if TYPE_CHECKING:
    from services.policy.lora import LoraConfig

# vLLM refuses sampling temperatures above this.
MAX_TEMPERATURE = 2.0


def prompt_seed(seed: int, prompt_index: int, n: int) -> int:
    """Seed of prompt ``prompt_index``'s request; vLLM gives its ``n`` samples ``s .. s+n-1``,
    so consecutive prompts get disjoint ranges and no two samples of one call share noise."""
    return (int(seed) * 1_000_003 + prompt_index * n) % (2**31 - 1)


def token_versions(spans: Sequence[Any] | None, length: int, default: int) -> list[int]:
    """Per-token weight versions of a response's first ``length`` tokens from vLLM's spans
    (``version`` label, ``start``, ``end``); ``default`` where vLLM reported none."""
    out = [default] * length
    for span in spans or ():
        for j in range(max(span.start, 0), min(span.end, length)):
            out[j] = int(span.version)
    return out


class VLLMRolloutEngine(RolloutEngine):
    """Sample responses with vLLM and return a :class:`RolloutBatch`.

    Args:
        model_path: Local Hugging Face model directory vLLM loads the first weights from.
        tokenizer: The policy's tokenizer (encodes prompts, decodes responses).
        max_new_tokens: Response length limit (stop token included).
        temperature: Sampling temperature, in (0, 2] (vLLM's range).
        top_p: Nucleus threshold in (0, 1]; 1 disables it. Top-k is always off.
        stop_token_ids: Token ids that end a response; ``None``: the tokenizer's EOS and the
            chat template's end-of-turn token when it has one.
        gpu_memory_utilization: Fraction of GPU memory vLLM may take (weights + KV cache).
        tensor_parallel_size: GPUs one engine shards the model over.
        enforce_eager: Skip CUDA-graph capture (slower decoding, faster start, less memory).
        max_model_len: Longest prompt + response; ``None`` takes the model's own limit.
        dtype: Parameter dtype (``"auto"``, ``"bfloat16"``, ``"float32"``...).
        seed: vLLM's global seed (each request also carries its own).
        cpu_kv_cache_gib: KV cache size on vLLM's CPU platform (its ``kv_cache_memory_bytes``),
            instead of ``gpu_memory_utilization`` read there as a share of all RAM; ignored on
            GPU. ``VLLM_CPU_KVCACHE_SPACE``, when set, overrides it inside vLLM.
        engine_kwargs: Further ``vllm.LLM`` arguments (e.g. ``kv_cache_memory_bytes``).
        lora: Versions are LoRA adapters of this shape on the model at ``model_path``
            (None: versions are full weights).
        lora_slots: With ``lora``, adapters one batch may use (``max_staleness + 1``).

    Raises:
        ValueError: on a bad setting, naming it.
    """

    # With the collective transport the workers receive the weights themselves
    # (services.rollout.vllm_weights), not the rollout actor.
    joins_weight_group = True
    positions_source = "max_model_len"

    def __init__(
        self,
        model_path: str | Path,
        tokenizer,
        max_new_tokens: int = 5,
        temperature: float = 1.0,
        top_p: float = 1.0,
        *,
        stop_token_ids: Sequence[int] | None = None,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        cpu_kv_cache_gib: float | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        lora: LoraConfig | None = None,
        lora_slots: int = 1,
    ) -> None:
        super().__init__(tokenizer, max_new_tokens, temperature, top_p, stop_token_ids)
        if temperature > MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be <= {MAX_TEMPERATURE} for vLLM, got {temperature}"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if max_model_len is not None and max_model_len <= max_new_tokens:
            raise ValueError(
                f"max_model_len ({max_model_len}) must exceed max_new_tokens ({max_new_tokens})"
            )
        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(f"{model_path} is not a model directory (no config.json)")
        from vllm import LLM, SamplingParams  # only here: vLLM is an optional dependency
        from vllm.platforms import current_platform

        engine_kwargs = dict(engine_kwargs or {})
        if cpu_kv_cache_gib is not None and current_platform.is_cpu():
            engine_kwargs.setdefault("kv_cache_memory_bytes", int(cpu_kv_cache_gib * (1 << 30)))
        if lora is not None:
            engine_kwargs.update(lora_engine_kwargs(lora, lora_slots))
        self._sampling_params_cls = SamplingParams
        self._llm = LLM(
            model=str(model_path),
            skip_tokenizer_init=True,
            generation_config="vllm",
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            **engine_kwargs,
        )
        self.max_positions = int(self._llm.llm_engine.model_config.max_model_len)
        self._request_ids = itertools.count()
        self._in_round = False  # requests are being stepped: a weight load must pause them
        self._update: contextlib.ExitStack | None = None
        self._prefix_cache_stale = False
        self._core_call("set_weight_version", str(self.version))
        self.adapters = None if lora is None else EngineAdapters(self, lora)

    @property
    def model(self) -> None:
        """vLLM keeps the model inside its workers; there is none in this process."""
        return None

    @property
    def running(self) -> bool:
        """False once :meth:`shutdown` stopped vLLM."""
        return getattr(self, "_llm", None) is not None

    @property
    def llm_engine(self) -> Any:
        return self._llm.llm_engine

    def collective_rpc(self, method: str | Callable[..., Any], *args: Any) -> list[Any]:
        """Call ``method`` on every worker (a worker-extension method's name, or a function
        given the worker first); one result per worker."""
        if not self.running:
            raise RuntimeError("the vLLM engine is not running (shut down)")
        return self._llm.collective_rpc(method, args=args)

    # ---- weights -------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy a full Hugging Face-named state dict into the running engine; set ``version``."""
        self.load_weights(state_dict.items(), version)

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None
    ) -> None:
        """Stream named tensors (Hugging Face names, any subset) into every worker's model in
        place, then drop the prefix cache and set ``version``. ``version=None``: one part of an
        update between :meth:`begin_update` and :meth:`finish_update`."""
        if version is None:
            if self._update is None:
                raise RuntimeError("load_weights(version=None) outside begin_update/finish_update")
            self._load_chunks(weights)
            return
        if self.adapters is not None:
            self.adapters.begin()
            self.adapters.stage(weights)
            return self.adopt_version(int(version), self.adapters.commit())
        with self.swapping_weights():
            self.collective_rpc("d3s_begin_update")
            self._load_chunks(weights)
            self.collective_rpc("d3s_finish_update")
            self.version = int(version)

    def _load_chunks(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.adapters is not None:
            self.adapters.stage(weights)
            return
        for chunk in weight_chunks(weights):
            self.collective_rpc("d3s_load_weights", chunk)

    def begin_update(self) -> None:
        """An update in parts starts (a receiver loading bucket by bucket): the swap begins
        and the engine is dirty until :meth:`finish_update`."""
        self.dirty = True
        self._update = contextlib.ExitStack()
        if self.adapters is not None:
            self.adapters.begin()
            return
        self._update.enter_context(self.swapping_weights())
        self.collective_rpc("d3s_begin_update")

    def finish_update(self, version: int) -> None:
        if self.adapters is not None:
            self.adopt_version(int(version), self.adapters.commit())
        else:
            self.collective_rpc("d3s_finish_update")
            self.version = int(version)
        self.dirty = False
        self._end_update()

    def adopt_version(self, version: int, adapter_id: int | None = None) -> None:
        """``version`` is loaded (as adapter ``adapter_id`` with LoRA): generate with it."""
        self.version = version
        if self.adapters is not None:
            self.adapters.adopt(version, adapter_id)

    def abort_update(self) -> None:
        """The update failed midway: close vLLM's reload (the layers keep what they got) and
        stay dirty until a whole version loads."""
        try:
            if self.adapters is not None:
                self.adapters.begin()  # the staged part goes; the live adapters are untouched
            else:
                self.collective_rpc("d3s_finish_update")
        finally:
            self._end_update()

    def _end_update(self) -> None:
        update, self._update = self._update, None
        if update is not None:
            update.close()

    @contextlib.contextmanager
    def swapping_weights(self) -> Iterator[None]:
        """Around a weight load (which sets ``version``): during a stepped round, pause the
        scheduler with its requests kept and resume after; relabel the engine's weight version;
        drop the prefix cache now, or after the round when requests hold its blocks. With LoRA
        nothing: a new adapter changes no running request, and cached blocks are keyed by
        adapter."""
        if self.adapters is not None:
            yield
            return
        paused = self._in_round
        if paused:
            self._core_call("pause_scheduler", "keep", False)
        try:
            yield
        finally:
            self._core_call("set_weight_version", str(self.version))
            if paused:
                self._core_call("resume_scheduler")
                self._prefix_cache_stale = True
            else:
                self._llm.reset_prefix_cache()

    def _core_call(self, method: str, *args: Any) -> Any:
        """Call an engine-core method: a utility call to its process, or directly in-process."""
        client = self._llm.llm_engine.engine_core
        if hasattr(client, "call_utility"):
            return client.call_utility(method, *args)
        return getattr(client.engine_core, method)(*args)

    def weights_digest(self) -> str:
        """sha256 of the first worker's live parameters (changes when a load changed them); with
        LoRA, of the newest adapter."""
        if self.adapters is not None:
            return self.adapters.digest()
        return self.collective_rpc("d3s_weights_digest")[0]

    def report(self) -> dict[str, Any]:
        """With LoRA, ``lora_audit``: the adapters added and removed, and every round's."""
        return {} if self.adapters is None else {"lora_audit": self.adapters.audit()}

    # ---- generation ----------------------------------------------------------------------------

    @property
    def _final_only(self):
        from vllm.sampling_params import RequestOutputKind

        return RequestOutputKind.FINAL_ONLY

    def _params(self, n: int, temperature: float, top_p: float, seed: int | None):
        return self._sampling_params_cls(
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            min_p=0.0,
            seed=seed,
            max_tokens=self.max_new_tokens,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=True,
            logprobs=0,
            detokenize=False,
        )

    def _rule(self, seed: int | None) -> int | None:
        """The seed of the round's requests (:func:`prompt_seed`); ``None``: greedy."""
        return seed

    def _stepped(
        self, prompt_ids: list[list[int]], params: list, between_steps: BetweenSteps, lora: Any
    ):
        """``LLM.generate`` (under adapter ``lora``, a ``LoRARequest`` or None) with
        ``between_steps`` called between engine steps."""
        engine = self._llm.llm_engine
        ids = []
        for tokens, p in zip(prompt_ids, params, strict=True):
            p.output_kind = self._final_only
            # Outputs carry the id given here (vLLM's internal id adds a suffix).
            ids.append(f"d3s-{next(self._request_ids)}")
            engine.add_request(ids[-1], {"prompt_token_ids": tokens}, p, lora_request=lora)
        done = {}
        self._in_round = True
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                if engine.has_unfinished_requests():
                    between_steps()
                    self._check_whole()  # a load that failed midway ends the round
        except BaseException:
            # A failed load (a bad checksum stops the run) must not leave requests behind.
            engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            self._in_round = False
            if self._prefix_cache_stale:
                self._llm.reset_prefix_cache()
                self._prefix_cache_stale = False
        return [done[i] for i in ids]

    def _sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        seed: int | None,
        between_steps: BetweenSteps | None,
    ) -> Sampled:
        """With ``between_steps`` the engine is stepped here (:meth:`_stepped`)."""
        if seed is None:
            params = [self._params(1, 0.0, 1.0, None) for _ in prompt_ids]
        else:
            params = [
                self._params(n, self.temperature, self.top_p, prompt_seed(seed, i, n))
                for i in range(len(prompt_ids))
            ]
        start_version = self.version
        if self.adapters is None:
            outputs = self._generate(prompt_ids, params, between_steps, None)
            return self._collect(outputs, n, start_version)
        # LoRA: the whole round runs under the adapter of start_version, whatever loads meanwhile
        with self.adapters.round() as held:
            held.requests = len(prompt_ids) * n
            outputs = self._generate(prompt_ids, params, between_steps, held.request)
            s = self._collect(outputs, n, start_version)
            held.record(prompt_ids[0], s, start_version, greedy=seed is None)
        s.versions = [[start_version] * len(row) for row in s.versions]
        return s

    def _generate(self, prompt_ids, params, between_steps: BetweenSteps | None, lora: Any):
        if between_steps is not None:
            return self._stepped(prompt_ids, params, between_steps, lora)
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        return self._llm.generate(prompts, params, use_tqdm=False, lora_request=lora)

    def _collect(self, outputs: list, n: int, start_version: int) -> Sampled:
        """vLLM's outputs as :class:`Sampled` rows, each cut at its first stop token."""
        tokens: list[list[int]] = []
        logps: list[list[float]] = []
        versions: list[list[int]] = []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != n:
                raise RuntimeError(
                    f"vLLM returned {len(samples)} samples for a prompt, expected {n}"
                )
            for c in samples:
                ids = list(c.token_ids)
                k = cut_at_stop(ids, self.stop_token_ids)
                ids = ids[:k]
                tokens.append(ids)
                logps.append([c.logprobs[j][tok].logprob for j, tok in enumerate(ids)])
                versions.append(token_versions(c.weight_versions, k, start_version))
        responses, lengths, behav_logp, mask, stop_token = pack_rows(
            tokens, logps, self.stop_token_ids, self.pad_id
        )
        return Sampled(responses, lengths, behav_logp, mask, stop_token, versions)

    def shutdown(self) -> None:
        """Stop vLLM's engine process(es); the engine is unusable afterwards."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._llm = None

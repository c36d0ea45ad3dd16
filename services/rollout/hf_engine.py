"""Rollout engine on any Hugging Face causal LM: a plain sampling loop with a KV cache.

Samples ``n`` responses per prompt and records, per response token, the behaviour log-prob
under the distribution actually sampled from (after temperature / top-p), which the learner
needs for its off-policy correction.

Why a loop of our own rather than ``model.generate``: the sampled token is known in the same
step as the distribution it came from, so its log-prob is gathered at once and nothing of
vocabulary size outlives a step (``generate`` only exposes the processed scores if it keeps
all of them, an [N, T, V] tensor: ~40 GB for 128 x 512 tokens of a 152k vocabulary). The
loop also owns the exact order of temperature and top-p, stops on a list of token ids, and
asks the model for the last position's logits only (``logits_to_keep``), so prefill does not
build [N, L, V] either.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from services.policy.lora import is_lora, load_synced, synced_state
from services.policy.model import left_pad
from services.rollout.engine import NO_STOP, BetweenSteps, RolloutBatch, RolloutEngine, Sampled

__all__ = ["HFRolloutEngine", "RolloutBatch", "process_logits", "top_p_filter"]

logger = logging.getLogger(__name__)

# (logits float32 [N, V]) -> (token int64 [N], log-prob float32 [N])
Chooser = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the most probable tokens until their mass reaches ``top_p``.

    A token is kept when the mass of the tokens strictly more probable than it is below
    ``top_p``, so the most probable token is always kept.

    Args:
        scores: float [N, V] logits (temperature already applied).
        top_p: Mass threshold in (0, 1]; 1 returns ``scores`` unchanged.

    Returns:
        float [N, V], filtered tokens set to ``-inf``.
    """
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = sorted_scores.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= top_p
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution's logits: ``top_p_filter(logits / temperature)``.

    Args:
        logits: float32 [N, V] raw next-token logits.

    Returns:
        float32 [N, V]; ``log_softmax`` of it is the behaviour log-prob of every token.
    """
    return top_p_filter(logits / temperature, top_p)


class HFRolloutEngine(RolloutEngine):
    """Sample responses from a causal LM and return a :class:`RolloutBatch`.

    Sampling is deterministic for given (weights, prompts, n, seed) on the same device and
    thread count. An in-flight hook (``between_steps``) runs after each decoding step but the
    last; weights it loads sample every later token, and the KV cache of the tokens before
    stays (as in PipelineRL).

    Args:
        model: A causal LM (the tiny GPT-2 policy or any local ``from_pretrained`` model).
        tokenizer: A Hugging Face tokenizer (the built-in char tokenizer is one too).
        max_new_tokens: Response length limit (stop token included).
        temperature: Sampling temperature, > 0.
        top_p: Nucleus threshold in (0, 1]; 1 disables it. Top-k is always off.
        stop_token_ids: Token ids that end a response; ``None``: the tokenizer's EOS and the
            chat template's end-of-turn token when it has one.
        device: Where to run; ``None`` keeps the model where it is.
        dtype: Parameter dtype; ``None`` means bfloat16 on CUDA and the model's own elsewhere.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_new_tokens: int = 5,
        temperature: float = 1.0,
        top_p: float = 1.0,
        *,
        stop_token_ids: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(tokenizer, max_new_tokens, temperature, top_p, stop_token_ids)
        if device is not None:
            device = torch.device(device)
            if dtype is None and device.type == "cuda":
                dtype = torch.bfloat16
        self._model = model.to(device=device, dtype=dtype).eval()
        self.max_positions = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", None
        )
        forward_params = inspect.signature(model.forward).parameters
        self._last_logits_only = "logits_to_keep" in forward_params
        # transformers renamed ``past_key_values`` to ``cache`` (argument and output field).
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    # ---- weights -------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy new weights into the model in place (any dtype/device) and set ``version``.

        Keys missing from ``state_dict`` are allowed only for parameters tied to one that is
        present (GPT-2's ``lm_head.weight`` shares ``wte``; safetensors files drop it). A LoRA
        engine (a PEFT model) takes its adapter alone, into the adapter in place.

        Raises:
            KeyError: on unexpected keys or untied missing keys (weights would be wrong).
        """
        if is_lora(self._model):
            load_synced(self._model, dict(state_dict))
            self.version = int(version)
            return
        result = self._model.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"unexpected keys in state dict: {result.unexpected_keys[:5]}")
        if result.missing_keys:
            params = dict(self._model.named_parameters(remove_duplicate=False))
            loaded_ptrs = {params[k].data_ptr() for k in state_dict if k in params}
            untied = [
                k
                for k in result.missing_keys
                if k not in params or params[k].data_ptr() not in loaded_ptrs
            ]
            if untied:
                raise KeyError(f"state dict lacks keys: {untied[:5]}")
        self.version = int(version)

    def begin_update(self) -> None:
        """A streamed update starts: until :meth:`finish_update` the engine refuses to generate
        (it holds parts of two versions)."""
        self.dirty = True

    def finish_update(self, version: int) -> None:
        """Every tensor of ``version`` has been loaded."""
        self.version = int(version)
        self.dirty = False

    def abort_update(self) -> None:
        """The update failed midway: the engine stays dirty until a whole version loads."""

    @torch.no_grad()
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None
    ) -> None:
        """Copy named tensors into the live parameters/buffers one at a time and set ``version``
        (None: a part of a streamed update, see :meth:`begin_update`; the version stays).

        Any subset may be given (a streamed update never holds a second full copy). A LoRA
        engine takes adapter tensors under their wire names; its base is never written.

        Raises:
            KeyError: on a name the model does not have.
            ValueError: on a shape mismatch.
        """
        targets = synced_state(self._model)
        for name, tensor in weights:
            if name not in targets:
                raise KeyError(f"model has no parameter or buffer {name!r}")
            target = targets[name]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} != model's {tuple(target.shape)}"
                )
            target.copy_(tensor)
        if version is not None:
            self.version = int(version)

    # ---- generation ----------------------------------------------------------------------------

    def _rule(self, seed: int | None) -> Chooser:
        """Sampling from the processed distribution with a generator of its own, seeded with
        ``seed`` (the global torch RNG is not used), or the argmax (``None``)."""
        if seed is None:

            def argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                logp_all = torch.log_softmax(logits, dim=-1)
                lp, token = logp_all.max(dim=-1)
                return token, lp

            return argmax
        generator = torch.Generator(device=self.device).manual_seed(seed)

        def sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scores = process_logits(logits, self.temperature, self.top_p)
            logp_all = torch.log_softmax(scores, dim=-1)
            token = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(1)
            # Filtered tokens are -inf, never sampled, so the gathered value is finite.
            return token, logp_all.gather(1, token.unsqueeze(1)).squeeze(1)

        return sample

    def _sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        choose: Chooser,
        between_steps: BetweenSteps | None,
    ) -> Sampled:
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_id)
        device = self.device
        # Rows grouped by prompt: repeat each prompt n times in place.
        input_ids = input_ids.repeat_interleave(n, dim=0).to(device)
        attention_mask = attention_mask.repeat_interleave(n, dim=0).to(device)
        gen, logp, step_versions = self._decode(input_ids, attention_mask, choose, between_steps)

        stops = torch.tensor(self.stop_token_ids, device=gen.device)
        is_stop = torch.isin(gen, stops)
        steps = gen.shape[1]
        stopped = is_stop.any(dim=1)
        last = torch.where(stopped, is_stop.int().argmax(dim=1), steps - 1)
        lengths = last + 1
        t_max = int(lengths.max())
        gen, logp = gen[:, :t_max], logp[:, :t_max]
        mask = torch.arange(t_max, device=gen.device).unsqueeze(0) < lengths.unsqueeze(1)
        stop_token = torch.where(stopped, gen.gather(1, last.unsqueeze(1)).squeeze(1), NO_STOP)
        lengths = lengths.long().cpu()
        return Sampled(
            responses=gen.masked_fill(~mask, self.pad_id).long().cpu(),
            response_lengths=lengths,
            behav_logp=logp.masked_fill(~mask, 0.0).float().cpu(),
            response_mask=mask.cpu(),
            stop_token=stop_token.long().cpu(),
            # Every row's step j ran under the same weights: row i's tokens are its first k.
            versions=[step_versions[:k] for k in lengths.tolist()],
        )

    @torch.no_grad()
    def _decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        choose: Chooser,
        between_steps: BetweenSteps | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Autoregressive decoding with a KV cache.

        Args:
            input_ids: int64 [N, L], left-padded prompts.
            attention_mask: int64 [N, L], 0 on padding.
            choose: Picks each row's next token and its log-prob from float32 [N, V] logits.
            between_steps: Runs between two steps; may load new weights (and bump ``version``).

        Returns:
            tokens int64 [N, T'] and log-probs float32 [N, T'] (``T' <= max_new_tokens``; steps
            after a row's first stop token hold pad / 0), and the weight version of each of the
            T' steps. Only one step's [N, V] logits are alive at a time.
        """
        n_rows = input_ids.shape[0]
        device = input_ids.device
        stops = torch.tensor(self.stop_token_ids, device=device)
        # Left padding shifts real tokens right; positions must count real tokens only, or a
        # padded row would not reproduce its unpadded continuation.
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        step_ids, step_pos, mask = input_ids, positions, attention_mask
        keep = {"logits_to_keep": 1} if self._last_logits_only else {}
        past = None
        done = torch.zeros(n_rows, dtype=torch.bool, device=device)
        tokens: list[torch.Tensor] = []
        logps: list[torch.Tensor] = []
        versions: list[int] = []
        for _ in range(self.max_new_tokens):
            versions.append(self.version)
            out = self._model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                use_cache=True,
                **{self._cache_arg: past},
                **keep,
            )
            past = getattr(out, self._cache_arg)
            logits = out.logits[:, -1, :].float()
            del out
            token, lp = choose(logits)
            del logits
            token = token.masked_fill(done, self.pad_id)
            tokens.append(token)
            logps.append(lp.float().masked_fill(done, 0.0))
            done = done | torch.isin(token, stops)
            if bool(done.all()) or len(tokens) == self.max_new_tokens:
                break
            if between_steps is not None:
                between_steps()
                self._check_whole()  # a load between steps that failed midway ends the round
            step_ids = token.unsqueeze(1)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(n_rows, 1)], dim=1)
        return torch.stack(tokens, dim=1), torch.stack(logps, dim=1), versions

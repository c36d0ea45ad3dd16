"""CPU rollout engine on Hugging Face ``generate`` (DESIGN §2: "HF generate on CPU").

Samples ``n`` responses per prompt and records, per response token, the behaviour log-prob
under the distribution actually sampled from (after temperature / top-p), which the learner
needs for the off-policy correction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from services.policy.model import left_pad
from services.policy.tokenizer import decode_ids, encode_text, special_ids
from services.tasks.base import Prompt

logger = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """``n`` sampled responses for each of ``B`` prompts; ``N = B * n`` rows.

    Rows are grouped by prompt: rows ``i*n .. i*n+n-1`` belong to ``prompts[i]``.
    A response is its tokens up to and including the first EOS (EOS counts as a response
    token), or ``max_new_tokens`` tokens if no EOS came. ``T`` is the longest response in the
    batch (``<= max_new_tokens``).

    Attributes:
        prompts: The B prompts.
        prompt_ids: B unpadded token lists (no special tokens).
        responses: int64 [N, T], right-padded with the tokenizer's pad id.
        response_lengths: int64 [N], valid tokens per row (>= 1).
        behav_logp: float32 [N, T], log-prob of each sampled token under the sampling
            distribution (temperature and top-p applied); 0 at padding.
        response_mask: bool [N, T], True on the first ``response_lengths[i]`` tokens.
        texts: N decoded responses (special tokens dropped).
        n: Samples per prompt.
        policy_version: The engine's weight version that produced the batch.
        gen_seconds: Wall time of generation.
    """

    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    responses: torch.Tensor
    response_lengths: torch.Tensor
    behav_logp: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    n: int = 1
    policy_version: int = 0
    gen_seconds: float = field(default=0.0, compare=False)

    def __len__(self) -> int:
        return self.responses.shape[0]

    def prompt_index(self, row: int) -> int:
        """Index into ``prompts`` of response row ``row``."""
        return row // self.n


class HFRolloutEngine:
    """Sample responses with ``model.generate`` and return a :class:`RolloutBatch`.

    Args:
        model: A causal LM (the tiny GPT-2 policy or any local ``from_pretrained`` model).
        tokenizer: :class:`CharTokenizer` or an HF tokenizer.
        max_new_tokens: Response length limit (EOS included).
        temperature: Sampling temperature, > 0.
        top_p: Nucleus threshold in (0, 1]; 1 disables it. Top-k is always off.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_new_tokens: int = 5,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be > 0 (use evaluate_greedy for greedy decoding)")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.pad_id, self.eos_id = special_ids(tokenizer)
        self.version = 0
        # Explicit config so nothing is inherited from the checkpoint's generation_config
        # (HF checkpoints often ship top_k=50, repetition penalties, min lengths...).
        self.generation_config = GenerationConfig(
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
        self._max_positions = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", None
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Swap in new weights and set ``version``.

        Keys missing from ``state_dict`` are allowed only for parameters tied to one that is
        present (GPT-2's ``lm_head.weight`` shares ``wte``; safetensors files drop it).

        Raises:
            KeyError: on unexpected keys or untied missing keys (weights would be wrong).
        """
        result = self.model.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"unexpected keys in state dict: {result.unexpected_keys[:5]}")
        if result.missing_keys:
            params = dict(self.model.named_parameters(remove_duplicate=False))
            loaded_ptrs = {params[k].data_ptr() for k in state_dict if k in params}
            untied = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded_ptrs]
            if untied:
                raise KeyError(f"state dict lacks keys: {untied[:5]}")
        self.version = int(version)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], n: int, seed: int) -> RolloutBatch:
        """Sample ``n`` responses for each prompt.

        Deterministic for a given (weights, prompts, n, seed) on the same device and thread
        count; the global torch RNG is left as it was.
        """
        if not prompts:
            raise ValueError("no prompts")
        if n < 1:
            raise ValueError("n must be >= 1")
        t0 = time.perf_counter()
        prompt_ids = [encode_text(self.tokenizer, p.text) for p in prompts]
        longest = max(len(s) for s in prompt_ids)
        if self._max_positions is not None and longest + self.max_new_tokens > self._max_positions:
            raise ValueError(
                f"prompt of {longest} tokens + {self.max_new_tokens} new tokens exceeds the "
                f"model's {self._max_positions} positions"
            )
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_id)
        device = self.device
        # Rows grouped by prompt: repeat each prompt n times in place.
        input_ids = input_ids.repeat_interleave(n, dim=0).to(device)
        attention_mask = attention_mask.repeat_interleave(n, dim=0).to(device)

        rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self.generation_config,
            )
        gen = out.sequences[:, input_ids.shape[1] :]  # [N, T'] (T' <= max_new_tokens)
        # Scores are the processed logits the sampler drew from (temperature / top-p applied),
        # so their log-softmax is the behaviour distribution. Filtered tokens are -inf, never
        # sampled, so the gathered values are finite.
        scores = torch.stack(out.scores, dim=1).float()  # [N, T', V]
        logp = torch.log_softmax(scores, dim=-1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)

        is_eos = gen == self.eos_id
        steps = gen.shape[1]
        first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), steps - 1)
        lengths = first_eos + 1
        t_max = int(lengths.max())
        gen, logp = gen[:, :t_max], logp[:, :t_max]
        mask = torch.arange(t_max, device=gen.device).unsqueeze(0) < lengths.unsqueeze(1)
        responses = gen.masked_fill(~mask, self.pad_id).long().cpu()
        behav_logp = logp.masked_fill(~mask, 0.0).float().cpu()
        lengths, mask = lengths.long().cpu(), mask.cpu()
        texts = [decode_ids(self.tokenizer, row[: int(k)].tolist()) for row, k in zip(responses, lengths, strict=True)]
        return RolloutBatch(
            prompts=list(prompts),
            prompt_ids=prompt_ids,
            responses=responses,
            response_lengths=lengths,
            behav_logp=behav_logp,
            response_mask=mask,
            texts=texts,
            n=n,
            policy_version=self.version,
            gen_seconds=time.perf_counter() - t0,
        )

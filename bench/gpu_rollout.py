"""HF rollout engine on CUDA: tokens/s and peak GPU memory for a Qwen2.5-0.5B-shaped model.

A random-initialised Qwen2 with the full 151,936-entry vocabulary (hidden 896, 24 layers, 14
heads / 2 KV heads, tied embeddings: 494M parameters) in bf16, built on the GPU from a config
(no hub). Prompts are fixed random token ids; the stop token is an id the model is unlikely to
sample, so every row runs the full ``--new-tokens`` (the worst case for memory and time).

Needs only torch and transformers beside the engine modules: run from the repository root with
``PYTHONPATH=. python bench/gpu_rollout.py --out results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

VOCAB = 151_936


class FixedPromptTokenizer:
    """The few tokenizer calls the engine makes: prompt ``"p<i>"`` encodes to a fixed random id
    list; decoding returns an empty string (rewards are not computed here)."""

    chat_template = None
    eos_token_id = pad_token_id = VOCAB - 1

    def __init__(self, n_prompts: int, prompt_len: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB - 2, (n_prompts, prompt_len), generator=g).tolist()

    def __len__(self) -> int:
        return VOCAB

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.ids[int(text[1:])])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def build_model(device: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def _without_pydantic() -> None:
    """A bare GPU host may lack pydantic, which only the built-in policy's config needs: the
    engine imports ``left_pad`` from the policy module, so stand in a config module there."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("pydantic") is None:
        stub = types.ModuleType("services.policy.config")
        stub.PolicySpec = object
        sys.modules["services.policy.config"] = stub


def run(n_prompts: int, samples: int, prompt_len: int, new_tokens: int, top_p: float) -> dict:
    _without_pydantic()
    from services.rollout.hf_engine import HFRolloutEngine
    from services.tasks.base import Prompt

    device = "cuda"
    model = build_model(device)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    tok = FixedPromptTokenizer(n_prompts, prompt_len)
    prompts = [Prompt(f"q{i}", f"p{i}", "0", "arithmetic") for i in range(n_prompts)]
    engine = HFRolloutEngine(model, tok, new_tokens, 1.0, top_p, device=device)
    engine.generate(prompts[:4], 2, seed=1)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    batch = engine.generate(prompts, samples, seed=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rows = n_prompts * samples
    tokens = int(batch.response_lengths.sum())
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "params": params,
        "dtype": "bfloat16",
        "prompts": n_prompts,
        "samples_per_prompt": samples,
        "rows": rows,
        "prompt_tokens": prompt_len,
        "max_new_tokens": new_tokens,
        "top_p": top_p,
        "tokens_generated": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "weights_gib": weights_gib,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "ntv_float32_gib": rows * new_tokens * VOCAB * 4 / 2**30,
        "host": platform.node(),
    }
    del engine, model, batch
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--top-p", type=float, nargs="+", default=[1.0, 0.9])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for top_p in args.top_p:
        r = run(args.prompts, args.samples, args.prompt_len, args.new_tokens, top_p)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()

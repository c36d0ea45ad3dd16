from pathlib import Path

import pytest
import torch

# Two cores shared with other processes: intra-op threads fight each other and a step gets ~10x
# slower. One thread keeps the suite's time stable.
torch.set_num_threads(1)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


@pytest.fixture
def tiny_config():
    """A builder of tiny run configs (a dict for ``parse_config``): a 1-layer policy on 1-digit
    sums with a short warm start cached in ``cache_dir``, 4 samples per prompt, no progress bar.
    Keyword arguments are sections merged over these defaults (``train={"total_steps": 3}``)."""

    def build(run_dir, cache_dir, **sections: dict) -> dict:
        base = {
            "name": "tiny",
            "task": {"type": "arithmetic", "digits": 1, "heldout_size": 50},
            "policy": {"n_layer": 1, "n_embd": 32, "n_head": 2},
            "warmstart": {"steps": 200, "band": None, "cache_dir": str(cache_dir)},
            "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4},
            "eval": {"n_samples": 4, "ks": [1, 4]},
            "train": {"run_dir": str(run_dir), "progress_bar": False},
            "api": {"enabled": False},
        }
        return _merge(base, sections)

    return build


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """A directory shaped like SmolLM2-135M-Instruct as validation reads it: config.json (no
    weights) and a tokenizer with a chat template."""
    from transformers import LlamaConfig

    from bench.full_vocab_model import build_tokenizer

    directory = tmp_path_factory.mktemp("smollm2-135m-instruct")
    LlamaConfig(
        vocab_size=49_152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        dtype="float32",
    ).save_pretrained(directory)
    build_tokenizer(vocab_size=300).save_pretrained(directory)
    return directory

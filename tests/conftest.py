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

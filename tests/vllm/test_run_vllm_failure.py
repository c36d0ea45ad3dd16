"""``d3s run`` whose vLLM engine cannot start: the terminal shows the engine's own error.

vLLM builds its model in a child process (the engine core and its worker). When that fails, the
rollout actor's exception says only "Engine core initialization failed. See root cause above."
The root cause is in the actor's log, ``run_dir/logs/rollout-0.log``, where the child's output
goes; ``d3s run`` must print it. The failure here: the model directory's weights hold a tensor
that the architecture does not have. Hugging Face (the learner) ignores it with a warning; vLLM's
loader, in the engine's worker process, refuses the whole model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny_qwen import build_llama, build_tokenizer

ENGINE_ERROR = "There is no module or parameter named 'd3s_probe'"


@pytest.fixture(scope="module")
def odd_llama_dir(tmp_path_factory) -> Path:
    """The tiny Llama with one tensor too many in its safetensors file."""
    tok = build_tokenizer()
    directory = tmp_path_factory.mktemp("odd-llama")
    build_llama(tok, seed=0).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.d3s_probe.weight"] = torch.zeros(4)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return directory


@pytest.mark.timeout(900)
def test_d3s_run_prints_the_error_of_a_vllm_engine_that_cannot_start(odd_llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    rows = "".join(
        json.dumps({"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"}) + "\n"
        for a in range(8)
    )
    (tmp_path / "train.jsonl").write_text(rows)
    data = {
        "name": "vllm-broken",
        "policy": {"path": str(odd_llama_dir)},
        "task": {"type": "jsonl", "train_path": str(tmp_path / "train.jsonl"), "heldout_size": 2},
        "rollout": {
            "engine": "vllm",
            "prompts_per_step": 2,
            "samples_per_prompt": 2,
            "max_new_tokens": 8,
            "vllm": {"dtype": "float32", "enforce_eager": True, "max_model_len": 128},
        },
        "eval": {"n_samples": 0, "ks": [], "background": False},
        "weight_sync": {"transport": "files", "path": str(tmp_path / "weights")},
        "train": {"total_steps": 1, "run_dir": str(run_dir), "progress_bar": False},
        "service": {"namespace": f"vbad{uuid.uuid4().hex[:8]}", "max_restarts": 0},
        "api": {"enabled": False},
        "logging": {"tensorboard": False},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        [sys.executable, "-m", "services.run.cli", "run", str(config)],
        capture_output=True,
        text=True,
        timeout=840,
        env={**os.environ, "COLUMNS": "200"},
    )
    shown = out.stderr + out.stdout
    print(shown)
    assert out.returncode == 1, shown[-4000:]
    lines = out.stderr.splitlines()
    failed = next(i for i, x in enumerate(lines) if x.startswith("run failed: rollout-0 failed"))
    # The actor's exception names only the last link; the engine's own line follows, read
    # from the actor's log, under the log's name.
    assert ENGINE_ERROR not in lines[failed]
    assert lines[failed + 1] == "from rollout-0.log:", shown
    cause = [x for x in lines[failed + 2 :] if ENGINE_ERROR in x]
    assert cause and cause[0].startswith("  ValueError: "), shown
    assert ENGINE_ERROR in (run_dir / "logs" / "rollout-0.log").read_text()
    assert len(lines) <= 20, shown  # a few lines, not the traceback

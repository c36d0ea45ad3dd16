"""Lock-step ``d3s train`` with ``rollout.engine: vllm``.

The vLLM engine holds its weights in its own workers, so the in-process copy that evaluation and
``final_policy`` read must be loaded beside it: before the fix it stayed at the start, every
evaluation of a vLLM ``d3s train`` run scored the untrained model and the exported policy was
the start. And vLLM runs in processes of its own: a ``d3s train`` stopped by SIGTERM must take
them down with it (they outlived it, holding 3.5 GB, before)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from tiny_qwen import build_llama, build_tokenizer

from services.policy.model import load_policy
from services.run.config import parse_config
from services.run.trainer import SyncTrainer
from services.weightsync.checksum import state_checksum

QUESTIONS = [(f"What is {a} + {b}?", a + b) for a in range(1, 5) for b in range(1, 4)]


def _config(tmp_path: Path, steps: int) -> dict:
    tok = build_tokenizer()
    start = tmp_path / "start"
    build_llama(tok, seed=0, steered=True).save_pretrained(start, safe_serialization=True)
    tok.save_pretrained(start)
    rows = "".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in QUESTIONS)
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "shorter.py").write_text(
        "def reward(response, answer):\n    return 1.0 / (1.0 + len(response))\n"
    )
    return {
        "name": "vllm-train",
        "policy": {"path": str(start)},
        "task": {
            "type": "jsonl",
            "train_path": str(tmp_path / "train.jsonl"),
            "verifier": "shorter:reward",
            "chat_template": True,
            "heldout_size": 4,
        },
        "rollout": {
            "engine": "vllm",
            "prompts_per_step": 3,
            "samples_per_prompt": 4,
            "max_new_tokens": 12,
            "max_prompt_tokens": 64,
            "vllm": {"enforce_eager": True, "max_model_len": 128},
        },
        "algorithm": {"preset": "grpo"},
        "learner": {"lr": 1e-3, "zero_stage": 0},
        "eval": {"n_samples": 0, "ks": [], "background": False},
        "train": {
            "total_steps": steps,
            "eval_every": steps,
            "checkpoint_every": steps,
            "run_dir": str(tmp_path / "run"),
            "progress_bar": False,
        },
        "service": {"mode": "sync"},
        "api": {"enabled": False},
        "logging": {"tensorboard": False},
    }


@pytest.mark.timeout(1800)
def test_d3s_train_on_vllm_evaluates_and_saves_the_trained_weights(tmp_path: Path):
    sys.path.insert(0, str(tmp_path))
    cfg = parse_config(_config(tmp_path, steps=2))
    SyncTrainer(cfg).run()
    first, _ = load_policy(tmp_path / "start")
    final, _ = load_policy(tmp_path / "run" / "final_policy")
    assert state_checksum(final.state_dict()) != state_checksum(first.state_dict())


def _vllm_processes(root: psutil.Process) -> list[psutil.Process]:
    found = []
    for p in root.children(recursive=True):
        try:
            if "VLLM" in p.name() or any("VLLM" in part for part in p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(1800)
def test_sigterm_stops_d3s_train_and_its_vllm_processes(tmp_path: Path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, steps=1000)))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.run.cli", "train", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    root = psutil.Process(proc.pid)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 900
    # Trained steps mean the engine is up and generating.
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no step trained in 900 s"
        time.sleep(1.0)
    engines = _vllm_processes(root)
    assert engines, "no vLLM process under d3s train"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    _, alive = psutil.wait_procs(engines, timeout=30)
    assert not alive, f"vLLM processes outlived d3s train: {[p.pid for p in alive]}"

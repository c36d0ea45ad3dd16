"""Lock-step ``d3s train`` with ``rollout.engine: vllm``: the vLLM engine holds its weights in
its own workers, so the in-process copy that evaluation and ``final_policy`` read must be
loaded beside it. Before the fix it stayed at the start: every evaluation of a vLLM ``d3s
train`` run scored the untrained model and the exported policy was the start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_qwen import build_llama, build_tokenizer

from services.policy.model import load_policy
from services.run.config import parse_config
from services.run.trainer import SyncTrainer
from services.weightsync.checksum import state_checksum

QUESTIONS = [(f"What is {a} + {b}?", a + b) for a in range(1, 5) for b in range(1, 4)]


@pytest.mark.timeout(1800)
def test_d3s_train_on_vllm_evaluates_and_saves_the_trained_weights(tmp_path: Path):
    tok = build_tokenizer()
    start = tmp_path / "start"
    build_llama(tok, seed=0, steered=True).save_pretrained(start, safe_serialization=True)
    tok.save_pretrained(start)
    rows = "".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in QUESTIONS)
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "shorter.py").write_text(
        "def reward(response, answer):\n    return 1.0 / (1.0 + len(response))\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    run_dir = tmp_path / "run"
    cfg = parse_config(
        {
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
                "total_steps": 2,
                "eval_every": 2,
                "checkpoint_every": 2,
                "run_dir": str(run_dir),
                "progress_bar": False,
            },
            "service": {"mode": "sync"},
            "api": {"enabled": False},
            "logging": {"tensorboard": False},
        }
    )
    SyncTrainer(cfg).run()
    first, _ = load_policy(start)
    final, _ = load_policy(run_dir / "final_policy")
    assert state_checksum(final.state_dict()) != state_checksum(first.state_dict())

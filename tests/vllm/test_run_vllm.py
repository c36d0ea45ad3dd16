"""``d3s run`` with ``rollout.engine: vllm``: the whole service (Redis, Ray actors, DeepSpeed
learner) with rollout actors that own vLLM engines, on a tiny Llama (SmolLM2's architecture in
miniature, a BPE tokenizer with a chat template whose turns end with ``<|im_end|>``).

What must hold: the run trains its steps and its books balance (every group in exactly one
place, every batch trained once, versions in order); responses end on ``<|im_end|>`` or at the
length limit, never on anything else; the weights reach vLLM's workers by broadcast (the
collective transport, received in the workers) and after every sync the engine's live weights
are exactly the learner's for that version (the engine's sha256 per version equals that of a
reference engine loaded with the learner's weights of that version); the engine never restarts
(``service.max_restarts: 0``: a component that died would fail the run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from fault_books import audit
from tiny_qwen import IM_END, build_llama, build_tokenizer

from services.run.config import parse_config
from services.transport.bundle import Transport
from services.transport.redis_server import EmbeddedRedis
from services.weightsync.base import with_aliases
from services.weightsync.files import read_version

STEPS = 4
MAX_NEW_TOKENS = 16
QUESTIONS = [(f"What is {a} + {b}?", a + b) for a in range(1, 7) for b in range(1, 5)]
VERIFIER = '''
def shorter_is_better(response: str, answer: str) -> float:
    """Spread inside every group of a random policy: shorter responses score more."""
    return 1.0 / (1.0 + len(response))
'''


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    tok = build_tokenizer()
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_llama(tok, seed=0, steered=True).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sums")
    rows = "".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in QUESTIONS)
    (root / "train.jsonl").write_text(rows)
    (root / "e2e_vllm_reward.py").write_text(textwrap.dedent(VERIFIER))
    return root


def _config(model_dir: Path, task_dir: Path, run_dir: Path, redis_url: str) -> dict:
    return {
        "name": "vllm-e2e",
        "policy": {"path": str(model_dir)},
        "task": {
            "type": "jsonl",
            "train_path": str(task_dir / "train.jsonl"),
            "verifier": "e2e_vllm_reward:shorter_is_better",
            "chat_template": True,
            "instruction": "{question}\nGive the final answer as a number after ####.",
            "heldout_size": 4,
        },
        "rollout": {
            "engine": "vllm",
            "prompts_per_step": 3,
            "samples_per_prompt": 4,
            "max_new_tokens": MAX_NEW_TOKENS,
            "max_prompt_tokens": 96,
            "vllm": {"dtype": "float32", "enforce_eager": True, "max_model_len": 160},
        },
        "learner": {"lr": 1e-3, "zero_stage": 1},
        "eval": {"n_samples": 0, "ks": [], "background": False},
        "weight_sync": {
            "transport": "collective",
            "path": str(run_dir.parent / "catchup"),
            "catchup_every": 1,
            "keep_last": 100,
            "bucket_mb": 0.25,
            "engine_digest": True,
        },
        "train": {
            "total_steps": STEPS,
            "eval_every": STEPS,
            "checkpoint_every": STEPS,
            "run_dir": str(run_dir),
            "progress_bar": False,
        },
        "service": {
            "namespace": f"vllm{uuid.uuid4().hex[:8]}",
            "redis_url": redis_url,
            "max_group_backlog": 6,
            "wait_timeout_s": 900,  # startup on a busy 2-core box is slow
            "max_staleness": 1,
            # One engine for the whole run: a component that died would fail it, not restart.
            "max_restarts": 0,
        },
        "api": {"enabled": False},
        "logging": {"tensorboard": False},
    }


def run_d3s(tmp_path: Path, task_dir: Path, data: dict) -> tuple[dict, Any]:
    """``d3s run`` of the config ``data`` in a subprocess; its summary (checked: every step
    trained) and the parsed config."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(task_dir), os.getcwd()])}
    out = subprocess.run(
        [sys.executable, "-m", "services.run.cli", "run", str(config)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert out.returncode == 0, (out.stderr + out.stdout)[-4000:]
    summary = json.loads((Path(data["train"]["run_dir"]) / "summary.json").read_text())
    assert summary["steps"] == STEPS
    sys.path.insert(0, str(task_dir))  # the verifier module, for the config's validation
    return summary, parse_config(data)


@pytest.mark.timeout(1800)  # vLLM's CPU engine starts in minutes on a busy 2-core box
@pytest.mark.parametrize("inflight", [False, True], ids=["between-rounds", "in-flight"])
def test_d3s_run_with_vllm_engines_trains_with_weights_broadcast_into_the_workers(
    llama_dir, task_dir, tmp_path, inflight
):
    """In flight (``rollout.inflight_updates``) the engine also takes broadcasts between its
    decoding steps: the same books and digests hold, and tokens of later versions reach the
    selector inside groups that started on an older one."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        run_dir = tmp_path / "run"
        data = _config(llama_dir, task_dir, run_dir, server.url)
        data["rollout"]["inflight_updates"] = inflight
        summary, cfg = run_d3s(tmp_path, task_dir, data)
        client = redis.Redis.from_url(server.url)
        books = audit(client, cfg)
        actor = summary["result"]["components"]["rollout-0"]
        # Responses end on <|im_end|> or at the length limit; EOS is never sampled by this head.
        tok = build_tokenizer()
        im_end = tok.convert_tokens_to_ids(IM_END)
        assert set(actor["responses_ended_on"]) == {str(im_end)}
        assert actor["responses_ended_on"][str(im_end)] > 0
        ended = actor["responses_ended_on"][str(im_end)] + actor["responses_cut"]
        assert ended == actor["samples_generated"] > 0

        # Every version the engine loaded was received in its workers, and its live weights
        # then equal a reference engine's loaded with the learner's weights of that version.
        t = Transport.open(client, cfg.service.namespace)
        loaded = books["loaded"]["rollout-0"]
        digests = t.state.engine_digests("rollout-0")
        assert len(loaded) >= 2 and set(digests) == set(loaded)
        assert _reference_digests(llama_dir, run_dir.parent / "catchup", loaded) == {
            v: digests[v] for v in loaded
        }
        assert actor["version"] == STEPS
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        shares = [r["inflight_token_share"] for r in rows if "inflight_token_share" in r]
        assert len(shares) == STEPS
        if inflight:
            # The learner's publish lands while the engine generates: loaded between steps.
            assert actor["inflight_loads"] >= 1 and max(shares) > 0
        else:
            assert actor["inflight_loads"] == 0 and max(shares) == 0
    finally:
        server.stop()


def _reference_digests(model_dir: Path, catchup: Path, versions: list[int]) -> dict[int, str]:
    """sha256 of a fresh vLLM engine's live weights after loading each version's catch-up file
    (the learner's weights of that version) through the bytes path."""
    from services.policy.model import load_tokenizer
    from services.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(
        model_dir,
        load_tokenizer(model_dir),
        max_new_tokens=MAX_NEW_TOKENS,
        dtype="float32",
        enforce_eager=True,
        max_model_len=160,
    )
    try:
        out = {}
        for v in versions:
            tensors, _, aliases = read_version(catchup, v)
            engine.load_state_dict(with_aliases(tensors, aliases), version=v)
            out[v] = engine.weights_digest()
        return out
    finally:
        engine.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_d3s_run_trains_smollm2_on_vllm(tmp_path):
    """The real model on the real engine: configs/smollm2.yaml under ``d3s run`` with vLLM rollout
    engines and weights broadcast into their workers, for two steps (run with ``-m slow``)."""
    repo = Path(__file__).resolve().parents[2]
    model = repo / ".cache/models/smollm2-135m-instruct"
    if not (model / "config.json").is_file():
        prepared = subprocess.run(
            [sys.executable, "-m", "services.run.cli", "prepare-model"], cwd=repo, timeout=900
        )
        assert prepared.returncode == 0
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        run_dir = tmp_path / "run"
        sets = {
            "policy.path": str(model),
            "rollout.engine": "vllm",
            "rollout.vllm.dtype": "float32",
            "rollout.vllm.enforce_eager": "true",
            "rollout.vllm.max_model_len": "160",
            "weight_sync.transport": "collective",
            "weight_sync.path": str(tmp_path / "catchup"),
            "weight_sync.engine_digest": "true",
            "train.total_steps": "2",
            "train.eval_every": "2",
            "train.run_dir": str(run_dir),
            "train.progress_bar": "false",
            "task.heldout_size": "8",
            "eval.n_samples": "0",
            "eval.ks": "[]",
            "service.redis_url": server.url,
            "service.wait_timeout_s": "1200",
            "service.max_restarts": "0",
            "api.enabled": "false",
        }
        args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        out = subprocess.run(
            [sys.executable, "-m", "services.run.cli", "run", "configs/smollm2.yaml", *args],
            capture_output=True,
            text=True,
            timeout=3600,
            cwd=repo,
        )
        assert out.returncode == 0, (out.stderr + out.stdout)[-4000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 2
        cfg = parse_config(json.loads((run_dir / "run_config.json").read_text()))
        books = audit(redis.Redis.from_url(server.url), cfg)
        actor = summary["result"]["components"]["rollout-0"]
        im_end = 2  # SmolLM2's <|im_end|>, its EOS too
        assert set(actor["responses_ended_on"]) <= {str(im_end)}
        digests = Transport.open(redis.Redis.from_url(server.url), cfg.service.namespace)
        loaded = books["loaded"]["rollout-0"]
        assert set(digests.state.engine_digests("rollout-0")) == set(loaded) and 2 in loaded
    finally:
        server.stop()

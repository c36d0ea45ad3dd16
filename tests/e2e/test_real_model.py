"""A real-model stand-in end to end: a Qwen2 with the full 151,936-entry vocabulary and a BPE
tokenizer with a chat template (``bench/full_vocab_model.py``), saved with ``save_pretrained`` and
loaded from that directory, on a GSM8K-format JSONL task written here.

What must hold: the prompt the policy sees is the chat template's rendering (system turn,
instruction, assistant turn opened); generation stops on the end-of-turn token ``<|im_end|>``
(distinct from EOS); a prompt over ``rollout.max_prompt_tokens`` is skipped and counted, never
cut; the task's verifier named by import path scores the responses; ``d3s train`` and ``d3s run``
take their steps and count the skipped prompts.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from d3s_cli import run_d3s
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.full_vocab_model import IM_END, QWEN_VOCAB, build_model, build_tokenizer, save
from services.policy.model import load_policy
from services.run.config import parse_config
from services.telemetry.run_log import read_metrics

pytestmark = pytest.mark.integration

SYSTEM = "You are a careful math tutor."
INSTRUCTION = "{question}\nPut the final answer after ####."
MAX_PROMPT_TOKENS = 96
MAX_NEW_TOKENS = 12
SHORT = [
    ("Natalia sold 48 clips in April and half as many in May. How many in all?", "72"),
    ("Weng earns $12 an hour. She did 50 minutes of babysitting. How much did she earn?", "10"),
    ("Betty has $50 and her parents give her $15. How much does she have?", "65"),
    ("A wallet costs $100. Betty has half. How much more does she need?", "50"),
    ("There are 7 apples and 8 pears. How many fruits?", "15"),
    ("100 clips minus 1 clip is how many clips?", "99"),
]
# Far over MAX_PROMPT_TOKENS once rendered: these must be skipped, never cut.
LONG = [
    (" ".join(["Natalia sold clips to her friends in April and May."] * 12) + f" Case {i}?", "1")
    for i in range(3)
]
VERIFIER_MODULE = '''
def shorter_is_better(response: str, answer: str) -> float:
    """A reward with spread inside every group of a random policy: shorter responses score more."""
    return 1.0 / (1.0 + len(response))
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tokenizer = build_tokenizer()
    return save(build_model(tokenizer), tokenizer, tmp_path_factory.mktemp("qwen2-full-vocab"))


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    """GSM8K-format train and eval JSONL, and the directory of an importable verifier module."""
    root = tmp_path_factory.mktemp("gsm8k")
    rows = [*SHORT, *LONG]
    train = root / "train.jsonl"
    train.write_text(
        "".join(
            json.dumps({"question": q, "answer": f"Reasoning.\n#### {a}"}) + "\n" for q, a in rows
        )
    )
    heldout = root / "test.jsonl"
    heldout.write_text(
        "".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in SHORT[:2])
    )
    (root / "e2e_reward.py").write_text(textwrap.dedent(VERIFIER_MODULE))
    return {"train": train, "eval": heldout, "pythonpath": root}


def _config(model_dir: Path, files: dict[str, Path], run_dir: Path, **sections: dict) -> dict:
    data = {
        "name": "real",
        "task": {
            "type": "jsonl",
            "train_path": str(files["train"]),
            "eval_path": str(files["eval"]),
            "verifier": "e2e_reward:shorter_is_better",
            "instruction": INSTRUCTION,
            "chat_template": True,
            "system_prompt": SYSTEM,
            "heldout_size": 2,
        },
        "policy": {"path": str(model_dir)},
        "rollout": {
            "prompts_per_step": 3,
            "samples_per_prompt": 4,
            "max_new_tokens": MAX_NEW_TOKENS,
            "max_prompt_tokens": MAX_PROMPT_TOKENS,
        },
        "learner": {"lr": 1e-5, "micro_batch_tokens": 256, "gradient_checkpointing": True},
        "eval": {"n_samples": 0, "ks": []},
        "train": {
            "total_steps": 2,
            "eval_every": 2,
            "checkpoint_every": 2,
            "run_dir": str(run_dir),
            "progress_bar": False,
            "seed": 3,
        },
        "api": {"enabled": False},
        "logging": {"tensorboard": False},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def test_rollouts_use_the_chat_template_stop_on_end_of_turn_and_skip_long_prompts(
    model_dir, task_files, tmp_path, monkeypatch
):
    from services.run.build_rollout import build_worker

    monkeypatch.syspath_prepend(str(task_files["pythonpath"]))
    cfg = parse_config(_config(model_dir, task_files, tmp_path / "run"))
    model, tokenizer = load_policy(cfg.policy.path)
    assert model.config.vocab_size == QWEN_VOCAB
    assert model.get_output_embeddings().weight.shape[0] == QWEN_VOCAB
    im_end, eos = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id
    worker = build_worker(cfg, model, tokenizer, "t", model_path=cfg.policy.path)
    assert worker.engine.stop_token_ids == [eos, im_end]

    groups = []
    for seed in range(3):
        produced, _ = worker.produce(cfg.rollout.prompts_per_step, seed)
        groups += produced
    assert len(groups) == 3 * cfg.rollout.prompts_per_step  # skipped prompts were replaced

    # The prompt in every group record is the chat template's rendering of one short question.
    questions = {q for q, _ in SHORT}
    for g in groups:
        prompt = tokenizer.decode(g.prompt.tolist(), skip_special_tokens=False)
        head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
        tail = "\nPut the final answer after ####.<|im_end|>\n<|im_start|>assistant\n"
        assert prompt.startswith(head) and prompt.endswith(tail), prompt
        assert prompt[len(head) : -len(tail)] in questions
        assert len(g.prompt) <= MAX_PROMPT_TOKENS
    # Long prompts were drawn and skipped, and counted.
    assert worker.prompts_skipped_too_long > 0

    # Responses end on <|im_end|> (never EOS: the steered model does not favour it) or at the
    # length limit; no response runs on past an end-of-turn token.
    ended = 0
    for g in groups:
        for row, k in zip(g.responses.tolist(), g.response_lengths.tolist(), strict=True):
            assert im_end not in row[: k - 1] and eos not in row[:k]
            if row[k - 1] == im_end:
                ended += 1
            else:
                assert k == MAX_NEW_TOKENS
    assert 0 < ended < sum(g.group_size for g in groups)

    # The verifier named by import path scored them (under the timeout guard).
    for g in groups:
        texts = [
            tokenizer.decode(r[:k], skip_special_tokens=True)
            for r, k in zip(g.responses.tolist(), g.response_lengths.tolist(), strict=True)
        ]
        assert g.task == "e2e_reward:shorter_is_better"
        assert g.rewards.tolist() == pytest.approx([1.0 / (1.0 + len(t)) for t in texts])
    assert worker.tasks.verifier_errors == 0


def _d3s(*args: str, pythonpath: Path, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    return run_d3s(*args, timeout=timeout, pythonpath=pythonpath)


def test_d3s_train_and_run_on_the_full_vocabulary_model(model_dir, task_files, tmp_path):
    train_dir, run_dir = tmp_path / "train", tmp_path / "run"
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(_config(model_dir, task_files, train_dir)))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        yaml.safe_dump(
            _config(
                model_dir,
                task_files,
                run_dir,
                service={
                    "namespace": f"real{uuid.uuid4().hex[:8]}",
                    "max_group_backlog": 6,
                    "wait_timeout_s": 180,
                    "max_staleness": 1,
                },
            )
        )
    )

    out = _d3s("train", str(train_yaml), pythonpath=task_files["pythonpath"])
    assert out.returncode == 0, (out.stderr + out.stdout)[-4000:]
    rows = read_metrics(train_dir / "metrics.jsonl")
    steps = [r for r in rows if r.get("step", 0) >= 1]
    assert len(steps) == 2
    assert any(r.get("tokens_valid", 0) > 0 for r in steps)  # the learner trained
    assert steps[-1]["prompts_skipped_too_long"] > 0
    assert steps[-1]["verifier_errors"] == 0
    # The exported policy keeps the full vocabulary and the chat template.
    final, tokenizer = load_policy(train_dir / "final_policy")
    assert final.config.vocab_size == QWEN_VOCAB and tokenizer.chat_template
    # `d3s export` of the last checkpoint loads with from_pretrained and generates.
    exported = tmp_path / "exported"
    out = _d3s("export", str(train_dir), str(exported), pythonpath=task_files["pythonpath"])
    assert out.returncode == 0, (out.stderr + out.stdout)[-4000:]
    model = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert model.config.vocab_size == QWEN_VOCAB and tok.chat_template
    for name, value in final.state_dict().items():  # the export is the trained policy
        assert torch.equal(model.state_dict()[name], value), name
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}],
        tokenize=True,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    out = _d3s("run", str(run_yaml), pythonpath=task_files["pythonpath"])
    assert out.returncode == 0, (out.stderr + out.stdout)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    counters = summary["result"]["counters"]
    assert counters["prompts_skipped_too_long"] > 0
    assert counters["groups_written"] >= 2 * 3

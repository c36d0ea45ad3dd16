"""The vLLM engine a CPU run builds samples from the learner's policy, before and after small
updates (issue 26).

Every D3S run on vLLM rollouts of SmolLM2 fell into the format trap while HF rollouts learned.
The run's vLLM engine computed in bfloat16 (then the ``rollout.vllm.dtype`` default) against an
fp32 learner and an fp32 HF engine: 0.03 nats per token off the learner's log-probs on SmolLM2
(up to 0.3), and a 2e-5 step changed only 9% of its bf16 weights, each by a whole rounding step,
so the sampler did not follow the learner. The check here builds the engine exactly as ``d3s run`` does from a config that leaves
the dtype unset, and holds its behaviour log-probs to the learner's teacher-forced ones at the
run's temperature, on the first weights and after updates the size of a 2e-5 Adam step.
"""

from __future__ import annotations

import json

import pytest
import torch

from services.rollout.config import RolloutConfig
from services.rollout.hf_engine import process_logits
from services.run.build_rollout import build_worker
from services.run.config import parse_config

TEMPERATURE = 0.7
G = 6
QUESTIONS = [("What is 12 + 30?", 42), ("Max has 2 cookies and gets 4 more. How many?", 6)]


def test_an_unset_vllm_dtype_is_the_precision_of_the_rollouts_device():
    assert RolloutConfig(engine="vllm").vllm_settings.dtype == "float32"
    assert RolloutConfig(engine="vllm", num_gpus=1).vllm_settings.dtype == "bfloat16"
    explicit = RolloutConfig(engine="vllm", vllm={"dtype": "bfloat16"})
    assert explicit.vllm_settings.dtype == "bfloat16"


@pytest.fixture(scope="module")
def run_worker(model_dir, tmp_path_factory):
    """The rollout worker ``d3s run`` builds for a CPU config with ``rollout.vllm`` dtype unset."""
    root = tmp_path_factory.mktemp("learning-check")
    rows = "".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in QUESTIONS)
    (root / "train.jsonl").write_text(rows)
    cfg = parse_config(
        {
            "policy": {"path": str(model_dir)},
            "task": {"type": "jsonl", "train_path": str(root / "train.jsonl"), "heldout_size": 1},
            "rollout": {
                "engine": "vllm",
                "prompts_per_step": 2,
                "samples_per_prompt": G,
                "temperature": TEMPERATURE,
                "max_new_tokens": 10,
                "vllm": {"enforce_eager": True, "max_model_len": 128},
            },
            "learner": {"temperature": TEMPERATURE},
            "train": {"run_dir": str(root / "run")},
        }
    )
    assert cfg.rollout.vllm is not None and cfg.rollout.vllm.dtype is None
    from services.policy.model import load_policy

    model, tok = load_policy(model_dir)
    worker = build_worker(cfg, None, tok, "learning-check", model_path=model_dir)
    yield worker, model
    worker.engine.shutdown()


def learner_logp(model, prompt_ids, response) -> torch.Tensor:
    """The fp32 learner's teacher-forced log-prob of each response token at the run's
    temperature."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt_ids) + list(response)])).logits[0].float()
    rows = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(response)]
    logp = torch.log_softmax(process_logits(rows, TEMPERATURE, 1.0), dim=-1)
    return logp.gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)


def worst_gap(worker, model, seed: int) -> float:
    """Largest |behaviour - learner| log-prob over one round's response tokens."""
    groups, _ = worker.produce(len(QUESTIONS), seed)
    gap = 0.0
    for g in groups:
        for i, k in enumerate(g.response_lengths.tolist()):
            ref = learner_logp(model, g.prompt.tolist(), g.responses[i, :k].tolist())
            gap = max(gap, float((torch.as_tensor(g.behav_logp[i, :k]) - ref).abs().max()))
    return gap


def test_vllm_behaviour_logprobs_are_the_learners_before_and_after_small_updates(run_worker):
    """A 2e-5 step is below bf16's resolution for most weights. The bf16 engine of the old
    default matched here at first (7e-6: this head is peaked) but was 0.11 nats off after the
    first update; the fp32 one follows every update."""
    worker, model = run_worker
    assert worst_gap(worker, model, seed=0) < 2e-4
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for version in (1, 2, 3):
            for p in model.parameters():
                p.add_(2e-5 * torch.randn(p.shape, generator=gen).sign())
            worker.load_weights(
                {n: t.clone() for n, t in model.state_dict().items()}, version=version
            )
            assert worst_gap(worker, model, seed=version) < 2e-4, f"after update {version}"

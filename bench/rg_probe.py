"""Starting pass rates of a policy on reasoning-gym tasks: which have headroom for RL.

For each candidate dataset: ``--prompts`` held-out prompts, ``--samples`` sampled responses each
(``--temperature``, HF generate), rendered and scored exactly as a ``reasoning_gym`` task does
(chat template, ``<answer>`` convention, the dataset's own ``score_answer``). Prints one line per
dataset: sample accuracy (pass@1), pass@k, the share of prompts with a mixed group (neither all
right nor all wrong: the ones GRPO learns from) and the share of responses that stated an answer
in the asked format.

    OMP_NUM_THREADS=1 python -m bench.rg_probe --model .cache/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from pydantic import TypeAdapter

from services.policy.model import load_policy
from services.rollout.hf_engine import HFRolloutEngine
from services.tasks.config import TaskConfig
from services.tasks.extract import extract_final
from services.tasks.prompting import PromptFormat
from services.tasks.source import TaskSource

CANDIDATES = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "leg_counting": {"min_animals": 1, "max_animals": 2},
    "letter_counting": {},
    "spell_backward": {},
    "number_sorting": {"min_numbers": 3, "max_numbers": 4},
}


def probe(model, tokenizer, name: str, config: dict, args) -> dict:
    task = TypeAdapter(TaskConfig).validate_python(
        {
            "type": "reasoning_gym",
            "datasets": [{"name": name, "config": config}],
            "heldout_size": args.prompts,
            "chat_template": True,
            "answer_format": args.answer_format,
            **({"instruction": args.instruction} if args.instruction else {}),
        }
    )
    source = TaskSource.from_config(task)
    prompts = PromptFormat.from_task(task).apply(tokenizer, source.heldout())
    engine = HFRolloutEngine(model, tokenizer, args.max_new_tokens, args.temperature, 1.0)
    t0 = time.perf_counter()
    batch = engine.generate(prompts, args.samples, seed=0)
    rewards = source.score(prompts, batch.texts, args.samples)  # [P, k]
    right = rewards >= 1.0
    return {
        "task": name,
        "pass@1": float(right.mean()),
        f"pass@{args.samples}": float(right.any(1).mean()),
        "mixed_groups": float((right.any(1) & ~right.all(1)).mean()),
        "formatted": float(
            np.mean([extract_final(t, args.answer_format) is not None for t in batch.texts])
        ),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/models/smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--tasks", nargs="*", default=list(CANDIDATES))
    ap.add_argument("--answer-format", default="answer_tag", choices=["answer_tag", "hashes"])
    ap.add_argument("--instruction", default=None, help="default: the task's for the format")
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_policy(args.model)
    for name in args.tasks:
        print(json.dumps(probe(model, tokenizer, name, CANDIDATES[name], args)), flush=True)


if __name__ == "__main__":
    main()

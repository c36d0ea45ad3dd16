"""Starting pass rates of a policy on reasoning-gym tasks: which have headroom for RL.

For each candidate dataset: ``--prompts`` held-out prompts, ``--samples`` sampled responses each
(``--temperature``, HF generate), rendered and scored exactly as a ``reasoning_gym`` task does
(chat template, ``<answer>`` convention, the dataset's own ``score_answer``). Prints one line per
dataset: sample accuracy (pass@1), pass@k, the share of prompts with a mixed group (neither all
right nor all wrong: the ones GRPO learns from) and the share of responses that stated an answer
in the asked format.

    OMP_NUM_THREADS=1 python -m bench.rg_probe --model .cache/models/smollm2-135m-instruct

``--config`` takes the datasets (with their configs), instruction, answer format, temperature and
response length from a run config, so the probe measures the start of that run:

    OMP_NUM_THREADS=1 python -m bench.rg_probe --config configs/smollm2_rg.yaml [--tasks ...]
"""

from __future__ import annotations

import argparse
import json
import sys
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
    # Tasks with a small-number answer, candidates for the "#### <number>" format.
    "products": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "aiw": {"max_entities": 4},
    "letter_counting_short": {"min_words": 3, "max_words": 5},
    "gcd": {"min_value": 1, "max_value": 30},
    "leg_counting_few": {"min_animals": 1, "max_animals": 2, "max_instances": 4},
    "basic_arithmetic_1d": {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 1,
        "operators": ["+", "-"],
    },
}
# A candidate named <dataset>_<variant> is that dataset with other settings.
DATASET_OF = {
    "letter_counting_short": "letter_counting",
    "leg_counting_few": "leg_counting",
    "basic_arithmetic_1d": "basic_arithmetic",
}


def probe(model, tokenizer, name: str, config: dict, args) -> dict:
    task = TypeAdapter(TaskConfig).validate_python(
        {
            "type": "reasoning_gym",
            "datasets": [{"name": DATASET_OF.get(name, name), "config": config, "tag": name}],
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
    for i in range(min(args.show, len(prompts))):
        print(
            f"--- {name}: {prompts[i].text!r}\n{batch.texts[i * args.samples]!r}", file=sys.stderr
        )
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


def _fill_defaults(args: argparse.Namespace) -> None:
    """Unset options from ``--config`` (its datasets become candidates, under their source
    names), else the probe's own defaults."""
    defaults = {"max_new_tokens": 96, "answer_format": "answer_tag", "temperature": 1.0}
    tasks = list(CANDIDATES)
    if args.config:
        from services.run.config import load_config

        cfg = load_config(args.config)
        if cfg.task.type != "reasoning_gym":
            raise SystemExit(f"--config: task.type is {cfg.task.type!r}, not reasoning_gym")
        defaults = {
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "answer_format": cfg.task.answer_format,
            "temperature": cfg.rollout.temperature,
            "instruction": cfg.task.instruction,
        }
        tasks = []
        for entry in cfg.task.datasets:
            CANDIDATES[entry.source] = dict(entry.config)
            DATASET_OF[entry.source] = entry.name
            tasks.append(entry.source)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tasks is None:
        args.tasks = tasks
    unknown = [t for t in args.tasks if t not in CANDIDATES]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; known: {sorted(CANDIDATES)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/models/smollm2-135m-instruct")
    ap.add_argument(
        "--config",
        default=None,
        help="a reasoning_gym run config: its datasets, instruction, format, temperature, length",
    )
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 96")
    ap.add_argument("--tasks", nargs="*", default=None, help="default: all (--config: its own)")
    ap.add_argument("--answer-format", default=None, choices=["answer_tag", "hashes"])
    ap.add_argument("--instruction", default=None, help="default: the task's for the format")
    ap.add_argument("--temperature", type=float, default=None, help="default 1.0")
    ap.add_argument("--show", type=int, default=0, help="print this many responses per task")
    args = ap.parse_args()
    _fill_defaults(args)
    torch.manual_seed(0)
    model, tokenizer = load_policy(args.model)
    for name in args.tasks:
        print(json.dumps(probe(model, tokenizer, name, CANDIDATES[name], args)), flush=True)


if __name__ == "__main__":
    main()

"""The pipeline benchmark's zero-variance task: a fixed pool of mixed-task prompts, as JSONL.

    python -m bench.zerovar_data [--out bench/data/zerovar] [--per-level 128] [--test 500]

Levels 1 (2-digit sums, ``37+45=``) and 6 (2-digit products, ``37*45=``) of the mixed task
(``services/tasks/mixed.py``), which the 0.6M policy's warm start learns and cannot learn
respectively: most level-6 groups are all wrong, and level-1 groups turn all right as RL fixes
the warm start's off-by-one habit. The built-in task draws from 8,100 expressions per level, so
within a 60-step run a prompt is almost never drawn twice and the GRESO prefilter, which skips
a prompt on its own history, has nothing to go on; a finite pool (``--per-level`` distinct
training expressions per level, each drawn about 7 times in 60 steps of 32 prompts at 128) is
the setting it is made for, a dataset trained on for several epochs. The held-out split is the
task's own (never trained on, balanced over the levels), so accuracy is comparable with the
warm start's. Prompt ids are the task's (``mix6:37*45``); answers are the integers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from services.tasks.mixed import MixedTask

LEVELS = (1, 6)


def build(per_level: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``per_level`` distinct training prompts of each level (interleaved) and ``n_test``
    held-out ones, as JSONL rows."""
    tasks = {lv: MixedTask(levels=[lv], seed=seed) for lv in LEVELS}
    rng = np.random.default_rng([seed, 0x2E0])
    pools: dict[int, dict[str, dict]] = {lv: {} for lv in LEVELS}
    for lv, task in tasks.items():
        while len(pools[lv]) < per_level:
            p = task.train_prompts(1, rng)[0]
            pools[lv].setdefault(
                p.prompt_id, {"id": p.prompt_id, "question": p.text, "answer": p.answer}
            )
    train = [
        row for rows in zip(*(pools[lv].values() for lv in LEVELS), strict=True) for row in rows
    ]
    test = [
        {"id": p.prompt_id, "question": p.text, "answer": p.answer}
        for p in MixedTask(levels=list(LEVELS), seed=seed).heldout(n_test)
    ]
    return train, test


def write(out: Path, per_level: int = 128, n_test: int = 500, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train, test = build(per_level, n_test, seed)
    for name, rows in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("bench/data/zerovar"))
    ap.add_argument("--per-level", type=int, default=128)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write(args.out, args.per_level, args.test, args.seed)


if __name__ == "__main__":
    main()

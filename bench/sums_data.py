"""The real-model benchmark's task: small sums and one-step word problems, GSM8K-format JSONL.

    python -m bench.sums_data [--out bench/data/sums] [--train 2000] [--test 200] [--seed 0]

SmolLM2-135M-Instruct gets some of these right when the last number of its answer is read, but
almost never writes the asked ``#### <number>``, so both the answer and the format leave room to
learn. Three kinds, equally often: single-digit sums, two-digit sums, and one-step word problems
(add or take away, results 0..40). The test split holds questions the train split does not.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ("Tom", "Sara", "Ben", "Mia", "Leo", "Ana", "Sam", "Eva", "Max", "Zoe")
THINGS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "shells", "cards")


def question(rng: random.Random) -> tuple[str, int]:
    """One question and its integer answer."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"What is {a} + {b}?", a + b
    if kind == 1:
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        return f"What is {a} + {b}?", a + b
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        q = f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?"
        return q, a + b
    a, b = max(a, b), min(a, b)
    q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
    return q, a - b


def build(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct questions: ``n_test`` held out, ``n_train`` to train on (sums repeat in train
    only when the space of distinct ones runs out)."""
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    while len(seen) < n_test + min(n_train, 2500):
        q, a = question(rng)
        seen.setdefault(q, a)
    items = list(seen.items())
    rng.shuffle(items)
    test = items[:n_test]
    pool = items[n_test:]
    train = [pool[i % len(pool)] for i in range(n_train)]

    def rows(pairs: list[tuple[str, int]]) -> list[dict]:
        return [{"question": q, "answer": f"#### {a}"} for q, a in pairs]

    return rows(train), rows(test)


def write(out: Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train, test = build(n_train, n_test, seed)
    for name, rows in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("bench/data/sums"))
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write(args.out, args.train, args.test, args.seed)


if __name__ == "__main__":
    main()

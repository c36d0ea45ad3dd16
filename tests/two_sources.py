"""A task with two sources for the per-source metric tests: one parquet file of sums and
differences in verl's layout (the answer in a ``reward_model`` struct, the source in
``data_source``), a verifier module whose reward tells the sources apart, and a tiny character
policy saved where ``policy.path`` can load it.

Imported as ``from two_sources import ...`` (``tests/`` is on ``sys.path`` through its conftest).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

# Rewards: the reference answer's tenth (the "sub" rows' answers are larger, so that source's
# mean reward is higher) plus a little from the response's characters, so a group of random
# responses has reward variance.
VERIFIER = """
def by_answer(response: str, answer: str) -> float:
    return float(answer) / 10 + (sum(map(ord, response)) % 7) / 100
"""
SOURCES = ("add", "sub")


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 4, (i // 4) % 3
        if i % 2 == 0:
            rows.append({"question": f"{a}+{b}=", "answer": a + b, "source": "add"})
        else:
            rows.append({"question": f"{a + 5}-{b}=", "answer": a + 5 - b, "source": "sub"})
    return [
        {
            "question": r["question"],
            "reward_model": {"ground_truth": str(r["answer"])},
            "data_source": r["source"],
        }
        for r in rows
    ]


def write_task(root: Path) -> dict:
    """Write the parquet file and the verifier module under ``root``; returns the ``task``
    section of a run config (the module's directory must be on the import path:
    ``pythonpath`` of ``run_d3s``, or ``sys.path`` in process)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    path = root / "two_sources.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(48)), path)
    (root / "two_sources_reward.py").write_text(textwrap.dedent(VERIFIER))
    return {
        "type": "dataset",
        "train": [str(path)],
        "heldout_fraction": 0.25,
        "columns": {
            "prompt": "question",
            "answer": "reward_model.ground_truth",
            "source": "data_source",
        },
        "verifier": "two_sources_reward:by_answer",
        "heldout_size": 8,
    }


def save_tiny_policy(directory: Path) -> Path:
    """A 1-layer GPT-2 with a character tokenizer covering the task's questions."""
    from services.policy.model import PolicySpec, build_policy, save_policy
    from services.policy.tokenizer import char_tokenizer

    tok = char_tokenizer("0123456789+-=")
    spec = PolicySpec(n_layer=1, n_embd=32, n_head=2, n_positions=16)
    return save_policy(build_policy(spec, tok, seed=0), tok, directory)


def run_config(task: dict, policy: Path, run_dir: Path, **sections: dict) -> dict:
    """A 2-step run on ``task`` from ``policy``, evaluated at steps 0 and 2."""
    data = {
        "name": "two-sources",
        "task": task,
        "policy": {"path": str(policy)},
        "rollout": {"prompts_per_step": 6, "samples_per_prompt": 4, "max_new_tokens": 4},
        "learner": {"lr": 1e-3},
        "eval": {"n_samples": 2, "ks": [1, 2]},
        "train": {
            "total_steps": 2,
            "eval_every": 2,
            "checkpoint_every": 2,
            "run_dir": str(run_dir),
            "progress_bar": False,
        },
        "api": {"enabled": False},
        "logging": {"tensorboard": False},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data

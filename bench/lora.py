"""Full fine-tuning against LoRA (rank 8 and rank 32) on SmolLM2-135M-Instruct, each under GRPO
and D3S, from the same start with the same seeds (issue #30's benchmark). ``lora32-attn`` puts
the rank-32 adapter on the attention projections alone (0.023x the model's bytes, against
0.060x on every projection).

    python -m bench.lora [--variants full lora8 lora32 lora32-attn] [--presets grpo d3s]
        [--seeds 2] [--steps 12] [--eval-every 4] [--jobs 1] [--out bench/results/lora] [--fresh]
        [--set key=value ...]
    python -m bench.lora --short     # the tiny built-in policy, 2 steps, one seed: the pieces run

The defaults are the SmolLM2 configs' own 12 steps: measured on 2 cores, 6-8 min a d3s run and
9-11 min a grpo run, so the default 12 runs take about 2 hours at ``--jobs 1`` (the committed
results are one seed: 8 runs, 69 min). ``--short`` writes under runs/bench_lora_short/ (nothing
in bench/results).

Full fine-tuning trains ``configs/smollm2.yaml``; LoRA trains ``configs/smollm2_lora.yaml`` (its
learning rate, 2e-4, is 10x full fine-tuning's, as adapters want) at rank 8 or 32 with alpha
2 x rank, so both ranks scale their update alike. Everything else (model, data, rollout budget,
seeds) is the same. Each run is lock-step ``d3s train`` in a process of its own (so its peak
memory is its own); runs that reached their last step are kept (``--fresh`` trains all again).

Reported per variant and preset (means over seeds): held-out Pass@1 against step; bytes and
seconds per weight sync (``weight_sync_bytes`` and ``weight_sync_seconds``: the learner's host
copy of what a version carries and its load into the engine); learner seconds per step; and the
run process's peak resident memory (``ru_maxrss``: learner, engine and evaluation copy share
the process under ``d3s train``, so the difference between variants is the learner's; with a
GPU also ``torch.cuda.max_memory_allocated``). The target of issue #30 is printed as a verdict
line per preset, whichever way it falls: LoRA rank 32 within noise of full fine-tuning's final
Pass@1 (twice the standard error of the difference: over seeds, or with one seed binomial over
the held-out prompts) with at most 0.05x its sync bytes.

Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FULL_CONFIG = "configs/smollm2.yaml"
LORA_CONFIG = "configs/smollm2_lora.yaml"
SHORT_CONFIG = "configs/quickstart.yaml"
BAR = "eval/pass@1"
TARGET_BYTES_RATIO = 0.05
# --short: the built-in 1-layer policy on 1-digit sums with a short warm start (GPT-2's layers)
SHORT_SETS = [
    "task.type=arithmetic",
    "task.digits=1",
    "task.heldout_size=16",
    "policy.n_layer=1",
    "policy.n_embd=32",
    "policy.n_head=2",
    "warmstart.steps=200",
    "warmstart.band=null",
    "rollout.prompts_per_step=8",
    "rollout.samples_per_prompt=8",
    "eval.n_samples=4",
    "eval.ks=[1,4]",
]
SHORT_TARGETS = "[c_attn,c_proj,c_fc]"


ATTENTION_TARGETS = "[q_proj,k_proj,v_proj,o_proj]"
VARIANT = re.compile(r"lora(\d+)(-attn)?")


def variant_config(variant: str, short: bool) -> tuple[str, list[str]]:
    """(config file, overrides) of ``full``, ``lora<rank>`` (every attention and MLP projection,
    as ``configs/smollm2_lora.yaml``) or ``lora<rank>-attn`` (the attention projections alone:
    about a third of the adapter's bytes)."""
    match = VARIANT.fullmatch(variant)
    if variant != "full" and match is None:
        raise ValueError(
            f"--variants: {variant!r} is neither 'full', 'lora<rank>' nor 'lora<rank>-attn'"
        )
    if match is None:
        return (SHORT_CONFIG, list(SHORT_SETS)) if short else (FULL_CONFIG, [])
    rank = int(match.group(1))
    sets = [f"learner.lora.rank={rank}", f"learner.lora.alpha={2.0 * rank}"]
    if not short:
        if match.group(2):
            sets.append(f"learner.lora.target_modules={ATTENTION_TARGETS}")
        return LORA_CONFIG, sets
    # the short config has no LoRA section: the adapter on GPT-2's layers (with -attn, its
    # attention alone), at 10x its lr
    targets = "[c_attn]" if match.group(2) else SHORT_TARGETS
    lora = [f"learner.lora.target_modules={targets}", "learner.lr=1e-3"]
    return SHORT_CONFIG, [*SHORT_SETS, *sets, *lora]


def run_dir(runs: Path, variant: str, preset: str, seed: int) -> Path:
    return runs / f"{variant}-{preset}-s{seed}"


def finished(path: Path, steps: int) -> bool:
    from services.telemetry.run_log import read_metrics

    if not (path / "metrics.jsonl").exists() or not (path / "bench.json").exists():
        return False
    rows = [r for r in read_metrics(path / "metrics.jsonl") if "heldout_accuracy" in r]
    return bool(rows) and int(rows[-1]["step"]) >= steps


def train_one(job: dict) -> str:
    """One run in this (fresh) process; writes its metrics and ``bench.json`` (wall seconds,
    the process's peak resident memory, CUDA's peak allocation)."""
    import resource
    import shutil

    import torch

    torch.set_num_threads(job["threads"])
    logging.basicConfig(level=logging.WARNING)
    from services.run.config import load_config
    from services.run.trainer import SyncTrainer

    path = Path(job["run_dir"])
    shutil.rmtree(path, ignore_errors=True)
    config, sets = variant_config(job["variant"], job["short"])
    overrides = [
        f"algorithm.preset={job['preset']}",
        f"train.seed={job['seed']}",
        f"train.total_steps={job['steps']}",
        f"train.run_dir={path}",
        f"train.checkpoint_every={job['steps']}",
        "train.resume=false",
        "train.progress_bar=false",
        *sets,
        *job["sets"],
    ]
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    SyncTrainer(cfg).run()
    info = {
        "wall_seconds": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else None,
        "heldout_prompts": cfg.task.heldout_size,
        "config": config,
        "overrides": overrides,
    }
    (path / "bench.json").write_text(json.dumps(info, indent=2) + "\n")
    return str(path)


# ---- reading runs back ------------------------------------------------------------------------


def read_run(path: Path) -> dict:
    """A run's Pass@1 curve and its per-step sync and learner figures."""
    from services.telemetry.run_log import read_metrics

    rows = read_metrics(path / "metrics.jsonl")
    evals = [r for r in rows if BAR in r]
    steps = [r for r in rows if r.get("step", 0) > 0 and "learner_seconds" in r]
    info = json.loads((path / "bench.json").read_text())

    def mean(key: str) -> float | None:
        vals = [float(r[key]) for r in steps if key in r]
        return statistics.mean(vals) if vals else None

    return {
        "step": [int(r["step"]) for r in evals],
        "pass1": [float(r[BAR]) for r in evals],
        "sync_bytes": mean("weight_sync_bytes"),
        "sync_seconds": mean("weight_sync_seconds"),
        "learner_seconds": mean("learner_seconds"),
        **info,
    }


def _mean_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def combine(runs: list[dict]) -> dict:
    """One variant and preset over its seeds: the mean Pass@1 curve (on the steps every seed
    evaluated), the final Pass@1's mean and standard error, and the means of the rest."""
    n = min(len(r["step"]) for r in runs)
    finals = [r["pass1"][n - 1] for r in runs]
    final = statistics.mean(finals)
    if len(runs) > 1:
        se = statistics.stdev(finals) / math.sqrt(len(runs))
    else:  # one seed: the binomial error of a rate over the held-out prompts
        prompts = max(1, int(runs[0].get("heldout_prompts") or 1))
        se = math.sqrt(max(final * (1 - final), 1e-12) / prompts)
    keys = ("sync_bytes", "sync_seconds", "learner_seconds", "peak_rss_mb", "wall_seconds")
    return {
        "seeds": len(runs),
        "step": runs[0]["step"][:n],
        "pass1": [statistics.mean(r["pass1"][i] for r in runs) for i in range(n)],
        "pass1_start": statistics.mean(r["pass1"][0] for r in runs),
        "pass1_final": final,
        "pass1_final_se": se,
        "cuda_max_allocated_mb": _mean_of([r.get("cuda_max_allocated_mb") for r in runs]),
        **{k: _mean_of([r.get(k) for r in runs]) for k in keys},
    }


def verdict(full: dict, lora: dict, preset: str, variant: str) -> dict:
    """Issue #30's target for one preset and one rank-32 variant: LoRA rank 32 within noise of
    full fine-tuning's final Pass@1 (|difference| <= 2 standard errors of it) with at most 0.05x
    its sync bytes."""
    diff = lora["pass1_final"] - full["pass1_final"]
    noise = 2 * math.hypot(lora["pass1_final_se"], full["pass1_final_se"])
    ratio = (
        lora["sync_bytes"] / full["sync_bytes"]
        if lora["sync_bytes"] is not None and full["sync_bytes"]
        else None
    )
    within = abs(diff) <= noise
    small = ratio is not None and ratio <= TARGET_BYTES_RATIO
    line = (
        f"verdict ({variant}, {preset}): LoRA rank 32 final Pass@1 {lora['pass1_final']:.3f} "
        f"vs full fine-tuning {full['pass1_final']:.3f} (difference {diff:+.3f}, noise "
        f"+-{noise:.3f}: {'within' if within else 'outside'} noise); sync bytes "
        + (f"{ratio:.3f}x" if ratio is not None else "n/a")
        + f" of full ({'at most' if small else 'above'} {TARGET_BYTES_RATIO}x): target "
        + ("MET" if within and small else "NOT MET")
    )
    return {
        "preset": preset,
        "variant": variant,
        "difference": diff,
        "noise": noise,
        "bytes_ratio": ratio,
        "within_noise": within,
        "bytes_ok": small,
        "met": within and small,
        "line": line,
    }


def summarise(runs_dir: Path, variants: list[str], presets: list[str], seeds: list[int]) -> dict:
    cells = {
        f"{v}/{p}": combine([read_run(run_dir(runs_dir, v, p, s)) for s in seeds])
        for v in variants
        for p in presets
    }
    verdicts = [
        verdict(cells[f"full/{p}"], cells[f"{v}/{p}"], p, v)
        for p in presets
        for v in variants
        if f"full/{p}" in cells and v.split("-")[0] == "lora32"
    ]
    return {"cells": cells, "verdicts": verdicts}


def _f(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(summary: dict) -> str:
    head = (
        "| variant | preset | seeds | Pass@1 start -> final (se) | bytes per sync | s per sync "
        "| learner s per step | peak RSS MB | CUDA peak MB | wall s per run |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, c in summary["cells"].items():
        variant, preset = name.split("/")
        lines.append(
            f"| {variant} | {preset} | {c['seeds']} | {c['pass1_start']:.3f} -> "
            f"{c['pass1_final']:.3f} ({c['pass1_final_se']:.3f}) | {_f(c['sync_bytes'], ',.0f')} "
            f"| {_f(c['sync_seconds'], '.3f')} | {_f(c['learner_seconds'], '.2f')} "
            f"| {_f(c['peak_rss_mb'], ',.0f')} | {_f(c['cuda_max_allocated_mb'], ',.0f')} "
            f"| {_f(c['wall_seconds'], '.0f')} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    names = list(cells)
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.5))
    for name, c in cells.items():
        axes[0].plot(c["step"], c["pass1"], marker="o", label=name)
    axes[0].set_title("held-out Pass@1 vs step")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    bars = [
        ("sync_bytes", "bytes per sync (log)"),
        ("sync_seconds", "seconds per sync"),
        ("learner_seconds", "learner seconds per step"),
        ("peak_rss_mb", "run process peak RSS (MB)"),
    ]
    for ax, (key, label) in zip(axes[1:], bars, strict=True):
        ax.bar(range(len(names)), [cells[n][key] or 0.0 for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label)
        if key == "sync_bytes":
            ax.set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(summary: dict, cmd: str, note: str) -> str:
    return "\n".join(
        [
            "# Full fine-tuning vs LoRA on SmolLM2-135M-Instruct",
            "",
            f"`{cmd}` ({note}). Lock-step `d3s train`, each run its own process; means over "
            "seeds. Full fine-tuning: `configs/smollm2.yaml`; LoRA: `configs/smollm2_lora.yaml` "
            "(lr 2e-4) at the rank named, alpha 2 x rank. Bytes and seconds per sync: the "
            "learner's host copy of a version and its load into the HF engine "
            "(`weight_sync_bytes`, `weight_sync_seconds`). Peak RSS: the whole run process "
            "(learner, engine and evaluation copy).",
            "",
            table(summary),
            "",
            *[v["line"] for v in summary["verdicts"]],
            "",
            "![curves](lora.png)",
            "",
        ]
    )


def _jobs(args: argparse.Namespace, runs: Path, threads: int) -> list[dict]:
    return [
        {
            "variant": v,
            "preset": p,
            "seed": s,
            "steps": args.steps,
            "run_dir": str(run_dir(runs, v, p, s)),
            "threads": threads,
            "short": args.short,
            "sets": [f"train.eval_every={args.eval_every}", *args.sets],
        }
        for s in args.seed_list
        for p in args.presets
        for v in args.variants
        if args.fresh or not finished(run_dir(runs, v, p, s), args.steps)
    ]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variants", nargs="+", default=["full", "lora8", "lora32"])
    ap.add_argument("--presets", nargs="+", default=["grpo", "d3s"])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (threads split the cores)")
    ap.add_argument("--threads", type=int, default=2, help="cores on this machine")
    ap.add_argument("--out", default=None, help="default bench/results/lora (--short: in --runs)")
    ap.add_argument("--runs", default=None, help="run directories, default runs/bench_lora(_short)")
    ap.add_argument("--fresh", action="store_true", help="train every run again")
    ap.add_argument("--short", action="store_true", help="tiny policy, 2 steps, seed 0")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override")
    args = ap.parse_args(argv)
    for v in args.variants:
        variant_config(v, args.short)  # a bad name fails before anything trains
    if args.short:
        args.steps, args.eval_every, args.seeds = 2, 1, 1
    args.seed_list = list(range(args.seeds))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    short = "_short" if args.short else ""
    runs = Path(args.runs or f"runs/bench_lora{short}")
    out = Path(args.out or (runs / "lora_short" if args.short else "bench/results/lora"))
    jobs = _jobs(args, runs, max(1, args.threads // args.jobs))
    t0 = time.perf_counter()
    # spawn, one run per process: each run's peak memory is its own
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        for done in pool.map(train_one, jobs):
            print("done:", done, flush=True)
    summary = summarise(runs, args.variants, args.presets, args.seed_list)
    cmd = (
        f"python -m bench.lora{' --short' if args.short else ''} --variants "
        f"{' '.join(args.variants)} --presets {' '.join(args.presets)} --seeds {args.seeds} "
        f"--steps {args.steps} --eval-every {args.eval_every}"
        + "".join(f" --set {x}" for x in args.sets)
    )
    note = (
        f"{len(jobs)} runs trained in {(time.perf_counter() - t0) / 60:.0f} min of this invocation"
        if jobs
        else "the finished runs summarised again"
    )
    if args.short:
        note += "; --short: the built-in 1-layer policy on 1-digit sums, not SmolLM2"
    text = report(summary, cmd, note).replace("](lora.png)", f"]({out.name}.png)")
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(text)
    Path(f"{out}.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, Path(f"{out}.png"), "SmolLM2-135M-Instruct: full fine-tuning vs LoRA")
    return summary


if __name__ == "__main__":
    main()

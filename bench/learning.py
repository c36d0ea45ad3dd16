"""Does D3S learn more per learner token and per learner second than GRPO? Measured side by side.

    python -m bench.learning [--seeds 3] [--steps 200] [--jobs 2] [--out bench/results]

From one cached warm start, with the same seeds and the same rollout budget (prompts x samples
per step), trains each preset and prints one table: final held-out accuracy (mean ± sd over
seeds), learner tokens and learner seconds to first reach a fixed accuracy and GRPO's final
accuracy, and their ratios to GRPO. Writes learning.md, learning.json and learning.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RUNS = [  # (label, preset, policy loss)
    ("grpo", "grpo", "grpo"),
    ("random", "random", "grpo"),
    ("d1s", "d1s", "grpo"),
    ("d1s-cross", "d1s-cross", "grpo"),
    ("d2s", "d2s", "grpo"),
    ("d3s", "d3s", "grpo"),
    ("d3s-i", "d3s-i", "grpo"),
    ("d3s+gspo", "d3s", "gspo"),
]


def _train_one(config: str, label: str, preset: str, loss: str, seed: int, steps: int, out: str, threads: int,
               extra: list[str]) -> str:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    from services.run.config import load_config
    from services.run.trainer import SyncTrainer

    run_dir = Path(out) / "runs" / f"{label}-s{seed}"
    cfg = load_config(config, [f"algorithm.preset={preset}", f"learner.loss.type={loss}", f"train.seed={seed}",
                               f"train.total_steps={steps}", f"train.run_dir={run_dir}", "train.resume=false",
                               "train.progress_bar=false", *extra])
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    SyncTrainer(cfg).run()
    return str(run_dir / "metrics.jsonl")


def _curve(path: Path) -> dict[str, np.ndarray]:
    from services.telemetry.run_log import read_metrics

    ev = [r for r in read_metrics(path) if "heldout_accuracy" in r]
    return {k: np.array([r.get(k, 0.0) for r in ev], dtype=float)
            for k in ("step", "heldout_accuracy", "learner_tokens_total", "learner_seconds_total")}


def _first_reach(curve: dict[str, np.ndarray], target: float, key: str) -> float | None:
    hit = np.nonzero(curve["heldout_accuracy"] >= target - 1e-12)[0]
    return float(curve[key][hit[0]]) if hit.size else None


def _mean_curve(curves: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    n = min(len(c["step"]) for c in curves)
    return {k: np.mean([c[k][:n] for c in curves], axis=0) for k in curves[0]}


def summarise(out: Path, labels: list[str], seeds: list[int], threshold: float) -> dict:
    curves = {lab: [_curve(out / "runs" / f"{lab}-s{s}" / "metrics.jsonl") for s in seeds] for lab in labels}
    mean = {lab: _mean_curve(cs) for lab, cs in curves.items()}
    finals = {lab: [float(c["heldout_accuracy"][-1]) for c in cs] for lab, cs in curves.items()}
    grpo_final = statistics.mean(finals["grpo"])
    rows = []
    for lab in labels:
        m = mean[lab]
        row = {
            "label": lab,
            "final_mean": statistics.mean(finals[lab]),
            "final_sd": statistics.stdev(finals[lab]) if len(seeds) > 1 else 0.0,
            "tokens_total": float(m["learner_tokens_total"][-1]),
            "seconds_total": float(m["learner_seconds_total"][-1]),
        }
        for name, target in (("thr", threshold), ("grpo_final", grpo_final)):
            row[f"tokens_to_{name}"] = _first_reach(m, target, "learner_tokens_total")
            row[f"seconds_to_{name}"] = _first_reach(m, target, "learner_seconds_total")
            row[f"steps_to_{name}"] = _first_reach(m, target, "step")
        rows.append(row)
    base = rows[0]
    for r in rows:
        for k in ("tokens_to_thr", "seconds_to_thr", "tokens_to_grpo_final", "seconds_to_grpo_final",
                  "tokens_total", "seconds_total"):
            r[f"{k}_ratio"] = (r[k] / base[k]) if (r[k] is not None and base.get(k)) else None
    _plot(mean, out / "learning.png", threshold, grpo_final)
    return {"threshold": threshold, "grpo_final": grpo_final, "seeds": seeds, "rows": rows}


def _fmt(x, spec=".0f"):
    return "—" if x is None else format(x, spec)


def table(summary: dict) -> str:
    thr, gf = summary["threshold"], summary["grpo_final"]
    lines = [
        f"| preset | final acc (mean ± sd) | tokens to {thr:.2f} | ×GRPO | learner s to {thr:.2f} | ×GRPO "
        f"| tokens to GRPO final ({gf:.3f}) | ×GRPO | learner s to GRPO final | ×GRPO | tokens, whole run | ×GRPO "
        "| learner s, whole run | ×GRPO |",
        "|" + "---|" * 15,
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['label']} | {r['final_mean']:.3f} ± {r['final_sd']:.3f} "
            f"| {_fmt(r['tokens_to_thr'])} | {_fmt(r['tokens_to_thr_ratio'], '.2f')} "
            f"| {_fmt(r['seconds_to_thr'], '.1f')} | {_fmt(r['seconds_to_thr_ratio'], '.2f')} "
            f"| {_fmt(r['tokens_to_grpo_final'])} | {_fmt(r['tokens_to_grpo_final_ratio'], '.2f')} "
            f"| {_fmt(r['seconds_to_grpo_final'], '.1f')} | {_fmt(r['seconds_to_grpo_final_ratio'], '.2f')} "
            f"| {_fmt(r['tokens_total'])} | {_fmt(r['tokens_total_ratio'], '.2f')} "
            f"| {_fmt(r['seconds_total'], '.1f')} | {_fmt(r['seconds_total_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def _plot(mean: dict, path: Path, threshold: float, grpo_final: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for lab, m in mean.items():
        style = {"linewidth": 2.5} if lab in ("grpo", "d3s") else {"linewidth": 1.2, "alpha": 0.8}
        for ax, key in zip(axes, ("step", "learner_tokens_total", "learner_seconds_total"), strict=True):
            ax.plot(m[key], m["heldout_accuracy"], label=lab, **style)
    for ax, xl in zip(axes, ("step", "learner tokens (cumulative)", "learner seconds (cumulative)"), strict=True):
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out accuracy")
        ax.axhline(grpo_final, color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("held-out accuracy, mean over seeds (dotted: GRPO's final accuracy)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with its own thread budget)")
    ap.add_argument("--threshold", type=float, default=0.9, help="the fixed accuracy for 'to reach'")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--summarise-only", action="store_true", help="re-read finished runs, train nothing")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="config override for every run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in RUNS if not args.only or r[0] in args.only]
    labels = [r[0] for r in runs]
    seeds = list(range(args.seeds))

    from services.run.config import load_config
    from services.run.prepare import prepare_policy

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    if not args.summarise_only:
        ws = prepare_policy(load_config(args.config, args.extra))  # once, before the pool shares it
        print(f"warm start: {ws} ({time.perf_counter() - t0:.0f} s)", flush=True)
        threads = max(1, 2 // args.jobs)
        jobs = [(args.config, lab, pre, loss, s, args.steps, str(out), threads, args.extra)
                for s in seeds for (lab, pre, loss) in runs]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futs = [pool.submit(_train_one, *j) for j in jobs]
            for i, f in enumerate(futs, 1):
                f.result()
                print(f"[{i}/{len(futs)}] {jobs[i - 1][1]} seed {jobs[i - 1][4]} done "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarise(out, labels, seeds, args.threshold)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["config"] = args.config
    summary["steps"] = args.steps
    text = table(summary)
    print(text)
    (out / "learning.md").write_text(
        f"Held-out accuracy on {args.steps} steps, {len(seeds)} seeds, config {args.config}; "
        "learner tokens = response tokens in the loss; "
        + ("re-summarised from finished runs" if args.summarise_only else f"wall time {summary['wall_seconds']:.0f} s")
        + ".\n\n" + text + "\n")
    (out / "learning.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'learning.md'}, {out / 'learning.png'} ({summary['wall_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()

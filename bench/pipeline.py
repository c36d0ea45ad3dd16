"""Wall-clock, not only learner seconds: does the asynchronous pipeline pay, and does D3S's
learner saving reach the user's clock?

    python -m bench.pipeline [--seeds 0 1 2] [--steps 60] [--actors-sweep 1 2]

Runs the quickstart-sized service (``configs/quickstart.yaml``: 32 prompts x 8 samples, the
cached warm start) for GRPO and D3S, each in sync mode and in async mode with max_staleness 1
and 2, side by side in one invocation, then a sweep over the number of rollout actors. Every
run is a real ``d3s run`` pipeline (Redis, Ray actors, DeepSpeed) in this process.

Per configuration (mean over seeds): steps/min, samples generated/min, learner busy fraction,
generation busy fraction, stale fraction, final held-out accuracy, and wall-clock seconds to
GRPO's final accuracy. For these, evaluation runs on the learner between steps and wall-clock
excludes it (the same fixed cost in every configuration; while it runs the learner is paused),
so every configuration is timed without an evaluator competing for the same two cores.

Then where evaluation runs (``eval.background``): each preset in async mode (max_staleness 1)
with evaluation on the learner between steps and in its own Ray actor beside training, wall-clock
now including evaluation: what the user waits for. Writes pipeline.md, pipeline.json and
pipeline.png under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

MODES = [("sync", 0), ("async", 1), ("async", 2)]
# A target all seeds of a configuration can reach: the final accuracy itself is a noisy mean
# that about half the runs of any configuration (GRPO's own included) end below.
NEAR = 0.99


def _label(preset: str, mode: str, staleness: int, actors: int = 1) -> str:
    base = f"{preset} {mode}" + (f" s{staleness}" if mode == "async" else "")
    return base + (f" x{actors}" if actors != 1 else "")


def run_one(
    config: str,
    out: Path,
    preset: str,
    mode: str,
    staleness: int,
    seed: int,
    steps: int,
    actors: int,
    eval_background: bool = False,
) -> dict[str, Any]:
    import torch

    from services.run.config import load_config
    from services.run.orchestrator import run_service
    from services.telemetry.run_log import read_metrics

    torch.set_num_threads(1)
    where = "bg" if eval_background else "inline"
    run_dir = (
        out / "runs" / f"{preset}-{mode}{staleness}-a{actors}-{where}-s{seed}-{int(time.time())}"
    )
    cfg = load_config(
        config,
        [
            f"algorithm.preset={preset}",
            f"service.mode={mode}",
            f"service.max_staleness={staleness}",
            f"train.seed={seed}",
            f"train.total_steps={steps}",
            f"train.run_dir={run_dir}",
            f"rollout.num_actors={actors}",
            "train.progress_bar=false",
            "api.enabled=false",
            f"eval.background={str(eval_background).lower()}",
            f"service.namespace=pipe-{preset}-{mode}{staleness}-{actors}-{seed}-{int(time.time())}",
        ],
    )
    summary = run_service(cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    # Inline: each evaluation paused the learner before its row was written, so it is taken out
    # of the clock. Background: the learner never waited for one; the clock is the user's.
    inline = 0.0 if eval_background else 1.0
    t0 = rows[0]["wall_time"] + inline * rows[0].get("eval_seconds", 0.0)
    eval_before = 0.0
    curve = []
    for r in rows[1:]:
        wall = r["wall_time"] - t0 - eval_before  # the time this row's step finished
        if "heldout_accuracy" in r:
            curve.append((wall, r["heldout_accuracy"]))
        eval_before += inline * r.get("eval_seconds", 0.0)
    last = rows[-1]
    wall = last["wall_time"] - t0 - (eval_before - inline * last.get("eval_seconds", 0.0))
    # Wall-clock with evaluation: the first row's start to the last evaluation's end.
    wall_with_eval = (
        max(last.get("eval_wall_time", last["wall_time"]), last["wall_time"]) - rows[0]["wall_time"]
        if eval_background
        else last["wall_time"] + last.get("eval_seconds", 0.0) - rows[0]["wall_time"]
    )
    stats = summary["counters"]
    reports = [v for k, v in summary["components"].items() if k.startswith("rollout")]
    gen_s = sum(r.get("gen_seconds", 0.0) for r in reports)
    samples = sum(r.get("samples_generated", 0) for r in reports)
    written = max(stats.get("groups_written", 0), 1)
    return {
        "preset": preset,
        "mode": mode,
        "staleness": staleness,
        "seed": seed,
        "actors": actors,
        "eval_background": eval_background,
        "wall_s": wall,
        "wall_with_eval_s": wall_with_eval,
        "steps_per_min": steps / wall * 60,
        "samples_per_min": samples / wall * 60,
        "learner_busy": last["learner_seconds_total"] / wall,
        "learner_wait_s": last.get("learner_wait_seconds_total", 0.0),
        "gen_busy": gen_s / (actors * wall),
        "stale_fraction": stats.get("groups_stale", 0) / written,
        "groups_written": written,
        "final_acc": curve[-1][1] if curve else None,
        "curve": curve,
    }


def _mean(rs: list[dict], key: str) -> float:
    vals = [r[key] for r in rs if r[key] is not None]
    return statistics.mean(vals) if vals else float("nan")


def _first_wall(curve: list[tuple[float, float]], target: float) -> float | None:
    for wall, acc in curve:
        if acc >= target - 1e-12:
            return wall
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--presets", nargs="+", default=["grpo", "d3s"])
    ap.add_argument(
        "--actors-sweep",
        type=int,
        nargs="*",
        default=[1, 2],
        help="rollout actors for the throughput sweep (async, max_staleness 1, seed 0)",
    )
    ap.add_argument("--sweep-only", action="store_true", help="only the rollout-actor sweep")
    ap.add_argument(
        "--rerender", action="store_true", help="tables and figure again from --out/pipeline.json"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.sweep_only:
        return _sweep_only(args)
    if args.rerender:
        saved = json.loads((args.out / "pipeline.json").read_text())
        return summarise(args, saved["runs"], saved.get("placement", []), saved["sweep"])
    args.out.mkdir(parents=True, exist_ok=True)

    results: list[dict] = []
    placement: list[dict] = []
    for seed in args.seeds:  # seeds outermost: drift on a shared machine hits every config alike
        for preset in args.presets:
            for mode, staleness in MODES:
                r = run_one(args.config, args.out, preset, mode, staleness, seed, args.steps, 1)
                print(
                    f"{_label(preset, mode, staleness)} seed {seed}: {r['wall_s']:.1f}s, "
                    f"{r['steps_per_min']:.1f} steps/min, acc {r['final_acc']}",
                    flush=True,
                )
                results.append(r)
            for background in (False, True):
                r = run_one(
                    args.config, args.out, preset, "async", 1, seed, args.steps, 1, background
                )
                print(
                    f"{preset} async s1, evaluation {'background' if background else 'inline'} "
                    f"seed {seed}: {r['wall_with_eval_s']:.1f}s with evaluation",
                    flush=True,
                )
                placement.append(r)
    sweep = []
    for preset in args.presets:
        for actors in args.actors_sweep:
            sweep.append(
                run_one(
                    args.config, args.out, preset, "async", 1, args.seeds[0], args.steps, actors
                )
            )

    return summarise(args, results, placement, sweep)


def summarise(
    args: argparse.Namespace, results: list[dict], placement: list[dict], sweep: list[dict]
) -> dict:
    """Tables, figure and JSON of the runs (``--rerender`` calls it on a saved pipeline.json)."""
    args.out.mkdir(parents=True, exist_ok=True)
    grpo_sync = [r for r in results if r["preset"] == "grpo" and r["mode"] == "sync"]
    target = _mean(grpo_sync, "final_acc") if grpo_sync else None
    table = []
    for preset in args.presets:
        for mode, staleness in MODES:
            rs = [
                r
                for r in results
                if (r["preset"], r["mode"], r["staleness"]) == (preset, mode, staleness)
            ]
            reach = [_first_wall(r["curve"], target) for r in rs] if target is not None else []
            near = (
                [_first_wall(r["curve"], NEAR * target) for r in rs] if target is not None else []
            )
            table.append(
                {
                    "label": _label(preset, mode, staleness),
                    "seeds": len(rs),
                    **{
                        k: _mean(rs, k)
                        for k in (
                            "wall_s",
                            "steps_per_min",
                            "samples_per_min",
                            "learner_busy",
                            "gen_busy",
                            "stale_fraction",
                            "final_acc",
                        )
                    },
                    "final_acc_sd": statistics.stdev([r["final_acc"] for r in rs])
                    if len(rs) > 1
                    else 0.0,
                    "wall_to_target": statistics.mean(reach)
                    if reach and None not in reach
                    else None,
                    "reached": sum(x is not None for x in reach),
                    "wall_to_near": statistics.mean(near) if near and None not in near else None,
                    "reached_near": sum(x is not None for x in near),
                }
            )
    by = {row["label"]: row for row in table}
    lines = [
        f"# Pipeline benchmark ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{args.config}`, {args.steps} steps, seeds {args.seeds}; one rollout actor unless said; "
        "wall-clock excludes held-out evaluations; 2-core shared CPU.",
        "",
        f"Target accuracy: GRPO sync's mean final held-out accuracy, {target:.3f}."
        if target
        else "",
        "",
        "| config | steps/min | samples gen/min | learner busy | generation busy | stale | final acc | "
        f"wall s to target (runs reaching) | wall s to {NEAR:.0%} of it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        reach = "—" if row["wall_to_target"] is None else f"{row['wall_to_target']:.1f}"
        near = "—" if row["wall_to_near"] is None else f"{row['wall_to_near']:.1f}"
        lines.append(
            f"| {row['label']} | {row['steps_per_min']:.1f} | {row['samples_per_min']:.0f} | "
            f"{row['learner_busy']:.2f} | {row['gen_busy']:.2f} | {100 * row['stale_fraction']:.1f}% | "
            f"{row['final_acc']:.3f} ± {row['final_acc_sd']:.3f} | {reach} ({row['reached']}/{row['seeds']}) "
            f"| {near} ({row['reached_near']}/{row['seeds']}) |"
        )
    lines += ["", "Ratios (same run, same machine):", ""]
    for preset in args.presets:
        sync = by.get(_label(preset, "sync", 0))
        for staleness in (1, 2):
            asy = by.get(_label(preset, "async", staleness))
            if sync and asy:
                lines.append(
                    f"- {preset}: async s{staleness} is {asy['steps_per_min'] / sync['steps_per_min']:.2f}x "
                    "the steps/min of sync"
                )
    for key, what in (
        ("wall_to_target", "GRPO's final accuracy"),
        ("wall_to_near", f"{NEAR:.0%} of it"),
    ):
        best = {
            p: min(
                (r for r in table if r["label"].startswith(p) and r[key] is not None),
                key=lambda r, k=key: r[k],
                default=None,
            )
            for p in args.presets
        }
        if best.get("grpo") and best.get("d3s"):
            lines.append(
                f"- to {what}, best configuration each (every seed reaching): d3s "
                f"({best['d3s']['label']}) {best['d3s'][key]:.1f}s vs grpo ({best['grpo']['label']}) "
                f"{best['grpo'][key]:.1f}s = **{best['d3s'][key] / best['grpo'][key]:.2f}x**"
            )
    if placement:
        lines += [
            "",
            "## Where evaluation runs (async, max_staleness 1; wall-clock includes evaluation)",
            "",
            "| preset | evaluation | wall s with evaluation | steps/min with evaluation | "
            "final acc |",
            "|---|---|---|---|---|",
        ]
        for preset in args.presets:
            for background in (False, True):
                rs = [
                    r
                    for r in placement
                    if r["preset"] == preset and r["eval_background"] == background
                ]
                if not rs:
                    continue
                w = _mean(rs, "wall_with_eval_s")
                lines.append(
                    f"| {preset} | {'own actor' if background else 'on the learner'} | "
                    f"{w:.1f} | {args.steps / w * 60:.1f} | {_mean(rs, 'final_acc'):.3f} |"
                )
    if sweep:
        lines += [
            "",
            "## Throughput against rollout actors (async, max_staleness 1)",
            "",
        ]
        lines += _sweep_table(sweep)
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "pipeline.md").write_text(text)
    (args.out / "pipeline.json").write_text(
        json.dumps(
            {
                "runs": results,
                "placement": placement,
                "sweep": sweep,
                "table": table,
                "target": target,
            },
            indent=1,
            default=float,
        )
    )
    _plot(results, args.out / "pipeline.png")
    return {"table": table, "sweep": sweep, "target": target}


def _sweep_table(sweep: list[dict]) -> list[str]:
    """Markdown rows of the rollout-actor sweep, with their header."""
    lines = [
        "| preset | actors | steps/min | samples gen/min | learner busy | generation busy | stale |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sweep:
        lines.append(
            f"| {r['preset']} | {r['actors']} | {r['steps_per_min']:.1f} | {r['samples_per_min']:.0f} | "
            f"{r['learner_busy']:.2f} | {r['gen_busy']:.2f} | {100 * r['stale_fraction']:.1f}% |"
        )
    return lines


def _sweep_only(args: argparse.Namespace) -> dict:
    """The rollout-actor sweep alone (async, max_staleness 1, the first seed)."""
    sweep = [
        run_one(args.config, args.out, preset, "async", 1, args.seeds[0], args.steps, actors)
        for preset in args.presets
        for actors in args.actors_sweep
    ]
    lines = [
        f"# Throughput against rollout actors ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{args.config}`, {args.steps} steps, async, max_staleness 1, seed {args.seeds[0]}; "
        "2-core CPU: every actor, the learner, the selector and Redis share 2 cores.",
        "",
    ]
    lines += _sweep_table(sweep)
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "pipeline_actors.md").write_text(text)
    (args.out / "pipeline_actors.json").write_text(json.dumps(sweep, indent=1, default=float))
    return {"sweep": sweep}


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    labels = sorted({_label(r["preset"], r["mode"], r["staleness"]) for r in results})
    for lab in labels:
        rs = [
            r
            for r in results
            if _label(r["preset"], r["mode"], r["staleness"]) == lab and r["curve"]
        ]
        n = min(len(r["curve"]) for r in rs)
        wall = np.mean([[w for w, _ in r["curve"][:n]] for r in rs], axis=0)
        acc = np.mean([[a for _, a in r["curve"][:n]] for r in rs], axis=0)
        ax.plot(wall, acc, marker="o", label=lab, linewidth=2.2 if "d3s" in lab else 1.2)
    ax.set_xlabel("wall-clock seconds (evaluations excluded)")
    ax.set_ylabel("held-out accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

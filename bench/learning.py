"""Does D3S learn more per learner token and second than GRPO, and does it raise Pass@k? Side by side.

    python -m bench.learning [--tasks addition mixed] [--presets grpo random d1s ...]
        [--seeds 3] [--steps 100] [--long-factor 2.5] [--long-seeds 2] [--eval-every 25]
        [--eval-n 16] [--eval-prompts 500]
        [--experiments ladder long warmstart token_score noclip] [--jobs 2] [--out bench/results/learning-full]

Every run starts from the task's cached warm start and has the same rollout budget (prompts x
samples per step); every ``--eval-every`` steps it is evaluated on held-out prompts: greedy
accuracy, unbiased Pass@1 and Pass@8 from ``--eval-n`` samples per prompt (temperature 1), maj@8.
Experiments:

- ``ladder``: each preset on each task: final greedy, Pass@1, Pass@8 (mean ± sd over seeds),
  learner tokens and seconds to GRPO's final Pass@1 and their ratios to GRPO;
- ``long``: grpo, d1s, d2s, d3s for ``--long-factor`` x the steps on the last task: do the
  unscheduled presets (constant aggressive ratios) fall behind late?
- ``warmstart``: d3s against d3s-i from a clean and from an imperfect-demonstration warm start;
- ``token_score``: D3S ranking tokens by |A| x H (the paper's), H alone, |A| alone;
- ``noclip``: grpo, d1s, d2s, d3s on the last task with no gradient clipping, so that the larger
  policy gradient selection gives (Var(A) up) reaches the update instead of being clipped to 1.

Writes learning.md (tables), learning.json, and figures: curves per task, the long runs, and
the per-step gradient norm against Var(A) of the kept samples across presets.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TASK_CONFIGS = {"addition": "configs/bench.yaml", "mixed": "configs/bench_mixed.yaml"}
# label -> (preset, overrides); the loss is GRPO's token-level PPO-clip unless a label says gspo.
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo": ("grpo", ()),
    "random": ("random", ()),
    "d1s": ("d1s", ()),
    "d1s-cross": ("d1s-cross", ()),
    "d2s": ("d2s", ()),
    "d3s": ("d3s", ()),
    "d3s-i": ("d3s-i", ()),
    "d3s+gspo": ("d3s", ("learner.loss.type=gspo",)),
    "d3s-H": ("d3s", ("algorithm.token_score=entropy",)),
    "d3s-A": ("d3s", ("algorithm.token_score=adv",)),
}
DEFAULT_PRESETS = ["grpo", "random", "d1s", "d1s-cross", "d2s", "d3s", "d3s-i", "d3s+gspo"]
LONG_PRESETS = ["grpo", "d1s", "d2s", "d3s"]
EXPERIMENTS = ("ladder", "long", "warmstart", "token_score", "noclip")
CLEAN = ("warmstart.clean=true", "warmstart.band=null")
# A clip no step reaches: at learner.grad_clip 1.0 nearly every down-sampled step is clipped, which
# rescales away the larger gradient that selection is meant to produce.
NOCLIP = ("learner.grad_clip=1e6",)
NOCLIP_PRESETS = ["grpo", "d1s", "d2s", "d3s"]
CURVE_KEYS = (
    "step",
    "heldout_accuracy",
    "eval/pass@1",
    "eval/pass@8",
    "eval/maj@8",
    "learner_tokens_total",
    "learner_seconds_total",
)


@dataclass(frozen=True)
class Run:
    """One training run of the benchmark."""

    experiment: str
    task: str
    label: str
    preset: str
    seed: int
    steps: int
    overrides: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.task}/{self.label}-s{self.seed}"


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run the chosen experiments need (a run shared by two experiments is planned once)."""
    seeds = range(args.seeds)
    runs: list[Run] = []
    last = args.tasks[-1]
    if "ladder" in args.experiments:
        runs += [
            Run("ladder", t, lab, PRESETS[lab][0], s, args.steps, PRESETS[lab][1])
            for t in args.tasks
            for lab in args.presets
            for s in seeds
        ]
    if "long" in args.experiments:
        steps = round(args.long_factor * args.steps)
        runs += [
            Run("long", last, lab, PRESETS[lab][0], s, steps, PRESETS[lab][1])
            for lab in LONG_PRESETS
            for s in range(args.long_seeds)
        ]
    if "warmstart" in args.experiments:
        runs += [
            Run("warmstart", last, f"{lab} (clean)", lab, s, args.steps, CLEAN)
            for lab in ("d3s", "d3s-i")
            for s in seeds
        ]
    if "token_score" in args.experiments:
        runs += [
            Run("token_score", last, lab, PRESETS[lab][0], s, args.steps, PRESETS[lab][1])
            for lab in ("d3s-H", "d3s-A")
            for s in seeds
        ]
    if "noclip" in args.experiments:
        runs += [
            Run("noclip", last, f"{lab} (no clip)", PRESETS[lab][0], s, args.steps, NOCLIP)
            for lab in NOCLIP_PRESETS
            for s in seeds
        ]
    return runs


def priority(runs: list[Run], tasks: list[str]) -> list[Run]:
    """The order runs are started in: the ladder on the last task (the one with headroom), the
    other tasks' ladders, then long runs, token scores and warm starts; seed 0 of an experiment
    before seed 1. A benchmark stopped early (``--summarise-only`` on what finished) then still
    has whole comparisons."""
    exp_rank = {"ladder": 0, "noclip": 1, "long": 2, "token_score": 3, "warmstart": 4}
    task_rank = {t: i for i, t in enumerate(reversed(tasks))}
    return sorted(runs, key=lambda r: (exp_rank[r.experiment], task_rank[r.task], r.seed))


def finished(out: Path, run: Run) -> bool:
    """Whether ``run`` reached its last step (its final evaluation is in metrics.jsonl)."""
    from services.telemetry.run_log import read_metrics

    path = out / "runs" / run.name / "metrics.jsonl"
    if not path.is_file():
        return False
    rows = read_metrics(path)
    return bool(rows) and rows[-1].get("step") == run.steps and "heldout_accuracy" in rows[-1]


def _settings(args: argparse.Namespace) -> list[str]:
    return [
        f"eval.n_samples={args.eval_n}",
        f"task.heldout_size={args.eval_prompts}",
        f"train.eval_every={args.eval_every}",
        *args.extra,
    ]


def _train_one(run: Run, out: str, threads: int, settings: list[str]) -> str:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    from services.run.config import load_config
    from services.run.trainer import SyncTrainer

    run_dir = Path(out) / "runs" / run.name
    cfg = load_config(
        TASK_CONFIGS[run.task],
        [
            f"algorithm.preset={run.preset}",
            f"train.seed={run.seed}",
            f"train.total_steps={run.steps}",
            f"train.run_dir={run_dir}",
            "train.resume=false",
            "train.progress_bar=false",
            *settings,
            *run.overrides,
        ],
    )
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    SyncTrainer(cfg).run()
    return str(run_dir / "metrics.jsonl")


# ---- reading runs back ------------------------------------------------------------------------


def _curve(path: Path) -> dict[str, np.ndarray]:
    from services.telemetry.run_log import read_metrics

    ev = [r for r in read_metrics(path) if "heldout_accuracy" in r]
    return {k: np.array([r.get(k, np.nan) for r in ev], dtype=float) for k in CURVE_KEYS}


def _steps(path: Path) -> dict[str, np.ndarray]:
    """Per trained step: Var(A) before/after selection, kept-advantage norm, gradient norm."""
    from services.telemetry.run_log import read_metrics

    rows = [r for r in read_metrics(path) if "grad_norm" in r]
    keys = ("var_adv_before", "var_adv_after", "adv_norm_kept", "grad_norm", "samples_kept")
    return {k: np.array([r.get(k, np.nan) for r in rows], dtype=float) for k in keys}


def _mean_curve(curves: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    n = min(len(c["step"]) for c in curves)
    return {k: np.mean([c[k][:n] for c in curves], axis=0) for k in curves[0]}


def _first_reach(curve: dict[str, np.ndarray], target: float, key: str) -> float | None:
    hit = np.nonzero(curve["eval/pass@1"] >= target - 1e-12)[0]
    return float(curve[key][hit[0]]) if hit.size else None


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise_group(out: Path, runs: list[Run]) -> dict:
    """Rows (one per label, over seeds) of one experiment on one task, with ratios to its first
    label (GRPO where it ran) and GRPO's final Pass@1 as the target to reach."""
    labels = list(dict.fromkeys(r.label for r in runs))
    curves = {
        lab: [_curve(out / "runs" / r.name / "metrics.jsonl") for r in runs if r.label == lab]
        for lab in labels
    }
    mean = {lab: _mean_curve(cs) for lab, cs in curves.items()}
    base = "grpo" if "grpo" in labels else labels[0]
    target = statistics.mean(float(c["eval/pass@1"][-1]) for c in curves[base])
    rows = []
    for lab in labels:
        cs, m = curves[lab], mean[lab]
        row: dict = {"label": lab, "seeds": len(cs)}
        for key, name in (
            ("heldout_accuracy", "greedy"),
            ("eval/pass@1", "pass1"),
            ("eval/pass@8", "pass8"),
            ("eval/maj@8", "maj8"),
        ):
            row[f"{name}_mean"], row[f"{name}_sd"] = _ms([float(c[key][-1]) for c in cs])
            row[f"{name}_start"] = float(m[key][0])
        row["tokens_total"] = float(m["learner_tokens_total"][-1])
        row["seconds_total"] = float(m["learner_seconds_total"][-1])
        row["tokens_to_target"] = _first_reach(m, target, "learner_tokens_total")
        row["seconds_to_target"] = _first_reach(m, target, "learner_seconds_total")
        row["steps_to_target"] = _first_reach(m, target, "step")
        rows.append(row)
    ref = rows[labels.index(base)]
    for r in rows:
        for k in ("tokens_to_target", "seconds_to_target", "tokens_total", "seconds_total"):
            r[f"{k}_ratio"] = r[k] / ref[k] if r[k] is not None and ref.get(k) else None
    by_difficulty = _by_difficulty(out, runs, labels)
    return {
        "target_pass1": target,
        "base": base,
        "rows": rows,
        "mean_curves": mean,
        "by_difficulty": by_difficulty,
    }


def _by_difficulty(out: Path, runs: list[Run], labels: list[str]) -> dict:
    """label -> level -> final greedy and Pass@1 (mean over seeds), where prompts carry levels."""
    from services.telemetry.run_log import read_metrics

    result: dict = {}
    for lab in labels:
        finals = [
            [
                r
                for r in read_metrics(out / "runs" / run.name / "metrics.jsonl")
                if "heldout_accuracy" in r
            ]
            for run in runs
            if run.label == lab
        ]
        levels = sorted(
            {k.rsplit("/d", 1)[1] for k in finals[0][-1] if k.startswith("eval/pass@1/d")}
        )
        result[lab] = {
            lv: {
                m: statistics.mean(f[-1].get(f"eval/{m}/d{lv}", np.nan) for f in finals)
                for m in ("greedy_accuracy", "pass@1", "pass@8")
            }
            for lv in levels
        }
    return result


# ---- tables and figures -----------------------------------------------------------------------


def _fmt(x, spec=".0f"):
    return "—" if x is None else format(x, spec)


def table(group: dict) -> str:
    t = group["target_pass1"]
    lines = [
        f"| preset | greedy (step 0) | greedy | Pass@1 (step 0) | Pass@1 | Pass@8 (step 0) | Pass@8 | maj@8 "
        f"| tokens to Pass@1 {t:.3f} | ×{group['base']} "
        f"| learner s to it | ×{group['base']} | tokens, run | ×{group['base']} | learner s, run "
        f"| ×{group['base']} |",
        "|" + "---|" * 16,
    ]
    for r in group["rows"]:
        lines.append(
            f"| {r['label']} | {r['greedy_start']:.3f} | {r['greedy_mean']:.3f} ± {r['greedy_sd']:.3f} "
            f"| {r['pass1_start']:.3f} | {r['pass1_mean']:.3f} ± {r['pass1_sd']:.3f} "
            f"| {r['pass8_start']:.3f} | {r['pass8_mean']:.3f} ± {r['pass8_sd']:.3f} "
            f"| {r['maj8_mean']:.3f} ± {r['maj8_sd']:.3f} "
            f"| {_fmt(r['tokens_to_target'])} | {_fmt(r['tokens_to_target_ratio'], '.2f')} "
            f"| {_fmt(r['seconds_to_target'], '.1f')} | {_fmt(r['seconds_to_target_ratio'], '.2f')} "
            f"| {_fmt(r['tokens_total'])} | {_fmt(r['tokens_total_ratio'], '.2f')} "
            f"| {_fmt(r['seconds_total'], '.1f')} | {_fmt(r['seconds_total_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def difficulty_table(group: dict) -> str:
    per = group["by_difficulty"]
    levels = sorted({lv for d in per.values() for lv in d}, key=int)
    if not levels:
        return ""
    head = (
        "| preset | " + " | ".join(f"level {lv} greedy | level {lv} Pass@1" for lv in levels) + " |"
    )
    lines = [head, "|" + "---|" * (1 + 2 * len(levels))]
    for lab, d in per.items():
        cells = [f"{d[lv]['greedy_accuracy']:.3f} | {d[lv]['pass@1']:.3f}" for lv in levels]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_curves(groups: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    fig, axes = plt.subplots(len(names), 3, figsize=(17, 4.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        g = groups[name]
        for lab, m in g["mean_curves"].items():
            style = (
                {"linewidth": 2.4} if lab in ("grpo", "d3s") else {"linewidth": 1.2, "alpha": 0.85}
            )
            for ax, key in zip(
                row, ("step", "learner_tokens_total", "learner_seconds_total"), strict=True
            ):
                ax.plot(m[key], m["eval/pass@1"], marker=".", label=lab, **style)
        for ax, xl in zip(row, ("step", "learner tokens", "learner seconds"), strict=True):
            ax.set_xlabel(xl)
            ax.set_ylabel("held-out Pass@1")
            ax.axhline(g["target_pass1"], color="grey", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
            ax.set_title(name, fontsize=10)
        row[0].legend(fontsize=8)
    fig.suptitle(f"{title} (mean over seeds; dotted: {groups[names[0]]['base']}'s final Pass@1)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_grad_norm(
    out: Path, runs: list[Run], path: Path, task: str
) -> dict[str, dict[str, float]]:
    """Per-step gradient norm (before clipping) against Var(A) of the kept samples, by preset;
    returns the per-preset means it plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    means: dict[str, dict[str, float]] = {}
    for i, lab in enumerate(labels):
        steps = [_steps(out / "runs" / r.name / "metrics.jsonl") for r in runs if r.label == lab]
        var = np.concatenate([s["var_adv_after"] for s in steps])
        norm = np.concatenate([s["grad_norm"] for s in steps])
        akept = np.concatenate([s["adv_norm_kept"] for s in steps])
        ok = np.isfinite(var) & np.isfinite(norm)
        color = f"C{i % 10}"
        axes[0].scatter(var[ok], norm[ok], s=6, alpha=0.35, color=color)
        axes[0].scatter(
            [var[ok].mean()], [norm[ok].mean()], s=90, color=color, edgecolor="black", label=lab
        )
        axes[1].scatter(akept[ok], norm[ok], s=6, alpha=0.35, color=color, label=lab)
        means[lab] = {
            "var_adv_after": float(var[ok].mean()),
            "grad_norm": float(norm[ok].mean()),
            "adv_norm_kept": float(akept[ok].mean()),
            "var_adv_before": float(
                np.nanmean(np.concatenate([s["var_adv_before"] for s in steps]))
            ),
        }
    axes[0].set_xlabel("Var(A) of the kept samples")
    axes[1].set_xlabel("||A|| of the kept samples")
    for ax in axes:
        ax.set_ylabel("policy-gradient norm before clipping")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}: per learner step, every run (large dots: mean per preset)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return means


def grad_norm_table(means: dict[str, dict[str, float]]) -> str:
    lines = [
        "| preset | Var(A) all | Var(A) kept | ‖A‖ kept | grad norm |",
        "|---|---|---|---|---|",
    ]
    for lab, m in means.items():
        lines.append(
            f"| {lab} | {m['var_adv_before']:.3f} | {m['var_adv_after']:.3f} "
            f"| {m['adv_norm_kept']:.2f} | {m['grad_norm']:.3f} |"
        )
    return "\n".join(lines)


def summarise(out: Path, runs: list[Run]) -> dict:
    """Tables and figures of every experiment that ran."""
    groups: dict[str, dict] = {}
    for exp in EXPERIMENTS:
        for task in dict.fromkeys(r.task for r in runs if r.experiment == exp):
            members = [r for r in runs if r.experiment == exp and r.task == task]
            if exp in ("warmstart", "token_score", "noclip"):  # beside the ladder's own runs
                extra = {"warmstart": ("d3s", "d3s-i"), "token_score": ("d3s",)}.get(
                    exp, ("grpo", "d3s")
                )
                members = [
                    r
                    for r in runs
                    if r.experiment == "ladder" and r.task == task and r.label in extra
                ] + members
            if members:
                groups[f"{exp}/{task}"] = summarise_group(out, members)
    ladder = {k.split("/", 1)[1]: g for k, g in groups.items() if k.startswith("ladder/")}
    if ladder:
        _plot_curves(ladder, out / "learning.png", "held-out Pass@1 by preset")
    longs = {k: g for k, g in groups.items() if k.startswith("long/")}
    if longs:
        _plot_curves(longs, out / "learning_long.png", "long runs")
    others = {
        k: g for k, g in groups.items() if k.split("/")[0] in ("warmstart", "token_score", "noclip")
    }
    if others:
        _plot_curves(others, out / "learning_variants.png", "warm start, token score, no clip")
    # One task: Var(A) and the gradient's scale differ between tasks.
    task = runs[-1].task if runs else ""
    means = _plot_grad_norm(
        out,
        [r for r in runs if r.experiment in ("ladder", "token_score") and r.task == task],
        out / "grad_norm_vs_var.png",
        task,
    )
    unclipped = [r for r in runs if r.experiment == "noclip"]
    noclip_means = (
        _plot_grad_norm(out, unclipped, out / "grad_norm_vs_var_noclip.png", unclipped[0].task)
        if unclipped
        else {}
    )
    return {"groups": groups, "grad_norm": means, "grad_norm_noclip": noclip_means}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [None if not np.isfinite(v) else float(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def report(summary: dict, header: str) -> str:
    parts = [header]
    for name, g in summary["groups"].items():
        parts += [f"\n## {name}\n", table(g)]
        dt = difficulty_table(g)
        if dt:
            parts += ["\nFinal accuracy per difficulty level (mean over seeds):\n", dt]
    parts += [
        "\n## Gradient norm (before clipping) and Var(A), per learner step (mean over steps and "
        "seeds; the last task's ladder and token-score runs)\n",
        grad_norm_table(summary["grad_norm"]),
    ]
    if summary.get("grad_norm_noclip"):
        parts += [
            "\n## The same without gradient clipping (the noclip runs)\n",
            grad_norm_table(summary["grad_norm_noclip"]),
        ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tasks", nargs="+", default=["addition", "mixed"], choices=sorted(TASK_CONFIGS)
    )
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, choices=sorted(PRESETS))
    ap.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--long-seeds", type=int, default=2, help="seeds of the long runs (default 2)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--long-factor", type=float, default=2.5, help="the long runs' steps / --steps")
    ap.add_argument("--eval-n", type=int, default=16, help="samples per held-out prompt (>= 8)")
    ap.add_argument("--eval-prompts", type=int, default=500, help="held-out prompts per evaluation")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument(
        "--jobs", type=int, default=2, help="runs in parallel (each with its own thread budget)"
    )
    ap.add_argument("--out", default="bench/results/learning-full")
    ap.add_argument(
        "--summarise-only", action="store_true", help="re-read finished runs, train nothing"
    )
    ap.add_argument(
        "--fresh", action="store_true", help="train every run again, even those that finished"
    )
    ap.add_argument(
        "--set", dest="extra", action="append", default=[], help="config override for every run"
    )
    args = ap.parse_args(argv)
    if "grpo" not in args.presets:
        args.presets = ["grpo", *args.presets]  # every ratio is to GRPO
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    settings = _settings(args)

    from services.run.config import load_config
    from services.run.prepare import prepare_policy

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    if not args.summarise_only:
        # Warm starts once, before the pool shares them (the clean one only where it is used).
        starts = {(r.task, r.overrides == CLEAN) for r in runs}
        for task, clean in sorted(starts):
            ws = prepare_policy(
                load_config(TASK_CONFIGS[task], [*settings, *(CLEAN if clean else ())])
            )
            print(
                f"warm start {task}{' (clean)' if clean else ''}: {ws} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        threads = max(1, 2 // args.jobs)
        order = priority(runs, args.tasks)
        if not args.fresh:  # runs that reached their last step are kept: add presets cheaply
            kept = [r for r in order if finished(out, r)]
            order = [r for r in order if r not in kept]
            print(f"{len(kept)} finished runs kept, {len(order)} to train", flush=True)
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futs = {pool.submit(_train_one, r, str(out), threads, settings): r for r in order}
            for i, f in enumerate(futs, 1):
                f.result()
                print(
                    f"[{i}/{len(futs)}] {futs[f].name} done ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    done = [r for r in runs if finished(out, r)]
    missing = [r.name for r in runs if r not in done]
    if missing:
        print(f"{len(missing)} of {len(runs)} runs did not finish and are left out: {missing}")
    summary = summarise(out, done)
    summary["missing"] = missing
    wall = time.perf_counter() - t0
    header = (
        f"# Learning benchmark\n\nTasks {', '.join(args.tasks)}; {args.seeds} seed(s); {args.steps} steps "
        f"(long runs {round(args.long_factor * args.steps)} steps, {args.long_seeds} seed(s)); "
        f"held-out evaluation every {args.eval_every} steps on {args.eval_prompts} prompts, Pass@k from "
        f"{args.eval_n} samples per prompt at temperature 1; learner tokens = response tokens in the loss; "
        + (
            "re-summarised from finished runs."
            if args.summarise_only
            else f"wall time {wall:.0f} s."
        )
        + f" Configs: {', '.join(TASK_CONFIGS[t] for t in args.tasks)}."
    )
    text = report(summary, header)
    if missing:
        text += f"\nRuns planned but not finished (left out above): {', '.join(missing)}\n"
    print(text)
    (out / "learning.md").write_text(text)
    record = {
        "args": vars(args),
        "runs": [r.name for r in done],
        "missing": missing,
        "wall_seconds": wall,
        "groups": {
            k: {kk: vv for kk, vv in g.items() if kk != "mean_curves"}
            for k, g in summary["groups"].items()
        },
        "curves": {k: g["mean_curves"] for k, g in summary["groups"].items()},
        "grad_norm": summary["grad_norm"],
        "grad_norm_noclip": summary.get("grad_norm_noclip", {}),
    }
    (out / "learning.json").write_text(json.dumps(_jsonable(record), indent=1))
    print(f"wrote {out / 'learning.md'} and figures ({wall:.0f} s)")
    return summary


if __name__ == "__main__":
    main()

"""GRPO against D3S on a real pretrained instruct model, side by side: SmolLM2-135M-Instruct
learning small sums and one-step word problems in the asked ``#### <number>`` format
(``configs/smollm2.yaml``), or any other config of that model (``--config``; ``make bench-rg``:
reasoning-gym tasks, ``configs/smollm2_rg.yaml``).

    python -m bench.real_model [--config configs/smollm2.yaml] [--presets grpo d3s] [--seeds 2]
        [--steps 30] [--eval-every 5] [--jobs 1] [--out bench/results/real_model] [--fresh]
        [--set key=value ...]

Every run starts from the same model (``d3s prepare-model``) with the same rollout budget
(the config's prompts x samples per step) and differs only in the preset and seed.
It trains with ``d3s train`` (one process: generation and learning alternate, so learner seconds
are measured without interference from the rollouts). Every ``--eval-every`` steps the policy is
evaluated on held-out questions the training split does not contain: greedy accuracy, the
unbiased Pass@1 and Pass@k from ``eval.n_samples`` samples (at ``eval.temperature``, default the
rollout's), the format rate (samples that state an answer where the task's extractor reads it,
right or wrong: a number after ``####`` for GSM8K, an ``<answer>`` tag for reasoning-gym) and the
mean response length. When the held-out prompts come from several sources (reasoning-gym datasets,
data files: ``eval/pass@1/src:<source>`` in the metric rows), Pass@1 and greedy accuracy are also
reported per task: their curves (a table and a panel per task) and, per task, the learner tokens
to GRPO's final Pass@1 on that task.

Reported per preset (mean over seeds): those curves against step, learner tokens and learner
seconds; the training reward per step; and the learner tokens and seconds each preset needed to
reach GRPO's final and best Pass@1 (their mean curve's first evaluation at or above it), with
their ratios to GRPO's. Runs that reached their last step are kept (``--fresh`` trains all again).
Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``.
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

from services.common.metric_names import SOURCE_MARK

CONFIG = "configs/smollm2.yaml"
# The accuracy the bars are set in: Pass@1 from eval.n_samples samples per held-out prompt, as in
# bench.learning (on 32 prompts the greedy accuracy moves in steps of 1/32 and is noisier).
BAR = "eval/pass@1"
EVAL_KEYS = (
    "step",
    "heldout_accuracy",
    "eval/pass@1",
    "eval/format_rate",
    "eval/mean_response_length",
    "learner_tokens_total",
    "learner_seconds_total",
)
# What is read per source ("<name>/src:<source>" in the metric rows): the bar's metric and greedy
# accuracy.
SOURCE_KEYS = (BAR, "eval/greedy_accuracy")


def _run_dir(out: Path, preset: str, seed: int) -> Path:
    return out / "runs" / f"{preset}-s{seed}"


def _finished(run_dir: Path, steps: int) -> bool:
    from services.telemetry.run_log import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    rows = [r for r in read_metrics(path) if "heldout_accuracy" in r]
    return bool(rows) and int(rows[-1]["step"]) >= steps


def _train_one(
    config: str, preset: str, seed: int, out: str, steps: int, threads: int, sets: list[str]
) -> str:
    import shutil

    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    from services.run.config import load_config
    from services.run.trainer import SyncTrainer

    run_dir = _run_dir(Path(out), preset, seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        config,
        [
            f"algorithm.preset={preset}",
            f"train.seed={seed}",
            f"train.total_steps={steps}",
            f"train.run_dir={run_dir}",
            f"train.checkpoint_every={steps}",
            "train.resume=false",
            "train.progress_bar=false",
            *sets,
        ],
    )
    t0 = time.perf_counter()
    SyncTrainer(cfg).run()
    (run_dir / "wall_seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return str(run_dir)


# ---- reading runs back ------------------------------------------------------------------------


def _eval_curve(run_dir: Path, ks: list[int]) -> dict[str, np.ndarray]:
    """The run's evaluated metrics by step; with per-source metrics, each source's Pass@1 and
    greedy accuracy too (``eval/pass@1/src:<source>``, ``eval/greedy_accuracy/src:<source>``)."""
    from services.telemetry.run_log import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "heldout_accuracy" in r]
    keys = [*EVAL_KEYS, *(f"eval/pass@{k}" for k in ks if k != 1)]
    keys += [f"{name}{SOURCE_MARK}{src}" for src in _sources(rows) for name in SOURCE_KEYS]
    return {k: np.array([r.get(k, np.nan) for r in rows], dtype=float) for k in keys}


def _sources(rows: list[dict]) -> list[str]:
    """The sources with a Pass@1 of their own in any of ``rows``, sorted."""
    mark = BAR + SOURCE_MARK
    return sorted({k[len(mark) :] for r in rows for k in r if k.startswith(mark)})


def _curve_sources(curve: dict[str, np.ndarray]) -> list[str]:
    mark = BAR + SOURCE_MARK
    return [k[len(mark) :] for k in curve if k.startswith(mark)]


def _reward_curve(run_dir: Path) -> np.ndarray:
    from services.telemetry.run_log import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r]
    return np.array([r["reward_mean"] for r in rows], dtype=float)


def _mean(curves: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    n = min(len(c["step"]) for c in curves)
    # A source missing from one run's rows (a config changed between runs) is left out.
    keys = [k for k in curves[0] if all(k in c for c in curves)]
    return {k: np.mean([c[k][:n] for c in curves], axis=0) for k in keys}


def _first_reach(
    curve: dict[str, np.ndarray], target: float, key: str, bar: str = BAR
) -> float | None:
    hit = np.nonzero(curve[bar] >= target - 1e-9)[0]
    return float(curve[key][hit[0]]) if hit.size else None


def summarise(out: Path, presets: list[str], seeds: int, ks: list[int]) -> dict:
    curves = {p: [_eval_curve(_run_dir(out, p, s), ks) for s in range(seeds)] for p in presets}
    rewards = {p: [_reward_curve(_run_dir(out, p, s)) for s in range(seeds)] for p in presets}
    walls = {
        p: [float((_run_dir(out, p, s) / "wall_seconds").read_text()) for s in range(seeds)]
        for p in presets
    }
    mean = {p: _mean(cs) for p, cs in curves.items()}
    base = "grpo" if "grpo" in presets else presets[0]
    target = float(mean[base][BAR][-1])
    # GRPO's final accuracy can sit below its best (a run that regressed late); its best
    # evaluated accuracy is the second bar.
    best = float(np.max(mean[base][BAR]))
    rows = []
    for p in presets:
        m, cs = mean[p], curves[p]
        n = min(len(r) for r in rewards[p])
        reward = np.mean([r[:n] for r in rewards[p]], axis=0)
        head = max(1, n // 5)
        row = {
            "preset": p,
            "seeds": len(cs),
            "greedy_start": float(m["heldout_accuracy"][0]),
            "greedy_final": float(m["heldout_accuracy"][-1]),
            "greedy_final_sd": statistics.stdev([float(c["heldout_accuracy"][-1]) for c in cs])
            if len(cs) > 1
            else 0.0,
            "format_start": float(m["eval/format_rate"][0]),
            "format_final": float(m["eval/format_rate"][-1]),
            "length_start": float(m["eval/mean_response_length"][0]),
            "length_final": float(m["eval/mean_response_length"][-1]),
            "reward_first": float(reward[:head].mean()),
            "reward_last": float(reward[-head:].mean()),
            "tokens_total": float(m["learner_tokens_total"][-1]),
            "seconds_total": float(m["learner_seconds_total"][-1]),
            "wall_seconds": statistics.mean(walls[p]),
            "tokens_to_target": _first_reach(m, target, "learner_tokens_total"),
            "seconds_to_target": _first_reach(m, target, "learner_seconds_total"),
            "steps_to_target": _first_reach(m, target, "step"),
            "tokens_to_best": _first_reach(m, best, "learner_tokens_total"),
            "seconds_to_best": _first_reach(m, best, "learner_seconds_total"),
        }
        for k in ks:
            row[f"pass{k}_start"] = float(m[f"eval/pass@{k}"][0])
            row[f"pass{k}_final"] = float(m[f"eval/pass@{k}"][-1])
        rows.append(row)
    ref = rows[presets.index(base)]
    for r in rows:
        for k in (
            "tokens_to_target",
            "seconds_to_target",
            "tokens_to_best",
            "seconds_to_best",
            "tokens_total",
            "seconds_total",
        ):
            r[f"{k}_ratio"] = r[k] / ref[k] if r[k] is not None and ref.get(k) else None
    summary = {
        "base": base,
        "target_pass1": target,
        "best_pass1": best,
        "rows": rows,
        "mean_curves": mean,
        "rewards": {
            p: np.mean([r[: min(map(len, rs))] for r in rs], axis=0) for p, rs in rewards.items()
        },
    }
    sources = _curve_sources(mean[base])
    if sources:  # only then: a single-source config's summary stays as it was
        summary["tasks"] = {src: _task_summary(src, curves, mean, base) for src in sources}
    return summary


def _task_summary(
    src: str, curves: dict[str, list[dict]], mean: dict[str, dict], base: str
) -> dict:
    """One source's Pass@1 bar (GRPO's final Pass@1 on it) and, per preset, its start, final
    and the learner tokens, seconds and step of the first evaluation at or above the bar."""
    bar, greedy = f"{BAR}{SOURCE_MARK}{src}", f"eval/greedy_accuracy{SOURCE_MARK}{src}"
    target = float(mean[base][bar][-1])
    rows = []
    for p, m in mean.items():
        finals = [float(c[bar][-1]) for c in curves[p]]
        row = {
            "preset": p,
            "pass1_start": float(m[bar][0]),
            "pass1_final": float(m[bar][-1]),
            "pass1_final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "greedy_start": float(m[greedy][0]),
            "greedy_final": float(m[greedy][-1]),
            "tokens_to_target": _first_reach(m, target, "learner_tokens_total", bar),
            "seconds_to_target": _first_reach(m, target, "learner_seconds_total", bar),
            "steps_to_target": _first_reach(m, target, "step", bar),
        }
        rows.append(row)
    ref = next(r for r in rows if r["preset"] == base)
    for r in rows:
        for k in ("tokens_to_target", "seconds_to_target"):
            r[f"{k}_ratio"] = r[k] / ref[k] if r[k] is not None and ref[k] else None
    return {
        "target_pass1": target,
        # GRPO did not gain on this task: every preset "reaches" its bar at the first evaluation.
        "target_at_start": target <= float(mean[base][bar][0]) + 1e-9,
        "rows": rows,
    }


def _f(x, spec=".3f") -> str:
    # None: never reached; NaN: not measured (a task without an answer extractor reports no
    # format rate: a plug-in's, a verifier given by import path).
    return "—" if x is None or np.isnan(x) else format(x, spec)


def table(s: dict, ks: list[int]) -> str:
    passes = [k for k in ks]
    head = (
        "| preset | greedy start -> final | "
        + " | ".join(f"Pass@{k} start -> final" for k in passes)
        + " | format rate | mean length | reward first -> last 20% | learner tokens | learner s "
        "| wall s per run | tokens to GRPO's final Pass@1 (ratio) | learner s to it (ratio) "
        "| tokens to GRPO's best Pass@1 (ratio) | learner s to it (ratio) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in s["rows"]:
        lines.append(
            f"| {r['preset']} | {r['greedy_start']:.3f} -> {r['greedy_final']:.3f} "
            f"(sd {r['greedy_final_sd']:.3f}) | "
            + " | ".join(f"{r[f'pass{k}_start']:.3f} -> {r[f'pass{k}_final']:.3f}" for k in passes)
            + f" | {_f(r['format_start'], '.2f')} -> {_f(r['format_final'], '.2f')} "
            f"| {r['length_start']:.1f} -> {r['length_final']:.1f} "
            f"| {r['reward_first']:.3f} -> {r['reward_last']:.3f} "
            f"| {r['tokens_total']:,.0f} | {r['seconds_total']:.0f} | {r['wall_seconds']:.0f} "
            f"| {_f(r['tokens_to_target'], ',.0f')} ({_f(r['tokens_to_target_ratio'], '.2f')}x) "
            f"| {_f(r['seconds_to_target'], '.0f')} ({_f(r['seconds_to_target_ratio'], '.2f')}x) "
            f"| {_f(r['tokens_to_best'], ',.0f')} ({_f(r['tokens_to_best_ratio'], '.2f')}x) "
            f"| {_f(r['seconds_to_best'], '.0f')} ({_f(r['seconds_to_best_ratio'], '.2f')}x) |"
        )
    return "\n".join(lines)


def task_table(s: dict) -> str:
    """Per task and preset: the mean Pass@1 curve (a column per evaluated step), its final
    spread over seeds, greedy accuracy and what reaching GRPO's final Pass@1 on the task took."""
    steps = s["mean_curves"][s["base"]]["step"]
    head = (
        "| task | preset | "
        + " | ".join(f"step {x:.0f}" for x in steps)
        + " | final sd | greedy start -> final | tokens to GRPO's final (ratio) "
        "| learner s to it (ratio) | step |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for src, t in s["tasks"].items():
        bar = f"{BAR}{SOURCE_MARK}{src}"
        name = src + (" (GRPO no gain)" if t["target_at_start"] else "")
        for r in t["rows"]:
            curve = s["mean_curves"][r["preset"]][bar]
            cells = [f"{curve[i]:.3f}" if i < len(curve) else "—" for i in range(len(steps))]
            lines.append(
                f"| {name} | {r['preset']} | "
                + " | ".join(cells)
                + f" | {r['pass1_final_sd']:.3f} "
                f"| {r['greedy_start']:.3f} -> {r['greedy_final']:.3f} "
                f"| {_f(r['tokens_to_target'], ',.0f')} ({_f(r['tokens_to_target_ratio'], '.2f')}x) "
                f"| {_f(r['seconds_to_target'], '.0f')} "
                f"({_f(r['seconds_to_target_ratio'], '.2f')}x) "
                f"| {_f(r['steps_to_target'], '.0f')} |"
            )
    return "\n".join(lines)


def plot(s: dict, path: Path, ks: list[int], suptitle: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(ks)
    panels = [
        ("step", "heldout_accuracy", "greedy accuracy vs step"),
        ("learner_tokens_total", "heldout_accuracy", "greedy accuracy vs learner tokens"),
        ("learner_seconds_total", "heldout_accuracy", "greedy accuracy vs learner seconds"),
        ("step", f"eval/pass@{k}", f"Pass@{k} vs step"),
        ("step", "eval/format_rate", "format rate (a stated answer) vs step"),
        ("step", "eval/mean_response_length", "mean response length vs step"),
    ]
    tasks = list(s.get("tasks", {}))
    rows = 2 + -(-len(tasks) // 4)
    fig, axes = plt.subplots(rows, 4, figsize=(20, 4 * rows))
    flat = axes.ravel()
    for ax, (x, y, title) in zip(flat, panels, strict=False):
        for p, m in s["mean_curves"].items():
            ax.plot(m[x], m[y], marker="o", label=p)
        if all(np.isnan(m[y]).all() for m in s["mean_curves"].values()):
            # a task without an extractor reports no format rate: say so, not a blank panel
            ax.text(0.5, 0.5, "not reported", ha="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    ax = flat[6]
    for p, r in s["rewards"].items():
        ax.plot(np.arange(1, len(r) + 1), r, label=p, alpha=0.8)
    ax.set_title("training reward (mean over the step's samples)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    flat[7].axis("off")
    if tasks:
        # Pass@1 overall, then one panel per task: the bars the tables are set in.
        bars = [(BAR, "Pass@1, all tasks")]
        bars += [(f"{BAR}{SOURCE_MARK}{t}", f"Pass@1 on {t}") for t in tasks]
        for ax, (y, name) in zip([flat[7], *flat[8:]], bars, strict=False):
            ax.axis("on")
            for p, m in s["mean_curves"].items():
                ax.plot(m["step"], m[y], marker="o", label=p)
            ax.set_title(f"{name} vs step")
            ax.set_ylim(bottom=0)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in flat[8 + len(tasks) :]:
            ax.axis("off")
    flat[0].legend()
    fig.suptitle(suptitle or "SmolLM2-135M-Instruct, sums and one-step word problems: GRPO vs D3S")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [None if np.isnan(v) else float(v) for v in x]
    return x


def _heldout_counts(cfg) -> dict[str, int]:
    """Held-out prompts per source of ``cfg``'s task (what each task's Pass@1 is measured on)."""
    from collections import Counter

    from services.tasks.source import TaskSource

    return dict(Counter(p.source for p in TaskSource.from_config(cfg.task).heldout()))


def report(summary: dict, args: argparse.Namespace, cfg, trained: str) -> str:
    """The markdown page: the command, the bars, the overall table and, with several sources,
    the per-task one."""
    out = Path(args.out)
    cmd = (
        "python -m bench.real_model "
        + (f"--config {args.config} " if args.config != CONFIG else "")
        + f"--presets {' '.join(args.presets)} --seeds {args.seeds} "
        f"--steps {args.steps} --eval-every {args.eval_every} --jobs {args.jobs}"
        + (f" --out {args.out}" if args.config != CONFIG else "")
        + "".join(f" --set {x}" for x in args.sets)
    )
    lines = [
        "# GRPO vs D3S on SmolLM2-135M-Instruct (CPU)",
        "",
        f"`{cmd}` (config `{args.config}`; "
        + trained
        + "; each run's wall time is in the table). Means over seeds. The bars: GRPO's final Pass@1 (mean curve) "
        f"{summary['target_pass1']:.3f} and its best evaluated one "
        f"{summary['best_pass1']:.3f}; a preset reaches a bar at its mean curve's first "
        "evaluation at or above it.",
        "",
        table(summary, list(cfg.eval.ks)),
        "",
    ]
    if "tasks" in summary:
        counts = _heldout_counts(cfg)
        lines += [
            "## Pass@1 per task",
            "",
            f"Held-out prompts per task ({cfg.eval.n_samples} samples each): "
            + ", ".join(f"{t} {counts.get(t, '?')}" for t in summary["tasks"])
            + '. The bar per task is GRPO\'s final Pass@1 on it; a task marked "GRPO no gain" '
            "ended at or below its start, so every preset meets its bar at step 0.",
            "",
            task_table(summary),
            "",
        ]
    lines += [f"![curves]({out.name}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=CONFIG, help="the run config every run starts from")
    ap.add_argument("--presets", nargs="+", default=["grpo", "d3s"])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (threads split the cores)")
    ap.add_argument("--threads", type=int, default=2, help="cores on this machine")
    ap.add_argument("--out", default="bench/results/real_model")
    ap.add_argument("--fresh", action="store_true", help="train every run again")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override")
    args = ap.parse_args(argv)
    out = Path(args.out)
    sets = [f"train.eval_every={args.eval_every}", *args.sets]
    from services.run.config import load_config

    cfg = load_config(args.config, sets)
    ks = list(cfg.eval.ks)
    todo = [
        (p, s)
        for s in range(args.seeds)
        for p in args.presets
        if args.fresh or not _finished(_run_dir(out, p, s), args.steps)
    ]
    threads = max(1, args.threads // args.jobs)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(_train_one, args.config, p, s, str(out), args.steps, threads, sets)
            for p, s in todo
        ]
        for f in futures:
            print("done:", f.result(), flush=True)
    wall = time.perf_counter() - t0
    summary = summarise(out, args.presets, args.seeds, ks)
    trained = (
        f"{len(todo)} runs trained in {wall / 60:.0f} min of this invocation"
        if todo
        else "the finished runs summarised again"
    )
    text = report(summary, args, cfg, trained)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(text)
    Path(f"{out}.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    title = None
    if args.config != CONFIG:
        title = f"{Path(cfg.policy.path).name}, {cfg.name} ({args.config}): GRPO vs D3S"
    plot(summary, Path(f"{out}.png"), ks, title)
    return summary


if __name__ == "__main__":
    main()

"""Wall-clock, not only learner seconds: does the asynchronous pipeline pay, do D3S's learner
saving and the GRESO prompt prefilter's generation saving reach the user's clock?

    python -m bench.pipeline [--tasks quickstart zerovar] [--seeds 0 1 2] [--steps N] [--configs LABEL ...]
    python -m bench.pipeline --smoke          # 4 steps, seed 0, quickstart, two configurations

Runs, side by side in one invocation and seeds outermost, these configurations on each task:

    grpo sync, grpo async s1, d3s sync, d3s async s1, d3s async s2,
    d3s+prefilter sync, d3s+prefilter async s1 and s2 (``rollout.prefilter.enabled``),
    d3s+prefilter+inflight async s1 (``rollout.inflight_updates``)

("async s1": async mode, max_staleness 1). Every run is a real ``d3s run`` pipeline (Redis,
Ray actors, DeepSpeed) in this process, with one rollout actor. Tasks:

    quickstart  configs/quickstart.yaml: 3-digit addition, 32 prompts x 8 samples, 60 steps
    zerovar     configs/bench_zerovar.yaml: the same sizes on a fixed pool of 256 prompts, 2-digit
                sums (learnt) and 2-digit products (never learnt), so many groups are all right
                or all wrong and prompts recur, as the prefilter needs (bench/zerovar_data.py)

Per configuration (mean over seeds): steps/min, generated tokens and samples per learner step,
prompts prefiltered per step, share of zero-variance groups at the selector, learner and
generation busy fractions, stale fraction, final held-out (greedy) accuracy, and wall-clock
seconds and generated tokens to 99% of GRPO sync's mean final accuracy on that task (at the
first evaluation, every 5 steps, where the seeds' mean accuracy reaches it). Evaluation runs on
the learner between steps, greedy only, and wall-clock excludes it (the same fixed cost in every
configuration; while it runs the learner is paused), so no configuration has an evaluator
competing for the same two cores. Then the ratios and the issue's targets (D3S + prefilter at
most 0.35x GRPO's wall-clock to that accuracy with no loss in final accuracy; async at least
1.8x sync), each printed met or not met from the numbers.

Named only (``--configs``): ``d3s+prefilter/collective async s1`` and
``d3s+prefilter+inflight/collective async s1``, the weights broadcast into the engines, where a
publish waits for every engine and in-flight updates answer it within a decoding step.

Optional: ``--placement`` (where evaluation runs: grpo and d3s async s1 with evaluation on the
learner and in its own Ray actor, wall-clock including evaluation) and ``--actors-sweep 1 2``
(throughput against rollout actors, first seed and task). Writes pipeline.md, pipeline.json and
pipeline.png (one panel per task) under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import zerovar_data

# A target all seeds of a configuration can reach: the final accuracy itself is a noisy mean
# that about half the runs of any configuration (GRPO's own included) end below.
NEAR = 0.99
# The issue's targets (#19): D3S + prefilter's wall-clock to NEAR x GRPO's final accuracy
# against GRPO's best configuration's, and async steps/min against sync.
WALL_TARGET = 0.35
ASYNC_TARGET = 1.8


@dataclass(frozen=True)
class Task:
    """A benchmark task: its run config, and for a JSONL pool of mixed-task prompts the levels
    whose built-in warm start is its policy (``policy.path``, which the config leaves out)."""

    config: str
    warm_start_levels: tuple[int, ...] | None = None

    def overrides(self) -> list[str]:
        """Overrides every run of the task needs; builds (once, then cached) the warm start."""
        if self.warm_start_levels is None:
            return []
        import yaml

        from services.policy.config import PolicySpec, WarmstartConfig
        from services.policy.warmstart import warmstart
        from services.tasks.config import MixedTaskConfig

        # The config's own warmstart and policy sections, as a run would read them.
        data = yaml.safe_load(Path(self.config).read_text())
        path = warmstart(
            WarmstartConfig(**data.get("warmstart", {})),
            PolicySpec(**data.get("policy", {})),
            MixedTaskConfig(levels=list(self.warm_start_levels)),
        )
        return [f"policy.path={path.resolve()}"]


TASKS = {
    "quickstart": Task("configs/quickstart.yaml"),
    "zerovar": Task("configs/bench_zerovar.yaml", zerovar_data.LEVELS),
}
PREFILTER = ("rollout.prefilter.enabled=true",)
INFLIGHT = ("rollout.inflight_updates=true",)
# Weights by broadcast into the engines: the learner's publish waits until every engine took
# part, which is what in-flight updates shorten (the object store never makes it wait).
COLLECTIVE = ("weight_sync.transport=collective", "weight_sync.catchup_every=0")
# Greedy held-out accuracy is all the tables use; sampled pass@k would only lengthen the run
# (evaluation is outside the clock either way). Every 5 steps: time to a target is read off
# the evaluation points, and every 10 would round it to a sixth of the run.
GREEDY_EVAL = ("eval.n_samples=0", "eval.ks=[]", "train.eval_every=5")


@dataclass(frozen=True)
class Configuration:
    """One column of the comparison: a preset in a mode, plus config overrides.

    ``name`` labels the variant (``d3s+prefilter``); ``family`` is the variant whose sync run
    its async one is compared with (in-flight updates exist only in async mode, so
    ``d3s+prefilter+inflight`` belongs to ``d3s+prefilter``).
    """

    name: str
    family: str
    preset: str
    mode: str
    staleness: int
    overrides: tuple[str, ...] = ()
    default: bool = True  # False: run only when named with --configs

    @property
    def label(self) -> str:
        return f"{self.name} {self.mode}" + (f" s{self.staleness}" if self.mode == "async" else "")

    @property
    def slug(self) -> str:
        """The label in characters a run directory and a Redis namespace accept."""
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


def configurations() -> list[Configuration]:
    """Every configuration; those with ``default`` False run only when named."""

    def conf(
        name: str,
        preset: str,
        mode: str,
        staleness: int,
        overrides: tuple[str, ...] = (),
        default: bool = True,
    ) -> Configuration:
        family = "d3s+prefilter" if name.startswith("d3s+prefilter") else name
        return Configuration(name, family, preset, mode, staleness, overrides, default)

    confs = [
        conf("grpo", "grpo", "sync", 0),
        conf("grpo", "grpo", "async", 1),
        conf("d3s", "d3s", "sync", 0),
        conf("d3s", "d3s", "async", 1),
        conf("d3s", "d3s", "async", 2),
        conf("d3s+prefilter", "d3s", "sync", 0, PREFILTER),
        conf("d3s+prefilter", "d3s", "async", 1, PREFILTER),
        conf("d3s+prefilter", "d3s", "async", 2, PREFILTER),
        conf("d3s+prefilter+inflight", "d3s", "async", 1, PREFILTER + INFLIGHT),
        # The in-flight effect where a publish waits for the engines (--configs only).
        conf("d3s+prefilter/collective", "d3s", "async", 1, PREFILTER + COLLECTIVE, False),
        conf(
            "d3s+prefilter+inflight/collective",
            "d3s",
            "async",
            1,
            PREFILTER + INFLIGHT + COLLECTIVE,
            False,
        ),
    ]
    return confs


def run_one(
    task: Task,
    out: Path,
    conf: Configuration,
    seed: int,
    steps: int | None,
    actors: int = 1,
    eval_background: bool = False,
    greedy_eval: bool = True,
) -> dict[str, Any]:
    """One ``d3s run`` of ``conf`` on ``task``; its measurements and accuracy curve.

    ``steps``: None keeps the task config's ``train.total_steps``. ``greedy_eval``: evaluate
    greedy accuracy only (False keeps the task's sampled evaluation, what a user waits for).
    """
    import torch

    from services.run.config import load_config
    from services.run.orchestrator import run_service
    from services.telemetry.run_log import read_metrics

    torch.set_num_threads(1)
    where = "bg" if eval_background else "inline"
    stamp = int(time.time())
    run_dir = (
        out / "runs" / f"{Path(task.config).stem}-{conf.slug}-a{actors}-{where}-s{seed}-{stamp}"
    )
    overrides = [
        f"algorithm.preset={conf.preset}",
        f"service.mode={conf.mode}",
        f"service.max_staleness={conf.staleness}",
        f"train.seed={seed}",
        f"train.run_dir={run_dir}",
        f"rollout.num_actors={actors}",
        "train.progress_bar=false",
        "api.enabled=false",
        f"eval.background={str(eval_background).lower()}",
        f"service.namespace=pipe-{conf.slug}-{actors}-{seed}-{stamp}",
        *task.overrides(),
        *conf.overrides,
        *(GREEDY_EVAL if greedy_eval else ()),
    ]
    if steps is not None:
        overrides.append(f"train.total_steps={steps}")
    cfg = load_config(task.config, overrides)
    steps = cfg.train.total_steps
    summary = run_service(cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    # Inline: each evaluation paused the learner before its row was written, so it is taken out
    # of the clock. Background: the learner never waited for one; the clock is the user's.
    inline = 0.0 if eval_background else 1.0
    t0 = rows[0]["wall_time"] + inline * rows[0].get("eval_seconds", 0.0)
    eval_before = 0.0
    curve = []
    eval_steps = []  # the step of each curve point: generation to a target is counted in steps
    for r in rows[1:]:
        wall = r["wall_time"] - t0 - eval_before  # the time this row's step finished
        if "heldout_accuracy" in r:
            curve.append((wall, r["heldout_accuracy"]))
            eval_steps.append(int(r["step"]) + 1)
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
    tokens = sum(r.get("tokens_generated", 0) for r in reports)
    written = max(stats.get("groups_written", 0), 1)
    # The groups each step's selector saw, and those whose rewards were all equal (nothing to
    # learn from): with the prefilter, what is left after it.
    groups = sum(r.get("groups", 0.0) for r in rows)
    return {
        "label": conf.label,
        "name": conf.name,
        "family": conf.family,
        "preset": conf.preset,
        "mode": conf.mode,
        "staleness": conf.staleness,
        "overrides": list(conf.overrides),
        "seed": seed,
        "steps": steps,
        "actors": actors,
        "eval_background": eval_background,
        "wall_s": wall,
        "wall_with_eval_s": wall_with_eval,
        "steps_per_min": steps / wall * 60,
        "samples_per_min": samples / wall * 60,
        # Generation includes the rounds still in flight or queued when the run ended.
        "tokens_per_step": tokens / steps,
        "samples_per_step": samples / steps,
        "prefiltered_per_step": stats.get("prompts_prefiltered", 0) / steps,
        "zero_var_share": sum(r.get("groups_zero_var", 0.0) for r in rows) / max(groups, 1.0),
        "learner_busy": last["learner_seconds_total"] / wall,
        "learner_wait_s": last.get("learner_wait_seconds_total", 0.0),
        # What publishing weights cost the learner: with the collective transport it waits
        # until every engine took part, which in-flight updates answer within a decoding step.
        "publish_s_per_step": last.get("weight_sync_seconds_total", 0.0) / steps,
        "inflight_token_share": statistics.mean(r.get("inflight_token_share", 0.0) for r in rows),
        "gen_busy": gen_s / (actors * wall),
        "stale_fraction": stats.get("groups_stale", 0) / written,
        "groups_written": written,
        "final_acc": curve[-1][1] if curve else None,
        "curve": curve,
        "eval_steps": eval_steps,
    }


def _mean(rs: list[dict], key: str) -> float:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.mean(vals) if vals else float("nan")


def _mean_curve_hit(rs: list[dict], target: float) -> tuple[float, float] | None:
    """(wall s, generated tokens) at the first evaluation where the seeds' mean accuracy reaches
    ``target``: wall-clock averaged over the seeds at that point, generated tokens their mean
    tokens per step times the steps trained by then. None if the mean never reaches it.

    The mean curve, not each seed's own: a target near the final accuracy is one some seeds
    end just below, and a configuration would then have no time at all."""
    n = min(len(r["curve"]) for r in rs)
    for i in range(n):
        if statistics.mean(r["curve"][i][1] for r in rs) >= target - 1e-12:
            return (
                statistics.mean(r["curve"][i][0] for r in rs),
                statistics.mean(r["tokens_per_step"] * r["eval_steps"][i] for r in rs),
            )
    return None


def _first_wall(curve: list[tuple[float, float]], target: float) -> float | None:
    for wall, acc in curve:
        if acc >= target - 1e-12:
            return wall
    return None


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tasks",
        nargs="+",
        choices=sorted(TASKS),
        help="tasks, each a panel and a table (default: quickstart zerovar)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", help="run seeds (default: 0 1 2)")
    ap.add_argument("--steps", type=int, help="learner steps per run (default: the task config's)")
    labels = [c.label for c in configurations()]
    ap.add_argument(
        "--configs",
        nargs="+",
        metavar="LABEL",
        choices=labels,
        help="configurations by label (default: every one but the /collective pair): "
        + ", ".join(labels),
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check end to end: 4 steps, seed 0, quickstart, grpo sync and the last "
        "configuration, results under runs/bench-pipeline-smoke (each overridable)",
    )
    ap.add_argument(
        "--placement",
        action="store_true",
        help="also where evaluation runs: grpo and d3s async s1 with evaluation on the learner "
        "and in its own actor, every seed and task",
    )
    ap.add_argument(
        "--actors-sweep",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also a throughput sweep over N rollout actors (grpo and d3s async s1, first seed "
        "and task)",
    )
    ap.add_argument("--sweep-only", action="store_true", help="only the rollout-actor sweep")
    ap.add_argument(
        "--rerender", action="store_true", help="tables and figure again from --out/pipeline.json"
    )
    ap.add_argument("--out", type=Path, help="results folder (default: bench/results)")
    args = ap.parse_args(argv)
    confs = configurations()
    defaults = [c for c in confs if c.default]
    if args.smoke:
        args.steps = args.steps or 4
        args.seeds = args.seeds or [0]
        args.tasks = args.tasks or ["quickstart"]
        args.configs = args.configs or [defaults[0].label, defaults[-1].label]
        args.out = args.out or Path("runs/bench-pipeline-smoke")
    args.tasks = args.tasks or list(TASKS)
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    args.out = args.out or Path("bench/results")
    confs = [c for c in confs if c.label in args.configs] if args.configs else defaults
    logging.basicConfig(level=logging.WARNING)
    if args.rerender:
        saved = json.loads((args.out / "pipeline.json").read_text())
        if "tasks" not in saved:
            raise SystemExit(
                f"{args.out / 'pipeline.json'} predates the per-task format; run the benchmark"
            )
        return summarise(args.out, saved["tasks"], saved["seeds"], saved.get("sweep", []))
    args.out.mkdir(parents=True, exist_ok=True)
    by_label = {c.label: c for c in configurations()}
    sweep_confs = [by_label["grpo async s1"], by_label["d3s async s1"]]
    if args.sweep_only:
        return _sweep_only(args, sweep_confs)

    tasks: dict[str, dict] = {
        t: {"config": TASKS[t].config, "runs": [], "placement": []} for t in args.tasks
    }
    for seed in args.seeds:  # seeds outermost: drift on a shared machine hits every config alike
        for task, saved in tasks.items():
            for conf in confs:
                r = run_one(TASKS[task], args.out, conf, seed, args.steps)
                print(
                    f"{task}: {conf.label} seed {seed}: {r['wall_s']:.1f}s, "
                    f"{r['steps_per_min']:.1f} steps/min, {r['tokens_per_step']:.0f} tokens/step, "
                    f"acc {r['final_acc']}",
                    flush=True,
                )
                saved["runs"].append(r)
            for conf in sweep_confs if args.placement else []:
                for background in (False, True):
                    r = run_one(TASKS[task], args.out, conf, seed, args.steps, 1, background, False)
                    print(
                        f"{task}: {conf.label}, evaluation "
                        f"{'background' if background else 'inline'} seed {seed}: "
                        f"{r['wall_with_eval_s']:.1f}s with evaluation",
                        flush=True,
                    )
                    saved["placement"].append(r)
    sweep = [
        run_one(TASKS[args.tasks[0]], args.out, conf, args.seeds[0], args.steps, actors)
        for conf in sweep_confs
        for actors in args.actors_sweep
    ]
    return summarise(args.out, tasks, args.seeds, sweep)


def _table(runs: list[dict], target: float | None) -> list[dict]:
    """One row per configuration (in run order): means over seeds and wall-clock to target."""
    table = []
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        near = [_first_wall(r["curve"], NEAR * target) for r in rs] if target is not None else []
        hit = _mean_curve_hit(rs, NEAR * target) if target is not None else None
        table.append(
            {
                "label": label,
                "name": rs[0]["name"],
                "family": rs[0]["family"],
                "preset": rs[0]["preset"],
                "mode": rs[0]["mode"],
                "staleness": rs[0]["staleness"],
                "seeds": len(rs),
                **{
                    k: _mean(rs, k)
                    for k in (
                        "wall_s",
                        "steps_per_min",
                        "samples_per_min",
                        "tokens_per_step",
                        "samples_per_step",
                        "prefiltered_per_step",
                        "zero_var_share",
                        "learner_busy",
                        "gen_busy",
                        "stale_fraction",
                        "publish_s_per_step",
                        "inflight_token_share",
                        "final_acc",
                    )
                },
                "final_acc_sd": statistics.stdev([r["final_acc"] for r in rs])
                if len(rs) > 1
                else 0.0,
                "wall_to_near": None if hit is None else hit[0],
                "reached_near": sum(x is not None for x in near),
                "tokens_to_near": None if hit is None else hit[1],
            }
        )
    return table


def _best(table: list[dict], family: str) -> dict | None:
    """The family's configuration fastest to NEAR x target (on its seeds' mean curve)."""
    rows = [r for r in table if r["family"] == family and r["wall_to_near"] is not None]
    return min(rows, key=lambda r: r["wall_to_near"], default=None)


def _task_section(name: str, saved: dict, seeds: list[int]) -> tuple[list[str], dict]:
    """The markdown of one task (tables, ratios, targets) and its summary for the JSON."""
    runs = saved["runs"]
    grpo_sync = [r for r in runs if r["label"] == "grpo sync"]
    target = _mean(grpo_sync, "final_acc") if grpo_sync else None
    table = _table(runs, target)
    by = {row["label"]: row for row in table}
    steps = sorted({r["steps"] for r in runs})
    lines = [
        f"## {name} (`{saved['config']}`)",
        "",
        f"{'/'.join(map(str, steps))} steps, seeds {seeds}.",
        "",
    ]
    plain = [r for r in runs if r["family"] != "d3s+prefilter"]
    filtered = [r for r in runs if r["family"] == "d3s+prefilter"]
    if plain:
        lines.append(
            f"Groups with zero reward variance at the selector: {_mean(plain, 'zero_var_share'):.1%} "
            "without the prefilter (mean over the runs without it)"
            + (f", {_mean(filtered, 'zero_var_share'):.1%} with it." if filtered else ".")
        )
        lines.append("")
    if target is not None:
        lines += [
            f"Target accuracy: GRPO sync's mean final held-out accuracy, {target:.3f}; "
            f"{NEAR:.0%} of it: {NEAR * target:.3f}.",
            "",
        ]
    best_grpo = _best(table, "grpo")
    lines += [
        "| config | steps/min | gen tokens/step | samples gen/step | prefiltered/step | "
        "zero-var groups | learner busy | generation busy | stale | final acc | "
        f"wall s to {NEAR:.0%} (mean curve; seeds reaching alone) | x GRPO's best | "
        f"gen tokens to {NEAR:.0%} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        rel = (
            row["wall_to_near"] / best_grpo["wall_to_near"]
            if best_grpo and row["wall_to_near"] is not None
            else None
        )
        lines.append(
            f"| {row['label']} | {row['steps_per_min']:.1f} | {row['tokens_per_step']:.0f} | "
            f"{row['samples_per_step']:.0f} | {row['prefiltered_per_step']:.1f} | "
            f"{row['zero_var_share']:.1%} | {row['learner_busy']:.2f} | {row['gen_busy']:.2f} | "
            f"{row['stale_fraction']:.1%} | {row['final_acc']:.3f} ± {row['final_acc_sd']:.3f} | "
            f"{_fmt(row['wall_to_near'])} ({row['reached_near']}/{row['seeds']}) | "
            f"{_fmt(rel, '.2f')} | {_fmt(row['tokens_to_near'], '.0f')} |"
        )
    published = [row for row in table if not np.isnan(row["publish_s_per_step"])]
    if published:
        lines += [
            "",
            "| config | learner s publishing weights per step | tokens sampled by a newer "
            "version than their group's first |",
            "|---|---|---|",
        ]
        lines += [
            f"| {row['label']} | {row['publish_s_per_step']:.3f} | "
            f"{row['inflight_token_share']:.1%} |"
            for row in published
        ]
    lines += ["", "Ratios (same run, same machine):", ""]
    if best_grpo:
        lines.append(
            f"- wall-clock to {NEAR:.0%} of the target against GRPO's best configuration "
            f"({best_grpo['label']}, {best_grpo['wall_to_near']:.1f} s): the last column above"
        )
    for sync in (r for r in table if r["mode"] == "sync"):
        for asy in (r for r in table if r["family"] == sync["family"] and r["mode"] == "async"):
            lines.append(
                f"- {asy['label']}: {asy['steps_per_min'] / sync['steps_per_min']:.2f}x the "
                f"steps/min of {sync['label']}"
            )
    for mode in dict.fromkeys(r["label"].split(" ", 1)[1] for r in table):
        mine = by.get(f"d3s+prefilter {mode}")
        others = [by.get(f"{other} {mode}") for other in ("d3s", "grpo")]
        parts = [
            f"{mine['tokens_per_step'] / o['tokens_per_step']:.2f}x {o['name']}'s"
            for o in others
            if mine and o
        ]
        if parts:
            lines.append(
                f"- generated tokens per learner step, d3s+prefilter {mode}: {', '.join(parts)}"
            )
    fewest = {
        fam: min(
            (r for r in table if r["family"] == fam and r["tokens_to_near"] is not None),
            key=lambda r: r["tokens_to_near"],
            default=None,
        )
        for fam in ("d3s+prefilter", "d3s", "grpo")
    }
    if all(fewest.values()):
        pf, d3s, grpo_few = fewest["d3s+prefilter"], fewest["d3s"], fewest["grpo"]
        lines.append(
            f"- generated tokens to {NEAR:.0%} of the target, fewest of each family: "
            f"{pf['label']} {pf['tokens_to_near']:.0f} = "
            f"{pf['tokens_to_near'] / d3s['tokens_to_near']:.2f}x {d3s['label']}'s, "
            f"{pf['tokens_to_near'] / grpo_few['tokens_to_near']:.2f}x {grpo_few['label']}'s"
        )
    lines += ["", "Targets:", ""]
    targets: dict[str, Any] = {}
    best_pf = _best(table, "d3s+prefilter")
    if best_grpo and best_pf:
        ratio = best_pf["wall_to_near"] / best_grpo["wall_to_near"]
        # "No loss": the mean final accuracy is below GRPO's by no more than the seeds spread
        # either one (the larger standard deviation).
        grpo = by["grpo sync"]
        slack = max(grpo["final_acc_sd"], best_pf["final_acc_sd"])
        no_loss = best_pf["final_acc"] >= grpo["final_acc"] - slack
        targets["wall"] = {"ratio": ratio, "met": ratio <= WALL_TARGET, "no_loss": no_loss}
        lines.append(
            f"- D3S + prefilter at most {WALL_TARGET}x GRPO's wall-clock to {NEAR:.0%} of its "
            f"final accuracy: {best_pf['label']} {best_pf['wall_to_near']:.1f} s vs "
            f"{best_grpo['label']} {best_grpo['wall_to_near']:.1f} s = **{ratio:.2f}x**, "
            f"{_met(ratio <= WALL_TARGET)}; final accuracy {best_pf['final_acc']:.3f} vs GRPO "
            f"sync's {grpo['final_acc']:.3f} (no loss: at most one seed sd, {slack:.3f}, "
            f"below), {_met(no_loss)}"
        )
    elif target is None:
        lines.append("- no grpo sync runs, so no target accuracy")
    else:
        lines.append(
            f"- D3S + prefilter at most {WALL_TARGET}x GRPO's wall-clock: not measurable "
            f"(the seed-mean curve of no grpo or no d3s+prefilter configuration reached {NEAR:.0%})"
        )
    for family in ("d3s", "d3s+prefilter"):
        sync = by.get(f"{family} sync")
        fastest = max(
            (r for r in table if r["family"] == family and r["mode"] == "async"),
            key=lambda r: r["steps_per_min"],
            default=None,
        )
        if sync and fastest:
            ratio = fastest["steps_per_min"] / sync["steps_per_min"]
            targets[f"async {family}"] = {"ratio": ratio, "met": ratio >= ASYNC_TARGET}
            lines.append(
                f"- {family}: async at least {ASYNC_TARGET}x sync in steps/min: "
                f"{fastest['label']} {ratio:.2f}x, {_met(ratio >= ASYNC_TARGET)}"
            )
    if saved.get("placement"):
        lines += [
            "",
            "### Where evaluation runs (sampled as the task config says; wall-clock includes it)",
            "",
        ]
        lines += _placement_table(saved["placement"])
    lines.append("")
    return lines, {"table": table, "target": target, "targets": targets}


def _placement_table(placement: list[dict]) -> list[str]:
    """Markdown rows of the evaluation-placement runs, with their header."""
    lines = [
        "| config | evaluation | wall s with evaluation | steps/min with evaluation | final acc |",
        "|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["label"] for r in placement):
        for background in (False, True):
            rs = [
                r for r in placement if r["label"] == label and r["eval_background"] == background
            ]
            if not rs:
                continue
            w = _mean(rs, "wall_with_eval_s")
            lines.append(
                f"| {label} | {'own actor' if background else 'on the learner'} | {w:.1f} | "
                f"{rs[0]['steps'] / w * 60:.1f} | {_mean(rs, 'final_acc'):.3f} |"
            )
    return lines


def summarise(out: Path, tasks: dict[str, dict], seeds: list[int], sweep: list[dict]) -> dict:
    """Tables, figure and JSON of the runs (``--rerender`` calls it on a saved pipeline.json).

    ``tasks``: per task name, its ``config`` path, ``runs`` and ``placement`` (run_one's dicts).
    """
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Pipeline benchmark ({time.strftime('%Y-%m-%d')})",
        "",
        "One rollout actor unless said; wall-clock excludes held-out evaluations (greedy, on the "
        "learner between steps); 2-core shared CPU. Means over seeds; generated tokens and "
        "samples count every rollout round, those still queued at the end included; "
        "zero-var groups: share of the groups each step's selector saw whose rewards were all "
        "equal.",
        "",
    ]
    summaries = {}
    for name, saved in tasks.items():
        section, summaries[name] = _task_section(name, saved, seeds)
        lines += section
    if sweep:
        lines += ["## Throughput against rollout actors (async, max_staleness 1)", ""]
        lines += _sweep_table(sweep)
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "pipeline.md").write_text(text)
    (out / "pipeline.json").write_text(
        json.dumps(
            {
                "seeds": seeds,
                "tasks": {n: {**saved, **summaries[n]} for n, saved in tasks.items()},
                "sweep": sweep,
            },
            indent=1,
            default=float,
        )
    )
    _plot(tasks, summaries, out / "pipeline.png")
    return {"tasks": summaries, "sweep": sweep}


def _sweep_table(sweep: list[dict]) -> list[str]:
    """Markdown rows of the rollout-actor sweep, with their header."""
    lines = [
        "| config | actors | steps/min | samples gen/min | learner busy | generation busy | stale |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sweep:
        lines.append(
            f"| {r['label']} | {r['actors']} | {r['steps_per_min']:.1f} | "
            f"{r['samples_per_min']:.0f} | {r['learner_busy']:.2f} | {r['gen_busy']:.2f} | "
            f"{r['stale_fraction']:.1%} |"
        )
    return lines


def _sweep_only(args: argparse.Namespace, confs: list[Configuration]) -> dict:
    """The rollout-actor sweep alone (first seed and task)."""
    task = TASKS[args.tasks[0]]
    sweep = [
        run_one(task, args.out, conf, args.seeds[0], args.steps, actors)
        for conf in confs
        for actors in args.actors_sweep or [1, 2]
    ]
    lines = [
        f"# Throughput against rollout actors ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{task.config}`, {sweep[0]['steps']} steps, seed {args.seeds[0]}; "
        "2-core CPU: every actor, the learner, the selector and Redis share 2 cores.",
        "",
    ]
    lines += _sweep_table(sweep)
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "pipeline_actors.md").write_text(text)
    (args.out / "pipeline_actors.json").write_text(json.dumps(sweep, indent=1, default=float))
    return {"sweep": sweep}


def _plot(tasks: dict[str, dict], summaries: dict[str, dict], path: Path) -> None:
    """Mean held-out accuracy against wall-clock, one panel per task, 99% target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    for ax, (name, saved) in zip(axes[0], tasks.items(), strict=True):
        for label in dict.fromkeys(r["label"] for r in saved["runs"]):
            rs = [r for r in saved["runs"] if r["label"] == label and r["curve"]]
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            wall = np.mean([[w for w, _ in r["curve"][:n]] for r in rs], axis=0)
            acc = np.mean([[a for _, a in r["curve"][:n]] for r in rs], axis=0)
            ax.plot(wall, acc, marker="o", label=label, linewidth=2.2 if "d3s" in label else 1.2)
        target = summaries[name]["target"]
        if target is not None:
            ax.axhline(
                NEAR * target,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"{NEAR:.0%} of grpo sync's final",
            )
        ax.set_title(f"{name} ({saved['config']})")
        ax.set_xlabel("wall-clock seconds (evaluations excluded)")
        ax.set_ylabel("held-out accuracy")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

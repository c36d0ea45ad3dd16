"""The pipeline on a real model: wall-clock and generated tokens to GRPO's accuracy on SmolLM2,
with vLLM engines and the collective weight transport (issue 29, part 4).

    .venv-vllm/bin/python -m bench.real_pipeline [--seeds 0 1] [--lockstep-seeds 0]
        [--configs LABEL ...] [--out bench/results/real_pipeline] [--fresh] [--set key=value]
    .venv-vllm/bin/python -m bench.real_pipeline --short     # 2 steps, 1 seed: the pieces run

Configurations, side by side in one invocation (seeds outermost), every one ``configs/smollm2.yaml``
with ``rollout.engine: vllm`` (eager), ``learner.packing: true`` and only these changed:

    grpo, d3s                         d3s run, asynchronous (max_staleness 1), weights over
                                      weight_sync.transport: collective
    d3s+ds                            + algorithm.dynamic_sampling (batches of groups with
                                      reward variance, max_draws_factor 16)
    d3s+ds+prefilter                  + rollout.prefilter (GRESO: skip prompts whose last groups
                                      were all right or all wrong)
    grpo lock-step, d3s lock-step     d3s train (rollout, selection, learner in turn, one process)

Each run is a process of its own under the vLLM venv (Ray and vLLM start clean), in
``--runs`` (default ``runs/real_pipeline``; checkpoints and the exported policy are deleted once
it finished, its metrics kept); finished runs are kept and skipped (``--fresh`` trains all
again).

Sizing (``DEFAULT``, 67 min measured on the 2-core box; the arithmetic and the measured times
are in docs/benchmarks.md):
6 learner steps, evaluation at step 0 and every 2 steps on 48 held-out prompts (the task's test
file, never trained on) x 2 sampled answers for Pass@1, greedy off; lock-step rows one seed.
Training draws from a pool of the first 32 training prompts, so that prompts recur within the
run and the prefilter has a history to act on (the same pool in every configuration).

Reading: the target is GRPO's (asynchronous) final Pass@1, the last point of its mean curve
over seeds. Each configuration's mean curve (Pass@1 averaged over seeds at each evaluation)
is read where it first reaches the target: the mean wall-clock (seconds since the run's first
row; lock-step rows without their evaluations, which pause training there) and the mean
generated tokens (summed from each step's draws) at that evaluation. Every run starts from the
same weights and evaluates them at step 0 with the same sampling seed, so all curves share
their first point; a target above it cannot be reached at the first evaluation, and when
GRPO ends at or below it there is no target and the table says so. Also per configuration:
final Pass@1, run wall-clock, generated tokens per kept group (the step's generated tokens over
the groups its batch used), generated tokens per group with reward variance, draws per step,
and the learner's padded token share. Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "configs/smollm2.yaml"
TRAIN_FILE = Path("bench/data/sums/train.jsonl")
RESULTS = "bench/results/real_pipeline"


@dataclass(frozen=True)
class Size:
    steps: int
    eval_every: int
    heldout: int
    n_samples: int
    pool: int


DEFAULT = Size(steps=6, eval_every=2, heldout=48, n_samples=2, pool=32)
SHORT = Size(steps=2, eval_every=1, heldout=8, n_samples=2, pool=32)

# At SmolLM2's start about 1 group in 9 has reward variance on this pool (6 of the first 56 a
# d3s+ds run drew), so a batch of 8 takes about 75 draws: factor 8 (64) stopped that run at
# step 0 with DynamicSamplingExhausted; 16 leaves room.
DS = ["algorithm.dynamic_sampling.enabled=true", "algorithm.dynamic_sampling.max_draws_factor=16"]
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "grpo": ("async", ["algorithm.preset=grpo"]),
    "d3s": ("async", ["algorithm.preset=d3s"]),
    "d3s+ds": ("async", ["algorithm.preset=d3s", *DS]),
    "d3s+ds+prefilter": ("async", ["algorithm.preset=d3s", *DS, "rollout.prefilter.enabled=true"]),
    "grpo lock-step": ("sync", ["algorithm.preset=grpo"]),
    "d3s lock-step": ("sync", ["algorithm.preset=d3s"]),
}
BASELINE = "grpo"


def slug(label: str) -> str:
    return label.replace(" ", "_").replace("+", "_")


def run_dir(runs: Path, label: str, seed: int) -> Path:
    return runs / f"{slug(label)}-s{seed}"


def overrides(label: str, seed: int, rdir: Path, size: Size, pool_file: Path) -> list[str]:
    mode, own = CONFIGS[label]
    common = [
        "rollout.engine=vllm",
        "rollout.vllm.enforce_eager=true",  # no CUDA-graph capture to wait for on CPU
        "learner.packing=true",
        f"task.train_path={pool_file}",
        f"task.heldout_size={size.heldout}",
        f"eval.n_samples={size.n_samples}",
        "eval.ks=[1]",
        "eval.greedy=false",
        f"train.total_steps={size.steps}",
        f"train.eval_every={size.eval_every}",
        "train.checkpoint_every=1000000",  # the benchmark reads metrics only
        f"train.seed={seed}",
        f"train.run_dir={rdir}",
        "train.progress_bar=false",
        "api.enabled=false",
        "service.wait_timeout_s=1200",  # a vLLM engine starting on a busy 2-core box
        f"service.namespace=rp-{slug(label)}-{seed}",
    ]
    if mode == "sync":
        common += ["service.mode=sync"]  # d3s train is lock-step whatever it says; the record
    if mode == "async":
        # where a late-joining engine would load the current version
        common += ["service.mode=async", "weight_sync.transport=collective"]
        common += [f"weight_sync.path={rdir / 'weights'}"]
    return common + own


def write_pool(out: Path, n: int) -> Path:
    """The first ``n`` training prompts, the pool every run trains on."""
    path = out / f"train_pool_{n}.jsonl"  # out: the runs directory
    lines = TRAIN_FILE.read_text().splitlines()[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def train_one(label: str, seed: int, runs: Path, size: Size, sets: list[str]) -> None:
    """One run in this process; its wall-clock and the service's counters to ``bench_run.json``."""
    import shutil

    from services.run.config import load_config

    rdir = run_dir(runs, label, seed)
    shutil.rmtree(rdir, ignore_errors=True)
    pool = write_pool(runs, size.pool)
    cfg = load_config(CONFIG, overrides(label, seed, rdir, size, pool) + sets)
    t0 = time.perf_counter()
    if CONFIGS[label][0] == "async":
        from services.run.orchestrator import run_service

        summary = run_service(cfg, rdir)
    else:
        from services.run.trainer import SyncTrainer

        summary = SyncTrainer(cfg).run()
    counters = summary.get("counters", {}) if isinstance(summary, dict) else {}
    record = {"wall_s": time.perf_counter() - t0, "counters": counters}
    (rdir / "bench_run.json").write_text(json.dumps(record, default=str))
    for heavy in ("checkpoints", "final_policy"):  # GBs per run; the benchmark reads metrics
        shutil.rmtree(rdir / heavy, ignore_errors=True)


# ---- reading runs back (pure: tested on synthetic metrics) -------------------------------------


def _step_tokens(r: dict) -> float | None:
    """Generated tokens of one step's draws: tokens per kept group x the groups kept."""
    if "gen_tokens_per_kept_group" not in r or "groups_generated" not in r:
        return None
    kept = (
        r["groups_generated"]
        - r.get("groups_zero_var_dropped", 0.0)
        - r.get("groups_surplus_dropped", 0.0)
    )
    return r["gen_tokens_per_kept_group"] * kept


def read_rows(rows: list[dict], steps: int, lockstep: bool) -> dict | None:
    """A run's curve and statistics from its metrics rows (``read_metrics``: evaluation rows
    merged into their step's), or None when it has no evaluation at ``steps``.

    Curve points: (step, wall s, Pass@1, generated tokens so far) at each evaluation, wall-clock
    and tokens as of the end of that step. Lock-step: evaluations ran inline, paused training,
    and are taken out of the clock.
    """
    if not rows or "wall_time" not in rows[0]:
        return None
    t0 = rows[0]["wall_time"]
    evals = {
        int(r.get("eval_step", r["step"])): r["eval/pass@1"] for r in rows if "eval/pass@1" in r
    }
    if steps not in evals:
        return None
    wall, tokens, paused = {0: 0.0}, {0: 0.0}, 0.0
    if lockstep:
        paused += rows[0].get("eval_seconds", 0.0)
    gen, kept_groups, var_groups, draws, padded = 0.0, 0.0, 0.0, [], []
    for r in rows[1:]:
        s = int(r["step"])
        wall[s] = r["wall_time"] - t0 - paused
        t = _step_tokens(r)
        if t is not None:
            gen += t
            kept_groups += r["groups_generated"] - r.get("groups_zero_var_dropped", 0.0)
            kept_groups -= r.get("groups_surplus_dropped", 0.0)
            draws.append(r.get("draws_per_step", float("nan")))
        var_groups += r.get("groups", 0.0) - r.get("groups_zero_var", 0.0)
        tokens[s] = gen
        if "padded_token_share" in r:
            padded.append(r["padded_token_share"])
        if lockstep:
            paused += r.get("eval_seconds", 0.0)
    have_tokens = kept_groups > 0
    curve = [
        (s, wall[s], p, tokens[s] if have_tokens else None)
        for s, p in sorted(evals.items())
        if s in wall
    ]
    return {
        "curve": curve,
        "final_pass1": evals[steps],
        "wall_s": wall.get(steps),
        "gen_tokens": gen if have_tokens else None,
        "tokens_per_kept_group": gen / kept_groups if have_tokens else None,
        "tokens_per_var_group": gen / var_groups if have_tokens and var_groups > 0 else None,
        "draws_per_step": statistics.fmean(draws) if draws else None,
        "padded_token_share": statistics.fmean(padded) if padded else None,
    }


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def mean_curve(runs: list[dict]) -> list[tuple[int, float, float, float | None]]:
    """(step, mean wall, mean Pass@1, mean tokens) at the evaluation steps every run has."""
    steps = sorted(set.intersection(*(set(p[0] for p in r["curve"]) for r in runs)))
    out = []
    for s in steps:
        pts = [next(p for p in r["curve"] if p[0] == s) for r in runs]
        out.append(
            (
                s,
                statistics.fmean(p[1] for p in pts),
                statistics.fmean(p[2] for p in pts),
                _mean([p[3] for p in pts]),
            )
        )
    return out


def first_reach(curve: list[tuple], target: float) -> tuple | None:
    """The first point of ``curve`` whose Pass@1 reaches ``target`` (None: never)."""
    return next((p for p in curve if p[2] >= target - 1e-12), None)


def summarise(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Per configuration: means over seeds, its mean curve, and where it first reaches the
    target (GRPO's final mean Pass@1; None when GRPO did not end above the shared start)."""
    curves = {label: mean_curve(rs) for label, rs in runs.items() if rs}
    base = curves.get(BASELINE)
    target = base[-1][2] if base else None
    if target is not None and target <= base[0][2] + 1e-12:
        target = None  # GRPO ended at or below the start: nothing to reach
    out: dict[str, Any] = {"target": target, "configs": {}}
    for label, rs in runs.items():
        if not rs:
            continue
        hit = first_reach(curves[label], target) if target is not None else None
        row = {
            "seeds": len(rs),
            "curve": curves[label],
            "final_pass1": _mean([r["final_pass1"] for r in rs]),
            "wall_s": _mean([r["wall_s"] for r in rs]),
            "reach_step": hit[0] if hit else None,
            "wall_to_target_s": hit[1] if hit else None,
            "tokens_to_target": hit[3] if hit else None,
        }
        for k in ("tokens_per_kept_group", "tokens_per_var_group", "draws_per_step"):
            row[k] = _mean([r[k] for r in rs])
        row["padded_token_share"] = _mean([r["padded_token_share"] for r in rs])
        out["configs"][label] = row
    base_row = out["configs"].get(BASELINE, {})
    for row in out["configs"].values():
        for k in ("wall_to_target_s", "tokens_to_target"):
            b = base_row.get(k)
            row[k + "_vs_grpo"] = row[k] / b if row[k] is not None and b else None
    return out


def _f(x, spec: str = ".0f") -> str:
    return "—" if x is None else format(x, spec)


def table(s: dict) -> str:
    target = s["target"]
    lines = [
        (
            f"Target: GRPO's final Pass@1 (mean curve), {target:.3f}."
            if target is not None
            else "Target: none (GRPO's final Pass@1 is not above the shared start)."
        ),
        "",
        "| configuration | seeds | final Pass@1 | wall s | wall s to target | x GRPO | "
        "gen. tokens to target | x GRPO | gen. tokens / kept group | / group with variance | "
        "draws / step | padded share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in s["configs"].items():
        lines.append(
            f"| {label} | {r['seeds']} | {_f(r['final_pass1'], '.3f')} | {_f(r['wall_s'])} | "
            f"{_f(r['wall_to_target_s'])} | {_f(r['wall_to_target_s_vs_grpo'], '.2f')} | "
            f"{_f(r['tokens_to_target'])} | {_f(r['tokens_to_target_vs_grpo'], '.2f')} | "
            f"{_f(r['tokens_per_kept_group'])} | {_f(r['tokens_per_var_group'])} | "
            f"{_f(r['draws_per_step'], '.2f')} | {_f(r['padded_token_share'], '.3f')} |"
        )
    return "\n".join(lines)


def targets(s: dict) -> list[str]:
    """The issue's targets, each met or not from the numbers (— where a number is missing)."""
    c = s["configs"]

    def verdict(ok: bool | None) -> str:
        return "—" if ok is None else ("**met**" if ok else "**not met**")

    d3s = c.get("d3s", {}).get("wall_to_target_s_vs_grpo")
    ds = c.get("d3s+ds", {}).get("tokens_per_kept_group")
    pf = c.get("d3s+ds+prefilter", {}).get("tokens_per_kept_group")
    shares = [r["padded_token_share"] for r in c.values() if r["padded_token_share"] is not None]
    return [
        f"- D3S at most 0.5x GRPO's wall-clock to the target: {_f(d3s, '.2f')}x "
        f"{verdict(None if d3s is None else d3s <= 0.5)}",
        f"- dynamic sampling + prefilter at least 1.5x fewer generated tokens per kept group "
        f"than dynamic sampling alone: {_f(ds / pf if ds and pf else None, '.2f')}x "
        f"{verdict(None if not (ds and pf) else ds / pf >= 1.5)}",
        f"- padded tokens under 10% of the learner's forward tokens: at most "
        f"{_f(max(shares) if shares else None, '.3f')} "
        f"{verdict(None if not shares else max(shares) < 0.1)}",
    ]


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in s["configs"].items():
        style = "--" if "lock-step" in label else "-"
        _, walls, acc, toks = zip(*r["curve"], strict=True)
        axes[0].plot(walls, acc, style, marker="o", label=label)
        if all(t is not None for t in toks):
            axes[1].plot(toks, acc, style, marker="o", label=label)
    for ax, xlabel in zip(axes, ("wall-clock s", "generated tokens"), strict=True):
        if s["target"] is not None:
            ax.axhline(s["target"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out Pass@1 (mean over seeds)")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, vLLM engines: Pass@1 against wall-clock and generation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the invocation ---------------------------------------------------------------------------


def read_run(rdir: Path, label: str, size: Size) -> dict | None:
    from services.telemetry.run_log import read_metrics

    path = rdir / "metrics.jsonl"
    if not path.exists():
        return None
    return read_rows(read_metrics(path), size.steps, CONFIGS[label][0] == "sync")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--lockstep-seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--short", action="store_true", help="2 steps, seed 0: the pieces run")
    ap.add_argument("--out", default=None, help=f"results base name (default: {RESULTS})")
    ap.add_argument("--runs", default=None, help="run directories (default: runs/real_pipeline)")
    ap.add_argument("--fresh", action="store_true", help="train every run again")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override")
    ap.add_argument("--one", nargs=2, metavar=("LABEL", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    size = SHORT if args.short else DEFAULT
    short = "_short" if args.short else ""
    runs_dir = Path(args.runs or f"runs/real_pipeline{short}")
    # a --short check's results stay beside its runs, out of bench/results
    out = Path(args.out or (runs_dir / "results" if args.short else RESULTS))
    if args.one:
        train_one(args.one[0], int(args.one[1]), runs_dir, size, args.sets)
        return {}
    seeds = [0] if args.short else args.seeds
    lock_seeds = [0] if args.short else args.lockstep_seeds
    runs: dict[str, list[dict]] = {label: [] for label in args.configs}
    failed: list[str] = []
    for seed in sorted(set(seeds) | set(lock_seeds)):
        for label in args.configs:
            if seed not in (lock_seeds if "lock-step" in label else seeds):
                continue
            rdir = run_dir(runs_dir, label, seed)
            if args.fresh or read_run(rdir, label, size) is None:
                cmd = [sys.executable, "-m", "bench.real_pipeline", "--one", label, str(seed)]
                cmd += ["--runs", str(runs_dir), *(["--short"] if args.short else [])]
                cmd += [a for s in args.sets for a in ("--set", s)]
                t0 = time.perf_counter()
                rc = subprocess.run(cmd).returncode
                print(
                    f"{label} seed {seed}: {time.perf_counter() - t0:.0f} s, exit {rc}", flush=True
                )
            result = read_run(rdir, label, size)
            if result is None:  # e.g. dynamic sampling past its bound: reported, not fatal
                failed.append(f"{label} seed {seed} (see {rdir}/logs)")
                continue
            runs[label].append(result)
    s = summarise(runs)
    text = "\n".join(
        [
            "# The pipeline on SmolLM2-135M-Instruct with vLLM engines",
            "",
            f"`python -m bench.real_pipeline{' --short' if args.short else ''}` "
            f"(config `{CONFIG}`; {size.steps} steps, evaluation every {size.eval_every} and at "
            f"step 0 on {size.heldout} held-out prompts x {size.n_samples} samples; "
            f"a pool of {size.pool} training prompts; seeds {seeds}, lock-step {lock_seeds}).",
            "",
            table(s),
            "",
            *targets(s),
            "",
            *([f"Runs that did not finish: {', '.join(failed)}.", ""] if failed else []),
        ]
    )
    print(text)
    Path(f"{out}.md").parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(text)
    record = {"size": size.__dict__, "failed": failed, **s}
    Path(f"{out}.json").write_text(json.dumps(record, indent=1))
    plot(s, Path(f"{out}.png"))
    return s


if __name__ == "__main__":
    main()

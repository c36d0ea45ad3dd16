"""Does quickstart RL learn from every warm start, not only from seed 0? GRPO and D3S side by side.

    python -m bench.start_seeds [--seeds 0 1 2 3 4] [--presets grpo d3s] [--steps 60]
        [--jobs 1] [--out bench/results/start_seeds]

For each warm-start seed, the quickstart config (``configs/quickstart.yaml``) trains from that
seed's warm start (the one shipped with the package where one ships, so every machine starts
from the same weights) with each preset, lock-step (``d3s train``: the same computation as the
asynchronous run without its timing noise), evaluated greedily on the held-out prompts every
``--eval-every`` steps. Writes ``start_seeds.md`` (per seed: step-0 and final held-out greedy
accuracy, the gain, the training reward every 10 steps), ``start_seeds.json`` and
``start_seeds.png`` (reward and accuracy curves).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CONFIG = "configs/quickstart.yaml"
TARGET_GAIN = 0.40


@dataclass(frozen=True)
class Run:
    start_seed: int
    preset: str
    steps: int

    @property
    def name(self) -> str:
        return f"start{self.start_seed}-{self.preset}"


def _overrides(run: Run, run_dir: Path, eval_every: int) -> list[str]:
    return [
        f"warmstart.seed={run.start_seed}",
        f"algorithm.preset={run.preset}",
        f"train.total_steps={run.steps}",
        f"train.eval_every={eval_every}",
        f"train.checkpoint_every={run.steps}",
        f"train.run_dir={run_dir}",
        "train.resume=false",
        "train.progress_bar=false",
        "service.mode=sync",
        "api.enabled=false",
    ]


def _train_one(run: Run, out: str, eval_every: int, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    from services.run.config import load_config
    from services.run.trainer import SyncTrainer

    run_dir = Path(out) / "runs" / run.name
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    SyncTrainer(load_config(CONFIG, _overrides(run, run_dir, eval_every))).run()
    return str(run_dir / "metrics.jsonl")


def _read(path: Path) -> dict:
    from services.telemetry.run_log import read_metrics

    rows = read_metrics(path)
    evals = [(r["step"], r["heldout_accuracy"]) for r in rows if "heldout_accuracy" in r]
    rewards = [(r["step"], r["reward_mean"]) for r in rows if "reward_mean" in r]
    return {"evals": evals, "rewards": rewards}


def _cpu() -> str:
    """The CPU's model name and the vector extensions its kernels can use."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    name = next(
        (x.split(":", 1)[1].strip() for x in text.splitlines() if x.startswith("model name")),
        "unknown CPU",
    )
    flags = set(next((x for x in text.splitlines() if x.startswith("flags")), "").split())
    ext = [
        n for f, n in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX")) if f in flags
    ]
    return f"{name} ({', '.join(ext)})" if ext else name


def _starts(seeds: list[int]) -> list[dict]:
    """What each seed's warm start is: the attempt and step it stopped at, and its probe."""
    from services.policy.warmstart import METADATA_FILE, warmstart
    from services.run.config import load_config

    out = []
    for seed in seeds:
        cfg = load_config(CONFIG, [f"warmstart.seed={seed}"])
        path = warmstart(cfg.warmstart, cfg.policy.spec(), cfg.task)
        meta = json.loads((path / METADATA_FILE).read_text())
        probe = meta.get("probe") or {}
        out.append(
            {
                "start_seed": seed,
                "shipped": path.parent.name == "starts",
                "attempt": meta.get("attempt"),
                "steps": meta.get("steps_run"),
                "dev_sample_accuracy": probe.get("sample_accuracy"),
                "dev_greedy_accuracy": probe.get("greedy_accuracy"),
                "dev_pass_at_k": probe.get("pass_at_k"),
            }
        )
    return out


def summarise(out: Path, runs: list[Run]) -> dict:
    rows = []
    for run in runs:
        curve = _read(out / "runs" / run.name / "metrics.jsonl")
        start, final = curve["evals"][0][1], curve["evals"][-1][1]
        rows.append(
            {
                "start_seed": run.start_seed,
                "preset": run.preset,
                "steps": run.steps,
                "start": start,
                "final": final,
                "gain": final - start,
                "reward_every_10": [round(r, 3) for s, r in curve["rewards"] if s % 10 == 1],
                **curve,
            }
        )
    by_preset: dict[str, dict] = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        gains = [r["gain"] for r in rows if r["preset"] == preset]
        finals = [r["final"] for r in rows if r["preset"] == preset]
        by_preset[preset] = {
            "gain_min": min(gains),
            "gain_mean": statistics.mean(gains),
            "final_mean": statistics.mean(finals),
            "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_min": min(finals),
            "final_max": max(finals),
            "seeds_below_target": [
                r["start_seed"] for r in rows if r["preset"] == preset and r["gain"] < TARGET_GAIN
            ],
        }
    seeds = list(dict.fromkeys(r.start_seed for r in runs))
    return {
        "rows": rows,
        "by_preset": by_preset,
        "target_gain": TARGET_GAIN,
        "starts": _starts(seeds),
        "cpu": _cpu(),
    }


def starts_table(result: dict) -> str:
    lines = [
        "| start seed | shipped | attempt | warm-start steps | dev: sampled right | dev: greedy "
        "| dev: pass@8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in result["starts"]:
        lines.append(
            f"| {s['start_seed']} | {'yes' if s['shipped'] else 'no'} | {s['attempt']} "
            f"| {s['steps']} | {s['dev_sample_accuracy']:.3f} | {s['dev_greedy_accuracy']:.3f} "
            f"| {s['dev_pass_at_k']:.3f} |"
        )
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = [
        "| start seed | preset | greedy, step 0 | greedy, final | gain | "
        "training reward (steps 1, 11, 21, ...) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rewards = " ".join(f"{x:.2f}" for x in r["reward_every_10"])
        lines.append(
            f"| {r['start_seed']} | {r['preset']} | {r['start']:.3f} | {r['final']:.3f} "
            f"| {r['gain']:+.3f} | {rewards} |"
        )
    lines += [
        "",
        "| preset | final greedy, mean ± sd (min–max) | smallest gain "
        f"| seeds gaining < {result['target_gain']:.2f} |",
        "|---|---|---|---|",
    ]
    for preset, s in result["by_preset"].items():
        below = ", ".join(map(str, s["seeds_below_target"])) or "none"
        lines.append(
            f"| {preset} | {s['final_mean']:.3f} ± {s['final_sd']:.3f} "
            f"({s['final_min']:.3f}–{s['final_max']:.3f}) | {s['gain_min']:+.3f} | {below} |"
        )
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"grpo": "tab:blue", "d3s": "tab:red"}
    for r in result["rows"]:
        colour = colours.get(r["preset"])
        label = r["preset"] if r["start_seed"] == result["rows"][0]["start_seed"] else None
        ax_r.plot(*zip(*r["rewards"], strict=True), color=colour, alpha=0.6, label=label)
        ax_a.plot(*zip(*r["evals"], strict=True), color=colour, alpha=0.6, marker=".", label=label)
    ax_r.set(xlabel="step", ylabel="training reward (mean)", title="reward, one line per start")
    ax_a.set(xlabel="step", ylabel="held-out greedy accuracy", title="held-out accuracy")
    for ax in (ax_r, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--presets", nargs="+", default=["grpo", "d3s"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    # One torch thread per run: on 2 shared cores, two threads per process fight each other.
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each")
    ap.add_argument("--out", default="bench/results/start_seeds")
    ap.add_argument("--summarise-only", action="store_true", help="re-read runs, train nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Run(s, p, args.steps) for s in args.seeds for p in args.presets]

    if not args.summarise_only:
        from services.run.config import load_config
        from services.run.prepare import prepare_policy

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        for seed in args.seeds:  # each start once, before the runs that share it
            cfg = load_config(CONFIG, [f"warmstart.seed={seed}"])
            print(f"start seed {seed}: {prepare_policy(cfg)}", flush=True)
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_train_one, run, str(out), args.eval_every, 1) for run in runs]
            for run, future in zip(runs, futures, strict=True):
                future.result()
                print(f"done {run.name}", flush=True)

    result = summarise(out, runs)
    (out / "start_seeds.json").write_text(json.dumps(result, indent=1))
    (out / "start_seeds.md").write_text(
        "# Quickstart RL from every warm-start seed\n\n"
        f"`python -m bench.start_seeds` ({args.steps} lock-step steps, held-out greedy accuracy "
        f"on 500 prompts every {args.eval_every} steps; {result['cpu']}, one torch thread per "
        "run).\n\nThe starts (the probe at which each stopped, on the dev prompts):\n\n"
        + starts_table(result)
        + "\n\nRL from each:\n\n"
        + table(result)
        + "\n"
    )
    figure(result, out / "start_seeds.png")
    print(table(result))
    return result


if __name__ == "__main__":
    main()

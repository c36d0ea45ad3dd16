"""D3S on SmolLM2 with HF rollouts against vLLM rollouts, seed by seed (issue 26's table).

    .venv-vllm/bin/python -m bench.engine_seeds [--engines hf vllm] [--seeds 0 1 2 3 4]
        [--out bench/results/engine_seeds] [--fresh] [--set key=value ...]

Every run is ``d3s run configs/smollm2.yaml`` (the asynchronous service, as a user runs it) with
only ``rollout.engine`` and ``train.seed`` changed, each in a process of its own (Ray and vLLM
start clean). vLLM needs the vLLM venv; the HF runs go in the same one so both engines see the
same library versions. Finished runs are kept (``--fresh`` trains all again).

Per run: the held-out Pass@1 at step 0 and at the last evaluation, the format rate there, the
mean training reward over the last quarter of the steps, and whether it learned (final Pass@1
above the start by ``LEARNED_MARGIN``) or fell into the format trap (at least ``TRAP_FORMAT`` of
its answers formatted and Pass@1 no better than the start). Per engine: the mean and standard
deviation of the final Pass@1 and the count of runs that learned. Writes ``<out>.md`` and
``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CONFIG = "configs/smollm2.yaml"
LEARNED_MARGIN = 0.05
TRAP_FORMAT = 0.8


def _run_dir(out: Path, engine: str, seed: int) -> Path:
    return out / "runs" / f"{engine}-s{seed}"


def train_one(engine: str, seed: int, out: Path, sets: list[str]) -> None:
    """One ``d3s run`` in this process."""
    import shutil

    from services.run.config import load_config
    from services.run.orchestrator import run_service

    run_dir = _run_dir(out, engine, seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        CONFIG,
        [
            f"rollout.engine={engine}",
            f"train.seed={seed}",
            f"train.run_dir={run_dir}",
            f"service.namespace=seeds-{engine}-{seed}",
            "train.progress_bar=false",
            "api.enabled=false",
            # A vLLM engine starting on a busy 2-core box takes minutes.
            "service.wait_timeout_s=1200",
            # As the README's vLLM command: no CUDA-graph capture to wait for on CPU.
            *(["rollout.vllm.enforce_eager=true"] if engine == "vllm" else []),
            *sets,
        ],
    )
    run_service(cfg, run_dir)


def read_run(run_dir: Path) -> dict | None:
    """A finished run's numbers, or None when it has no final evaluation."""
    from services.telemetry.run_log import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = read_metrics(path)
    evals = [r for r in rows if "eval/pass@1" in r]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    if len(evals) < 2 or not rewards:
        return None
    start, last = evals[0], evals[-1]
    tail = rewards[-max(1, len(rewards) // 4) :]
    p0, p1 = float(start["eval/pass@1"]), float(last["eval/pass@1"])
    fmt = float(last.get("eval/format_rate", float("nan")))
    return {
        "start_pass1": p0,
        "final_pass1": p1,
        "final_format_rate": fmt,
        "final_mean_length": float(last.get("eval/mean_response_length", float("nan"))),
        "reward_last_quarter": statistics.fmean(tail),
        "learned": p1 > p0 + LEARNED_MARGIN,
        "trapped": fmt >= TRAP_FORMAT and p1 <= p0 + LEARNED_MARGIN,
    }


def table(runs: dict[str, dict[int, dict]]) -> str:
    lines = [
        "| engine | seed | Pass@1 start | Pass@1 final | format rate | reward (last 1/4) | |",
        "|---|---|---|---|---|---|---|",
    ]
    for engine, by_seed in runs.items():
        for seed, r in sorted(by_seed.items()):
            verdict = "learned" if r["learned"] else ("trap" if r["trapped"] else "flat")
            lines.append(
                f"| {engine} | {seed} | {r['start_pass1']:.3f} | {r['final_pass1']:.3f} | "
                f"{r['final_format_rate']:.2f} | {r['reward_last_quarter']:.3f} | {verdict} |"
            )
    lines += ["", "| engine | runs | final Pass@1 mean ± sd | learned |", "|---|---|---|---|"]
    for engine, by_seed in runs.items():
        finals = [r["final_pass1"] for r in by_seed.values()]
        sd = statistics.stdev(finals) if len(finals) > 1 else float("nan")
        learned = sum(r["learned"] for r in by_seed.values())
        lines.append(
            f"| {engine} | {len(finals)} | {statistics.fmean(finals):.3f} ± {sd:.3f} | "
            f"{learned}/{len(finals)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="bench/results/engine_seeds")
    ap.add_argument("--fresh", action="store_true", help="train every run again")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override")
    ap.add_argument("--one", nargs=2, metavar=("ENGINE", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.one:
        train_one(args.one[0], int(args.one[1]), out, args.sets)
        return {}
    runs: dict[str, dict[int, dict]] = {e: {} for e in args.engines}
    for seed in args.seeds:  # seeds outermost: a cut-short invocation has both engines per seed
        for engine in args.engines:
            run_dir = _run_dir(out, engine, seed)
            if args.fresh or read_run(run_dir) is None:
                cmd = [sys.executable, "-m", "bench.engine_seeds", "--one", engine, str(seed)]
                cmd += ["--out", str(out), *(a for s in args.sets for a in ("--set", s))]
                subprocess.run(cmd, check=True)
            result = read_run(run_dir)
            if result is None:
                raise RuntimeError(f"{run_dir}: the run left no final evaluation")
            runs[engine][seed] = result
            print(engine, seed, json.dumps(result), flush=True)
    sets = "".join(f" --set {s}" for s in args.sets)
    text = "\n".join(
        [
            "# D3S on SmolLM2-135M-Instruct: HF rollouts against vLLM rollouts",
            "",
            f"`python -m bench.engine_seeds --engines {' '.join(args.engines)} --seeds "
            f"{' '.join(map(str, args.seeds))}{sets}` (config `{CONFIG}`, `d3s run`). "
            f"Learned: final Pass@1 above the start by {LEARNED_MARGIN}; trap: at least "
            f"{TRAP_FORMAT:.0%} of answers formatted and no such gain.",
            "",
            table(runs),
            "",
        ]
    )
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(text)
    Path(f"{out}.json").write_text(json.dumps(runs, indent=1, sort_keys=True))
    return runs


if __name__ == "__main__":
    main()

"""What the learner pays for D3S: the selector's time per batch, and learner steps by keep ratio.

    python -m bench.selector_cost [--groups 512] [--samples-per-prompt 16]

Two measurements, side by side in one run on the same CPU:

1. Curating one batch of B x G = 512 x 16 scored groups (advantages, the exact max-variance
   selection, packing the kept rows into the wire record) against one GRPO learner step on the
   same 8,192 samples with the quickstart's policy (0.6M-parameter GPT-2, 8 prompt + 5 response
   tokens). The tiny policy makes the learner as cheap as it gets, so the fraction is an upper
   bound for real models. The curate time is also given for 1,024-token responses.
2. Learner step time against the keep ratios (samples 1.0 -> 0.25, tokens 1.0 -> 0.2), with the
   compact token pass (gradient pass only over rows with a kept token, cut after the last one)
   and with the full pass (mask only), so the token level's saving shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from learner.batch import LearnerBatch
from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from selector.curate import curate
from selector.presets import get_preset
from selector.schedule import Schedule
from selector.service import batch_record
from services.policy.config import PolicySpec
from services.policy.model import build_policy
from services.policy.tokenizer import CharTokenizer
from services.transport.records import ScoredGroup


def make_groups(
    b: int, g: int, prompt: int, response: int, vocab: int, seed: int = 0
) -> list[ScoredGroup]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(b):
        lengths = rng.integers(max(1, response // 2), response + 1, size=g).astype(np.int32)
        logp = -rng.random((g, response), dtype=np.float32)
        logp[np.arange(response)[None, :] >= lengths[:, None]] = 0.0
        rewards = (rng.random(g) < 0.4).astype(np.float32)
        out.append(
            ScoredGroup(
                group_id=f"g{i}",
                prompt_id=f"p{i}",
                policy_version=0,
                prompt=rng.integers(3, vocab, size=prompt, dtype=np.int32),
                responses=rng.integers(3, vocab, size=(g, response), dtype=np.int32),
                response_lengths=lengths,
                behav_logp=logp,
                rewards=rewards,
                created_at=0.0,
                actor="bench",
                task="arithmetic",
            )
        )
    return out


def time_curate(groups: list[ScoredGroup], repeats: int) -> float:
    preset = get_preset("d3s")
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        res = curate(groups, preset, 0, 100, 1e-6, torch.Generator().manual_seed(r))
        batch_record(0, 100, preset.name, groups, res)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def learner_step_times(
    engine: LearnerEngine,
    batch: LearnerBatch,
    preset_name: str,
    sample_ratio: float,
    token_ratio: float,
    repeats: int,
) -> float:
    schedule = Schedule(
        kind="constant",
        sample_init=sample_ratio,
        sample_final=sample_ratio,
        token_init=token_ratio,
        token_final=token_ratio,
    )
    preset = get_preset(preset_name).with_overrides(schedule=schedule)
    n = max(1, round(sample_ratio * batch.size))
    rows = batch.rows(torch.arange(n))  # the learner sees only the kept samples
    times = []
    for r in range(repeats + 1):
        m = engine.train_step(rows, preset, token_ratio, torch.Generator().manual_seed(r))
        times.append(m["learner_seconds"])
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--groups", type=int, default=512)
    ap.add_argument("--samples-per-prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--ratio-samples", type=int, default=1024, help="samples in the keep-ratio steps"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = CharTokenizer()
    b, g = args.groups, args.samples_per_prompt

    # 1. Selector vs one learner step at the same batch size.
    small = make_groups(b, g, 8, 5, tok.vocab_size)
    long = make_groups(b, g, 256, 1024, 150_000, seed=1)
    t_curate = time_curate(small, args.repeats)
    t_curate_long = time_curate(long, args.repeats)
    res = curate(small, get_preset("grpo"), 0, 100)
    assert res.rows is not None
    rows = res.rows
    full = LearnerBatch.from_rows(rows)
    engine = LearnerEngine(build_policy(PolicySpec(), tok, seed=0), LearnerConfig(), 1000)
    t_step = learner_step_times(engine, full, "grpo", 1.0, 1.0, max(1, args.repeats - 1))
    frac = t_curate / t_step

    # 2. Learner step time by keep ratio, compact vs full token pass.
    part = full.rows(
        torch.randperm(full.size, generator=torch.Generator().manual_seed(0))[: args.ratio_samples]
    )
    compact = LearnerEngine(
        build_policy(PolicySpec(), tok, seed=0), LearnerConfig(token_pass="compact"), 1000
    )
    plain = LearnerEngine(
        build_policy(PolicySpec(), tok, seed=0), LearnerConfig(token_pass="full"), 1000
    )
    grid = [(1.0, 1.0), (0.5, 1.0), (0.25, 1.0), (1.0, 0.5), (1.0, 0.2), (0.5, 0.5), (0.25, 0.2)]
    ratio_rows = []
    base = None
    for rho_s, k in grid:
        preset = "grpo" if (rho_s, k) == (1.0, 1.0) else "d3s"
        tc = learner_step_times(compact, part, preset, rho_s, k, args.repeats)
        tf = learner_step_times(plain, part, preset, rho_s, k, args.repeats)
        base = base or tc
        ratio_rows.append(
            {
                "sample_ratio": rho_s,
                "token_ratio": k,
                "compact_s": tc,
                "full_s": tf,
                "compact_vs_grpo": tc / base,
                "full_vs_grpo": tf / base,
            }
        )

    result = {
        "curate_seconds": t_curate,
        "curate_seconds_1024": t_curate_long,
        "learner_step_seconds": t_step,
        "selector_fraction": frac,
        "keep_ratios": ratio_rows,
    }
    lines = [
        f"# Selector and learner cost ({time.strftime('%Y-%m-%d')})",
        "",
        f"One batch of B x G = {b} x {g} groups; median of {args.repeats} runs; one torch thread; "
        "2-core shared CPU.",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| curate + pack the batch (8 prompt + 5 response tokens) | {t_curate:.4f} |",
        f"| curate + pack the batch (256 prompt + 1,024 response tokens) | {t_curate_long:.4f} |",
        f"| one GRPO learner step on the same {b * g} samples, 0.6M-parameter policy | {t_step:.3f} |",
        "",
        f"The selector takes **{100 * frac:.2f}%** of a learner step at this size (target: under "
        "1%), with the cheapest learner there is; a real model's step costs orders of magnitude more.",
        "",
        f"## Learner step time by keep ratio ({args.ratio_samples} samples offered)",
        "",
        "| samples kept | tokens kept | compact pass (s) | full pass (s) | compact / GRPO | full / GRPO |",
        "|---|---|---|---|---|---|",
    ]
    for r in ratio_rows:
        lines.append(
            f"| {r['sample_ratio']:.2f} | {r['token_ratio']:.2f} | {r['compact_s']:.3f} | "
            f"{r['full_s']:.3f} | {r['compact_vs_grpo']:.2f}x | {r['full_vs_grpo']:.2f}x |"
        )
    lines += [
        "",
        "GRPO = all samples, all tokens, compact pass (the first row). The full pass runs "
        "forward and backward over every token of the kept samples and only masks the loss.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selector.md").write_text(text)
    (args.out / "selector.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

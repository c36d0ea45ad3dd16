"""Peak memory of one rollout generate and one learner step with Qwen's full vocabulary, on CPU.

The model is ``bench/full_vocab_model.py``'s Qwen2 (151,936 logits, hidden 32, 2 layers,
random weights, unsteered so every row runs the full length): its vocabulary is a real model's,
so the memory that scales with ``rows x tokens x vocabulary`` is a real model's too, while the
layers that would dwarf it on a CPU are tiny. Each measurement runs in a fresh process: build the
model, reset the kernel's peak-RSS mark (``/proc/self/clear_refs``), run one phase, read the peak
(``VmHWM``). The figure is the peak minus the RSS just before the phase, next to the size of
the ``[N, T, V]`` float32 tensor a naive implementation would hold (``generate``'s kept scores;
the learner's whole-batch float32 logits).

    python -m bench.memory                       # 64 rows x 256 new tokens; writes the table
    python -m bench.memory --rows 16 --new-tokens 64 --out /tmp/memory.md
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path
from queue import Empty

GIB = 2**30
# Run as a script, bench/ itself would head sys.path and its selector.py would shadow the
# selector package: import from the repository root instead.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
if str(_BENCH.parent) not in sys.path:
    sys.path.insert(0, str(_BENCH.parent))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset the peak-RSS mark to the current RSS; returns the RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    return _status_kib("VmHWM") * 1024


def _phase(kind: str, args: argparse.Namespace, budget: int | None, queue) -> None:
    try:
        queue.put(_measure(kind, args, budget))
    except BaseException as exc:  # the parent must hear of it, not wait forever
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _measure(kind: str, args: argparse.Namespace, budget: int | None) -> dict:
    import torch

    from bench.full_vocab_model import build_model, build_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.hidden, args.layers, steer=False)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows, plen, tnew = args.rows, args.prompt_len, args.new_tokens
    if kind == "rollout":
        from services.rollout.hf_engine import HFRolloutEngine
        from services.tasks.base import Prompt

        n_prompts = rows // args.samples
        engine = HFRolloutEngine(model, tokenizer, tnew, 1.0, args.top_p)
        prompts = []
        for i in range(n_prompts):
            ids = torch.randint(3, len(tokenizer), (plen,), generator=g).tolist()
            prompts.append(Prompt(f"p{i}", tokenizer.decode(ids), "0", "arithmetic"))
        before = _reset_peak()
        t0 = time.perf_counter()
        batch = engine.generate(prompts, args.samples, seed=0)
        seconds = time.perf_counter() - t0
        tokens = int(batch.response_lengths.sum())
        width = int(batch.responses.shape[1])
        avoided = rows * tnew * vocab * 4
        return {
            "phase": "rollout generate",
            "rows": rows,
            "tokens": tokens,
            "width": width,
            "seconds": seconds,
            "peak_extra": _peak() - before,
            "avoided": avoided,
            "setting": f"top_p={args.top_p}",
        }
    from learner.batch import LearnerBatch
    from learner.config import LearnerConfig
    from learner.engine import LearnerEngine
    from selector.presets import get_preset

    width = plen + tnew
    cfg = LearnerConfig(
        device="cpu",
        zero_stage=0,
        lr=1e-6,
        micro_batch_tokens=budget,
        gradient_checkpointing=args.checkpointing,
    )
    engine = LearnerEngine(model, cfg, schedule_steps=10)
    ids = torch.randint(3, len(tokenizer), (rows, width), generator=g)
    prompt = torch.full((rows,), plen)
    seq = torch.full((rows,), width)
    pos = torch.arange(width)[None]
    behav = torch.where(pos >= plen, -torch.rand(rows, width, generator=g) * 12, 0.0)
    batch = LearnerBatch(ids, prompt, seq, behav, torch.randn(rows, generator=g))
    before = _reset_peak()
    t0 = time.perf_counter()
    metrics = engine.train_step(batch, get_preset("grpo"), 1.0, torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - t0
    return {
        "phase": "learner step",
        "rows": rows,
        "tokens": rows * width,
        "width": width,
        "seconds": seconds,
        "peak_extra": _peak() - before,
        "avoided": rows * (width - 1) * vocab * 4,
        "setting": f"micro_batch_tokens={budget}, micro-batches={int(metrics['micro_batches'])}"
        + (", checkpointing" if args.checkpointing else ""),
    }


def measure(kind: str, args: argparse.Namespace, budget: int | None = None) -> dict:
    """Run one phase in a fresh process and return what it measured."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(kind, args, budget, queue))
    proc.start()
    result = None
    deadline = time.monotonic() + 3600
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except Empty:
            # Killed without a word (the kernel's OOM killer, for one): do not wait the hour.
            if not proc.is_alive():
                raise RuntimeError(
                    f"{kind} measurement process died (exit code {proc.exitcode})"
                ) from None
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{kind} measurement: no result within 3600s") from None
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if "error" in result:
        raise RuntimeError(f"{kind} measurement failed: {result['error']}")
    return result


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Peak memory with the full 151,936-entry vocabulary (CPU)",
        "",
        f"Model: Qwen2, vocabulary 151,936, hidden {args.hidden}, {args.layers} layers, float32, "
        f"random weights. Rows N = {args.rows} ({args.rows // args.samples} prompts x "
        f"{args.samples} samples), prompt {args.prompt_len} tokens, {args.new_tokens} new tokens. "
        f"Measured by `python -m bench.memory` on {platform.machine()} with {args.threads} "
        "thread(s); peak = the process's peak RSS during the phase minus its RSS before it.",
        "",
        "| phase | setting | tokens | time (s) | peak extra (GiB) | [N, T, V] float32 (GiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['phase']} | {r['setting']} | {r['tokens']:,} | {r['seconds']:.1f} | "
            f"{r['peak_extra'] / GIB:.2f} | {r['avoided'] / GIB:.1f} |"
        )
    lines += [
        "",
        "The rollout engine gathers each sampled token's log-prob in the step it is drawn, so only "
        "one step's `[N, V]` logits live at a time (`generate(output_scores=True)` would keep "
        "`[N, T, V]`). The learner runs micro-batches of at most `micro_batch_tokens` padded "
        "tokens and keeps one normaliser per position instead of a float32 copy of the logits, "
        "so its peak follows the budget, not the batch. The learner's figure includes what its "
        "first step allocates once: gradients and AdamW's two moments (3 x the parameters, "
        "here mostly the two 151,936-row embedding matrices).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="N = prompts x samples")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/memory.md")
    args = parser.parse_args()
    results = [measure("rollout", args)]
    print(results[-1], flush=True)
    for budget in args.budgets:
        results.append(measure("learner", args, budget))
        print(results[-1], flush=True)
    text = table(results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""SmolLM2-135M-Instruct's learner step: packing off against on, and where a step's time goes.

    python -m bench.learner_step [--repeats 3] [--grpo-repeats 1] [--threads N]
        [--baseline-engine FILE] [--out bench/results/learner_step]

The learner is built as ``d3s run configs/smollm2.yaml`` builds it (``load_policy``, the config's
``learner`` section, DeepSpeed ZeRO-1 on CPU) and takes steps on synthetic batches shaped like that
config's real steps (the shape, not the values, sets the cost):

* prompts of 49-66 tokens (uniform; SmolLM2's chat template around the sums prompts measures
  49-66, mean 57);
* responses: 40% truncated at ``max_new_tokens`` = 40, the rest uniform in 5-39 (mean ~29, as
  the engine-seed runs' steps average 15-39 tokens per kept sample, most near 30);
* D3S: 24 kept samples at token ratio 0.3 (the vLLM runs' step 6: 23 samples, ratio 0.325);
  GRPO: all 8 x 8 = 64 samples, every response token.

Packing off and on run alternately on one engine (the same weights up to one small step each),
``--repeats`` times per preset, so load drifting on a shared box hits both alike. With
``--baseline-engine`` (another revision's learner/engine.py, ``git show REV:learner/engine.py >
FILE``) a second engine of that revision runs alternately with the current one, so a change to
the learner is measured before and after in one invocation.

Each step is timed in CPU seconds of this process (on a shared box: the work done, not the wait
for a core; wall seconds beside them), by phase, by wrapping the engine's methods from outside:
the no-grad pass (old log-probs and entropies), token selection, the gradient pass, the
optimizer step; inside both passes the output layer (``lm_head``) and the log-prob/entropy
computation are timed by hooks. Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

CONFIG = "configs/smollm2.yaml"
PROMPT = (49, 66)
MAX_NEW = 40
TRUNCATED_SHARE = 0.4
SHAPES = {"d3s": (24, 0.3), "grpo": (64, 1.0)}  # preset -> (rows, token ratio)


def make_batch(rows: int, vocab: int, seed: int):
    """A learner batch of ``rows`` samples of the stated length distribution."""
    from learner.batch import LearnerBatch

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(PROMPT[0], PROMPT[1] + 1, (rows,), generator=g)
    resp = torch.randint(5, MAX_NEW, (rows,), generator=g)
    resp = torch.where(torch.rand(rows, generator=g) < TRUNCATED_SHARE, MAX_NEW, resp)
    seq = prompt + resp
    width = int(seq.max())
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    pos = torch.arange(width)[None]
    in_resp = (pos >= prompt[:, None]) & (pos < seq[:, None])
    behav = torch.where(in_resp, -2 * torch.rand(rows, width, generator=g), 0.0)
    return LearnerBatch(ids, prompt, seq, behav, torch.randn(rows, generator=g))


class PhaseClock:
    """CPU seconds per phase of the current step (``time.process_time``: on a shared box the
    work a phase does, not how long it waited for a core), from wrappers around the engine's
    methods."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.phase = ""

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **kw):
            outer, self.phase = self.phase, label
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.t[label] += time.process_time() - t0
                self.phase = outer

        setattr(obj, name, timed)

    def hook_head(self, head: torch.nn.Module) -> None:
        """Forward time of the output layer, booked to the pass it runs in."""
        start: list[float] = []
        head.register_forward_pre_hook(lambda *_: start.append(time.process_time()))

        def done(*_):
            self.t[f"{self.phase}: lm_head forward"] += time.process_time() - start.pop()

        head.register_forward_hook(done)

    def wrap_logprobs(self, module) -> None:
        """Time ``module``'s ``logprobs_and_entropy`` (the name its forward calls)."""
        fn = module.logprobs_and_entropy

        def timed(*a, **kw):
            t0 = time.process_time()
            out = fn(*a, **kw)
            self.t[f"{self.phase}: log-probs/entropy forward"] += time.process_time() - t0
            return out

        module.logprobs_and_entropy = timed


def engine_class(path: str | None):
    """The current LearnerEngine, or (``path``) the one in another revision's learner/engine.py
    (``git show REV:learner/engine.py > FILE``), imported beside it against today's other
    modules; returns the class and the module whose ``logprobs_and_entropy`` its forward calls."""
    if path is None:
        import learner.engine
        import learner.forward

        return learner.engine.LearnerEngine, learner.forward
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_learner_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LearnerEngine, module


def build(cls, logits_module, clock: PhaseClock):
    from services.policy.model import load_policy
    from services.run.config import load_config

    cfg = load_config(CONFIG)
    model, _ = load_policy(cfg.policy.path)
    eng = cls(model, cfg.learner, cfg.train.horizon)
    clock.wrap(eng, "_score", "no-grad pass")
    clock.wrap(eng, "_token_mask", "token selection")
    clock.wrap(eng, "_gradient_pass", "gradient pass")
    clock.wrap(eng.engine, "step", "optimizer step")
    clock.hook_head(eng.module.get_output_embeddings())
    clock.wrap_logprobs(logits_module)
    return eng, cfg.learner


def run(args) -> dict:
    from selector.presets import get_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = PhaseClock()
    engines = {"current": build(*engine_class(None), clock)}
    if args.baseline_engine:
        engines = {"baseline": build(*engine_class(args.baseline_engine), clock), **engines}
    for eng, base in engines.values():
        eng.cfg = base.model_copy(update={"packing": True})
        eng._check_packing()  # refuses a model that cannot keep packed rows apart
    vocab = int(next(iter(engines.values()))[0].module.config.vocab_size)
    out: dict = {"threads": torch.get_num_threads(), "steps": []}
    runs = [(name, packing) for name in engines for packing in (False, True)]
    for preset, (rows, ratio) in SHAPES.items():
        repeats = args.repeats if preset == "d3s" else args.grpo_repeats
        for rep in range(repeats):
            # alternate, and reverse the order every other repeat: drifting load hits all alike
            for name, packing in runs if rep % 2 == 0 else runs[::-1]:
                eng, base = engines[name]
                eng.cfg = base.model_copy(update={"packing": packing})
                batch = make_batch(rows, vocab, seed=rep)
                clock.t.clear()
                t0, c0 = time.perf_counter(), time.process_time()
                m = eng.train_step(batch, get_preset(preset), ratio)
                step = {
                    "engine": name,
                    "preset": preset,
                    "packing": packing,
                    "repeat": rep,
                    "cpu_seconds": time.process_time() - c0,
                    "wall_seconds": time.perf_counter() - t0,
                    "phases": dict(clock.t),
                    **{k: m[k] for k in ("padded_token_share", "tokens_forward", "tokens_kept")},
                }
                out["steps"].append(step)
                print(json.dumps(step), flush=True)
    return out


def _median(steps: list[dict], key) -> float:
    return statistics.median(key(s) for s in steps)


def summary(out: dict) -> str:
    """Per preset: each engine with packing off and on (median CPU and wall seconds, padded
    share, packing's CPU ratio, and the current engine's against the baseline's), then each
    phase's median CPU seconds."""
    names = list(dict.fromkeys(s["engine"] for s in out["steps"]))
    lines = [
        "| preset | engine | packing | steps | CPU s per step: median (min) | wall s (median) | "
        "padded token share | CPU packing off/on | CPU baseline/current |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cells: dict[tuple, list[dict]] = {}
    for s in out["steps"]:
        cells.setdefault((s["preset"], s["engine"], s["packing"]), []).append(s)
    for preset in SHAPES:
        for name in names:
            for packing in (False, True):
                steps = cells.get((preset, name, packing))
                if not steps:
                    continue
                cpu = _median(steps, lambda s: s["cpu_seconds"])
                off = cells.get((preset, name, False))
                by_pack = (
                    _median(off, lambda s: s["cpu_seconds"]) / cpu if packing and off else None
                )
                old = cells.get((preset, "baseline", packing))
                by_cut = (
                    _median(old, lambda s: s["cpu_seconds"]) / cpu
                    if name != "baseline" and old
                    else None
                )
                lines.append(
                    f"| {preset} | {name} | {'on' if packing else 'off'} | {len(steps)} | "
                    f"{cpu:.2f} ({min(s['cpu_seconds'] for s in steps):.2f}) | "
                    f"{_median(steps, lambda s: s['wall_seconds']):.2f} | "
                    f"{statistics.fmean(s['padded_token_share'] for s in steps):.3f} | "
                    f"{'' if by_pack is None else f'{by_pack:.2f}x'} | "
                    f"{'' if by_cut is None else f'{by_cut:.2f}x'} |"
                )
    lines += ["", "Phases of a step (median CPU seconds; 0 where the phase did not run):", ""]
    phases = sorted({k for s in out["steps"] for k in s["phases"]})
    lines += ["| preset | engine | packing | " + " | ".join(phases) + " |"]
    lines += ["|---|---|---|" + "---|" * len(phases)]
    for (preset, name, packing), steps in cells.items():
        row = [f"{_median(steps, lambda s, p=p: s['phases'].get(p, 0.0)):.2f}" for p in phases]
        lines.append(
            f"| {preset} | {name} | {'on' if packing else 'off'} | " + " | ".join(row) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3, help="D3S steps per packing setting")
    ap.add_argument("--grpo-repeats", type=int, default=1, help="GRPO steps per packing setting")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/learner_step")
    ap.add_argument(
        "--baseline-engine",
        default=None,
        help="another revision's learner/engine.py (git show REV:learner/engine.py > FILE), "
        "run alternately with the current engine",
    )
    ap.add_argument("--summarise", metavar="JSON", help="only print the tables of a saved run")
    args = ap.parse_args(argv)
    if args.summarise:
        out = json.loads(Path(args.summarise).read_text())
        print(summary(out))
        return out
    out = run(args)
    text = summary(out)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(out, indent=1))
    Path(f"{args.out}.md").write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()

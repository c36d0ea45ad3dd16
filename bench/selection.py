"""How expensive is D3S's selection? Times select_cross and token_mask against one torch.sort.

    python -m bench.selection [--repeats 5]

Both are measured side by side in one run, and the ratio to a plain sort of the same data is
what matters (the machine is shared; absolute times drift). Target: within 3x of one sort.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from selector.advantages import group_advantages
from selector.sample import select_cross, select_intra
from selector.token import token_mask


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--groups", type=int, default=512)
    ap.add_argument("--samples-per-prompt", type=int, default=16)
    ap.add_argument("--tokens-n", type=int, default=8192, help="sequences in the token-level batch")
    ap.add_argument(
        "--tokens-t", type=int, default=4096, help="response length of the token-level batch"
    )
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = []

    rewards = (torch.rand(args.groups, args.samples_per_prompt, generator=g) < 0.3).float()
    rewards += 0.01 * torch.rand(rewards.shape, generator=g)
    adv = group_advantages(rewards)
    n_keep = round(0.25 * adv.numel())
    t_sort = _time(lambda: torch.sort(adv.reshape(-1)), args.repeats * 20)
    t_cross = _time(lambda: select_cross(adv, n_keep), args.repeats * 20)
    t_intra = _time(lambda: select_intra(adv, args.samples_per_prompt // 4), args.repeats * 20)
    shape = f"{args.groups}x{args.samples_per_prompt}"
    rows.append({"op": "select_cross", "shape": shape, "t": t_cross, "sort": t_sort})
    rows.append({"op": "select_intra", "shape": shape, "t": t_intra, "sort": t_sort})

    n, t = args.tokens_n, args.tokens_t
    ent = torch.rand(n, t, generator=g) * 3.0
    tadv = torch.randn(n, generator=g)
    lengths = torch.randint(t // 4, t + 1, (n,), generator=g)
    rmask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    t_tsort = _time(lambda: torch.sort(ent.reshape(-1)), args.repeats)
    t_tok_b = _time(lambda: token_mask(tadv, ent, rmask, 0.2, "batch"), args.repeats)
    t_rsort = _time(lambda: torch.sort(ent, dim=1), args.repeats)
    t_tok_s = _time(lambda: token_mask(tadv, ent, rmask, 0.2, "sequence"), args.repeats)
    rows.append({"op": "token_mask pool=batch", "shape": f"{n}x{t}", "t": t_tok_b, "sort": t_tsort})
    rows.append(
        {"op": "token_mask pool=sequence", "shape": f"{n}x{t}", "t": t_tok_s, "sort": t_rsort}
    )

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}+ runs"
    )
    print(f"{'op':28s} {'shape':>10s} {'time':>10s} {'one sort':>10s} {'ratio':>7s}")
    for r in rows:
        r["ratio"] = r["t"] / r["sort"]
        print(
            f"{r['op']:28s} {r['shape']:>10s} {r['t'] * 1e3:9.2f}ms {r['sort'] * 1e3:9.2f}ms {r['ratio']:6.2f}x"
        )
    print("(the sort for pool=sequence is a row-wise sort of [N, T]; for the rest, one flat sort)")
    return rows


if __name__ == "__main__":
    main()

"""Weight-sync latency against model size, every transport side by side in one run.

For each size, a synthetic transformer-shaped state (hidden 512: per layer four matrices and
six vectors, so a 100M-parameter model has ~320 tensors like a real 0.5B one) is published by
this process and received by a separate engine process into a module of the same shapes:

- ``collective``: bucketed broadcast (gloo on CPU, ``--bucket-mb``), end to end from the
  publish call until the engine has verified and loaded the version;
- ``per-tensor``: the same broadcast with one tensor per call (``bucket_mb: 0``);
- ``files``: safetensors write (temp + rename) then the engine's read, verify and load;
- ``object_store``: ``ray.put`` + weight-store actor, then a Ray actor's fetch and load.

Run: ``python -m bench.weight_sync`` (``--sizes 1,10`` for a quick one). Writes
``bench/results/weight_sync.md`` unless ``--out ''``.

``python -m bench.weight_sync --cost`` measures instead what one version costs with the
collective transport, without and with catch-up files (``catchup_every: 1``): seconds per version
end to end, seconds the learner spends in ``publish``, and the peak *extra* resident bytes of
the learner process and of the engine process during the syncs (``VmHWM`` after the model is
built and the peak reset, minus the resident bytes then), so a buffer per bucket, a host copy
of the model or a second copy in the engine shows up as bytes. Appends a section to
``bench/results/weight_sync_cost.md`` (``--label`` names it).

``python -m bench.weight_sync --engine vllm`` measures instead the sync into a running vLLM
engine (:mod:`bench.weight_sync_vllm`): the worker-in-the-group path against a bare broadcast of
the same bytes and against the bytes-through-RPC path.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from services.weightsync.collective import CollectivePublisher, CollectiveReceiver
from services.weightsync.files import FilesPublisher, FilesReceiver

HIDDEN = 512
_CTX = mp.get_context("fork")


def synthetic_state(
    params: int, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Transformer-shaped tensors summing to about ``params`` elements (the last tensor is cut)."""
    h = hidden
    layer = [
        ("qkv", (3 * h, h)),
        ("proj", (h, h)),
        ("up", (4 * h, h)),
        ("down", (h, 4 * h)),
        ("ln1_w", (h,)),
        ("ln1_b", (h,)),
        ("ln2_w", (h,)),
        ("ln2_b", (h,)),
        ("up_b", (4 * h,)),
        ("down_b", (h,)),
    ]
    out: dict[str, torch.Tensor] = {}
    total, i = 0, 0
    g = torch.Generator().manual_seed(0)
    while total < params:
        for name, shape in layer:
            n = 1
            for d in shape:
                n *= d
            if total + n > params:
                shape, n = (params - total,), params - total
            out[f"layer{i}_{name}"] = torch.randn(shape, generator=g).to(dtype)
            total += n
            if total >= params:
                break
        i += 1
    return out


class Holder(torch.nn.Module):
    """An engine's model: buffers with the state's names and shapes."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in state.items():
            self.register_buffer(name, torch.zeros_like(t))


def _step(state: dict[str, torch.Tensor], version: int) -> None:
    for t in state.values():
        t.add_(1e-3 * version)


# ---- peak resident bytes ------------------------------------------------------------------------


def _fixed_mmap_threshold() -> None:
    """Large blocks always come from mmap and go back to the OS when freed (glibc otherwise
    raises its threshold after a free and serves later blocks from a heap that stays resident),
    so resident bytes follow what is allocated."""
    with contextlib.suppress(OSError):  # not glibc: resident bytes are only less exact
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakExtra:
    """Peak resident bytes above those at :meth:`start` (Linux: resets ``VmHWM``)."""

    def start(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.base_kb = _status_kb("VmRSS")

    def bytes(self) -> int:
        return max(0, _status_kb("VmHWM") - self.base_kb) * 1024


# ---- the engine process ---------------------------------------------------------------------


def _engine(conn: Any, params: int, dtype: torch.dtype) -> None:
    torch.set_num_threads(1)
    _fixed_mmap_threshold()
    model = Holder(synthetic_state(params, dtype=dtype))
    recv: Any = None
    peak = PeakExtra()
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            if recv is not None:
                recv.close()
            return
        if cmd[0] == "peak":
            conn.send(peak.bytes())
            continue
        if cmd[0] == "collective":
            recv = CollectiveReceiver(cmd[1], "bench-engine", timeout_s=600)
            peak.start()
            conn.send("ready")
            continue
        if cmd[0] == "files":
            recv = FilesReceiver(cmd[1], timeout_s=600)
            conn.send("ready")
            continue
        target = cmd[1]
        while recv.version != target:
            if recv.has_update():
                recv.receive(model)
            else:
                time.sleep(0.0005)
        conn.send(time.perf_counter())


def _start_engine(params: int, dtype: torch.dtype) -> tuple[Any, Any]:
    """An engine process and this side of its pipe. The child's end is closed here, so an
    engine that dies makes this side's ``recv`` raise EOFError instead of waiting forever."""
    parent, child = _CTX.Pipe()
    proc = _CTX.Process(target=_engine, args=(child, params, dtype), daemon=True)
    proc.start()
    child.close()
    return parent, proc


def _end_engine(conn: Any, proc: Any, timeout_s: float = 30.0) -> None:
    """Wait for an engine told to stop; one that does not exit (a measurement failed while it
    waited for its next command) is terminated, then killed. Nothing more is sent to it: it
    may be exiting already, its end of the pipe gone."""
    proc.join(timeout_s)
    for end in (proc.terminate, proc.kill):
        if not proc.is_alive():
            break
        end()
        proc.join(5)
    conn.close()


# ---- measurements ---------------------------------------------------------------------------


def _time_collective(
    conn: Any, state: dict[str, torch.Tensor], bucket_bytes: int, reps: int
) -> list[float]:
    pub = CollectivePublisher(
        "127.0.0.1", 0, bucket_bytes=bucket_bytes, catchup_every=0, timeout_s=600
    )
    conn.send(("collective", pub.address))
    assert conn.recv() == "ready"
    out = []
    for v in range(reps + 1):  # version 0 forms the group: not timed
        _step(state, v)
        conn.send(("sync", v))
        t0 = time.perf_counter()
        pub.publish(v, state)
        done = conn.recv()
        if v:
            out.append(done - t0)
    conn.send(("stop",))
    pub.close()
    return out


def _cost_collective(
    conn: Any, state: dict[str, torch.Tensor], bucket_bytes: int, reps: int, catchup: bool
) -> dict[str, float]:
    """One engine process, ``reps`` + 1 versions (the first forms the group, not timed):
    median seconds per version end to end and in the learner's ``publish``, and the peak
    extra resident bytes of both processes over all of them."""
    with tempfile.TemporaryDirectory(prefix="d3s-bench-ws-") as d:
        pub = CollectivePublisher(
            "127.0.0.1",
            0,
            bucket_bytes=bucket_bytes,
            catchup_dir=d if catchup else None,
            catchup_every=1 if catchup else 0,
            timeout_s=600,
        )
        conn.send(("collective", pub.address))
        assert conn.recv() == "ready"
        peak = PeakExtra()
        peak.start()
        e2e, learner = [], []
        for v in range(reps + 1):
            _step(state, v)
            conn.send(("sync", v))
            t0 = time.perf_counter()
            pub.publish(v, state)
            t1 = time.perf_counter()
            done = conn.recv()
            if v:
                e2e.append(done - t0)
                learner.append(t1 - t0)
        pub.flush()
        learner_peak = peak.bytes()
        conn.send(("peak",))
        engine_peak = conn.recv()
        conn.send(("stop",))
        pub.close()
    return {
        "s_per_version": statistics.median(e2e),
        "publish_s": statistics.median(learner),
        "learner_peak": float(learner_peak),
        "engine_peak": float(engine_peak),
    }


def cost(params: int, dtype: torch.dtype, bucket_mb: float, reps: int) -> dict[str, dict]:
    state = synthetic_state(params, dtype=dtype)
    out = {}
    for name, catchup in (("collective", False), ("collective+catchup", True)):
        parent, proc = _start_engine(params, dtype)
        try:
            out[name] = _cost_collective(parent, state, int(bucket_mb * (1 << 20)), reps, catchup)
        finally:
            _end_engine(parent, proc)
    return out


def cost_main(args: argparse.Namespace) -> None:
    _fixed_mmap_threshold()
    torch.set_num_threads(1)
    head = (
        "| params | dtype | model MiB | bucket MiB | path | s / version | learner publish s | "
        "learner peak extra MiB | engine peak extra MiB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for dname in args.dtypes.split(","):
        for size in args.sizes.split(","):
            dtype = getattr(torch, dname)
            params = int(float(size) * 1e6)
            mib = params * torch.tensor([], dtype=dtype).element_size() / (1 << 20)
            for name, r in cost(params, dtype, args.bucket_mb, args.reps).items():
                lines.append(
                    f"| {size}M | {dname} | {mib:.0f} | {args.bucket_mb:g} | {name} | "
                    f"{r['s_per_version']:.3f} | {r['publish_s']:.3f} | "
                    f"{r['learner_peak'] / (1 << 20):.1f} | {r['engine_peak'] / (1 << 20):.1f} |"
                )
                print(lines[-1], flush=True)
    if args.out:
        out = Path(args.out)
        text = (
            out.read_text()
            if out.exists()
            else (
                "# What one weight version costs (collective transport)\n\n"
                "Peak extra = the highest resident bytes of the process during the syncs minus those "
                "just before (model already built; Linux `VmHWM` reset, glibc mmap threshold fixed so "
                "freed blocks leave the resident set). CPU only, gloo on loopback, one engine "
                "process; medians over the timed versions.\n"
            )
        )
        cmd = (
            f"python -m bench.weight_sync --cost --sizes {args.sizes} --dtypes {args.dtypes} "
            f"--bucket-mb {args.bucket_mb:g} --reps {args.reps}"
        )
        out.write_text(text + f"\n## {args.label}\n\n`{cmd}`\n\n" + "\n".join(lines) + "\n")


def _time_files(conn: Any, state: dict[str, torch.Tensor], reps: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="d3s-bench-ws-") as d:
        pub = FilesPublisher(d, keep_last=2)
        conn.send(("files", d))
        assert conn.recv() == "ready"
        out = []
        for v in range(reps):
            _step(state, v)
            t0 = time.perf_counter()
            pub.publish(v, state)
            conn.send(("sync", v))
            out.append(conn.recv() - t0)
        conn.send(("stop",))
    return out


def _time_object_store(state: dict[str, torch.Tensor], reps: int) -> list[float]:
    import ray

    from services.weightsync.object_store import ObjectStorePublisher, ObjectStoreReceiver
    from services.weightsync.ray_store import get_or_create_store

    @ray.remote(num_cpus=0)
    class Engine:
        def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
            torch.set_num_threads(1)
            self.model = Holder({n: torch.zeros(s, dtype=d) for n, (s, d) in shapes.items()})
            self.recv = ObjectStoreReceiver("bench", timeout_s=600)

        def sync(self, version: int) -> float:
            while self.recv.receive(self.model) != version:
                time.sleep(0.0005)
            return time.perf_counter()

    store = get_or_create_store("bench")
    pub = ObjectStorePublisher("bench", store=store)
    pub.publish(0, state)  # warm-up: the actor's start and first fetch are not timed
    engine = Engine.remote({n: (tuple(t.shape), t.dtype) for n, t in state.items()})
    ray.get(engine.sync.remote(0))
    out = []
    for v in range(1, reps + 1):
        _step(state, v)
        t0 = time.perf_counter()
        pub.publish(v, state)
        out.append(ray.get(engine.sync.remote(v)) - t0)
    ray.kill(engine)
    ray.kill(store)
    return out


def measure(params: int, dtype: torch.dtype, bucket_mb: float, reps: int) -> dict[str, float]:
    """Median end-to-end seconds per process-to-process transport for one model size."""
    state = synthetic_state(params, dtype=dtype)
    row: dict[str, float] = {"tensors": float(len(state))}
    for name, run in (
        ("collective", lambda c: _time_collective(c, state, int(bucket_mb * (1 << 20)), reps)),
        ("per_tensor", lambda c: _time_collective(c, state, 0, reps)),
        ("files", lambda c: _time_files(c, state, reps)),
    ):
        parent, proc = _start_engine(params, dtype)
        try:
            row[name] = statistics.median(run(parent))
        finally:
            _end_engine(parent, proc)
    return row


def main() -> None:
    import sys

    if "--engine" in sys.argv:
        i = sys.argv.index("--engine")
        if sys.argv[i + 1 : i + 2] != ["vllm"]:
            raise SystemExit("--engine: only 'vllm' (the default measures the transports)")
        from bench.weight_sync_vllm import main as vllm_main

        vllm_main(sys.argv[1:i] + sys.argv[i + 2 :])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sizes", default="1,10,50,100", help="millions of parameters, comma-separated"
    )
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true", help="skip the object-store transport")
    ap.add_argument("--out", default=None, help="results file ('' for none)")
    ap.add_argument(
        "--cost",
        action="store_true",
        help="what a version costs the learner and the engine (seconds, peak extra bytes), "
        "collective without and with catch-up files",
    )
    ap.add_argument("--label", default="run", help="--cost: the section's title")
    args = ap.parse_args()
    if args.cost:
        if args.out is None:
            args.out = "bench/results/weight_sync_cost.md"
        cost_main(args)
        return
    if args.out is None:
        args.out = "bench/results/weight_sync.md"
    torch.set_num_threads(1)
    cases = [(size, dname) for dname in args.dtypes.split(",") for size in args.sizes.split(",")]
    rows = {}
    for size, dname in cases:  # forked engines first: no Ray threads in the parent yet
        rows[size, dname] = measure(
            int(float(size) * 1e6), getattr(torch, dname), args.bucket_mb, args.reps
        )
        print(size, dname, rows[size, dname], flush=True)
    if not args.no_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for size, dname in cases:
            state = synthetic_state(int(float(size) * 1e6), dtype=getattr(torch, dname))
            rows[size, dname]["object_store"] = statistics.median(
                _time_object_store(state, args.reps)
            )
            print(size, dname, "object_store", rows[size, dname]["object_store"], flush=True)
        ray.shutdown()
    cols = ["collective", "per_tensor", "files"] + ([] if args.no_ray else ["object_store"])
    head = (
        f"| params | dtype | MiB | tensors | {' | '.join(c + ' s' for c in cols)} | "
        "per-tensor / collective | files / collective |"
        + ("" if args.no_ray else " object store / collective |")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for size, dname in cases:
        row, dtype = rows[size, dname], getattr(torch, dname)
        mib = float(size) * 1e6 * torch.tensor([], dtype=dtype).element_size() / (1 << 20)
        ratios = [row["per_tensor"] / row["collective"], row["files"] / row["collective"]]
        if not args.no_ray:
            ratios.append(row["object_store"] / row["collective"])
        lines.append(
            f"| {size}M | {dname} | {mib:.0f} | {int(row['tensors'])} | "
            + " | ".join(f"{row[c]:.3f}" for c in cols)
            + " | "
            + " | ".join(f"{r:.2f}x" for r in ratios)
            + " |"
        )
    print("\n".join(lines), flush=True)
    if args.out:
        Path(args.out).write_text(
            "# Weight sync latency vs model size\n\n"
            f"`python -m bench.weight_sync --sizes {args.sizes} --dtypes {args.dtypes} --bucket-mb {args.bucket_mb} "
            f"--reps {args.reps}`: median of {args.reps} end-to-end syncs (publish call until one engine "
            "process has verified and loaded the version), CPU only, loopback.\n\n"
            + "\n".join(lines)
            + "\n"
        )


if __name__ == "__main__":
    main()

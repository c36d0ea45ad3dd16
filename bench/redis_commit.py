"""Redis figures of the commit path: wire size of a scored group, the rollout actors' publish
rate, and the selector's read + atomic commit rate, against one local ``redis-server``.

    python -m bench.redis_commit --groups 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from services.transport.bundle import Transport
from services.transport.queue import connect
from services.transport.records import ScoredGroup
from services.transport.redis_server import EmbeddedRedis

SHAPES = [(8, 128, 256), (8, 256, 1024), (16, 512, 2048), (16, 1024, 4096)]  # (G, prompt, T)


def make_group(i: int, g: int, p: int, t: int, rng: np.random.Generator) -> ScoredGroup:
    lengths = rng.integers(1, t + 1, size=g).astype(np.int32)
    logp = -rng.random((g, t)).astype(np.float32)
    logp[np.arange(t)[None, :] >= lengths[:, None]] = 0.0
    return ScoredGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        policy_version=0,
        prompt=rng.integers(2, 30000, size=p).astype(np.int32),
        responses=rng.integers(2, 30000, size=(g, t)).astype(np.int32),
        response_lengths=lengths,
        behav_logp=logp,
        rewards=rng.random(g).astype(np.float32),
        created_at=time.time(),
        actor="bench",
        task="bench",
    )


def wire_bytes(group: ScoredGroup) -> int:
    return sum(
        len(k) + len(v if isinstance(v, bytes) else str(v).encode())
        for k, v in group.to_fields().items()
    )


def bench_shape(t: Transport, shape: tuple[int, int, int], n: int, per_commit: int) -> dict:
    rng = np.random.default_rng(0)
    groups = [make_group(i, *shape, rng) for i in range(n)]
    stream = f"{t.namespace}:bench:{'x'.join(map(str, shape))}"
    t0 = time.perf_counter()
    for gr in groups:
        t.queue.publish(stream, gr, incr={"groups_written": 1}, key=gr.group_id)
    pub_s = time.perf_counter() - t0
    t.queue.ensure_consumer_group(stream, "selector")
    t0 = time.perf_counter()
    commits = 0
    while True:
        got = t.queue.read(stream, "selector", "bench", per_commit)
        if not got:
            break
        t.queue.commit(
            stream,
            "selector",
            [d.entry_id for d in got],
            incr={"groups_used": len(got)},
            consumer="bench",
        )
        commits += 1
    commit_s = time.perf_counter() - t0
    size = wire_bytes(groups[0])
    return {
        "G": shape[0],
        "prompt": shape[1],
        "T": shape[2],
        "group_kib": round(size / 1024, 1),
        "publish_groups_per_s": round(n / pub_s),
        "publish_mib_per_s": round(n * size / pub_s / 2**20, 1),
        "read_commit_groups_per_s": round(n / commit_s),
        "commits_per_s": round(commits / commit_s, 1),
        "groups_per_commit": per_commit,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=200)
    ap.add_argument("--per-commit", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, EmbeddedRedis(Path(d)) as server:
        t = Transport.open(connect(server.url), "bench")
        rows = [bench_shape(t, s, args.groups, args.per_commit) for s in SHAPES]
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()

"""How many scored groups per second does the transport carry? Ours against a bare Redis loop.

    python -m bench.transport [--groups 400] [--group-size 16] [--response-tokens 1024]

Side by side in one run, against one embedded redis-server on loopback:

* ours: a producer publishes each group through the wire schema with its idempotency key (the
  Lua commit), a consumer reads them through the consumer group (decoding and validating every
  record) and commits each batch of ``prompts_per_step`` groups atomically (XACK + XDEL +
  counters + ledger hash), as the selector does;
* bare: XADD of the same bytes, XREADGROUP, XACK + XDEL, nothing else.

It prints groups/s for both, the ratio (target: ours at least 50% of bare), the payload size,
and the arithmetic of how many rollout GPUs one Redis serves at a given generation speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from selector.inbox import GROUP
from services.transport.bundle import Transport
from services.transport.queue import connect
from services.transport.records import ScoredGroup
from services.transport.redis_server import EmbeddedRedis


def make_groups(n: int, group_size: int, tokens: int, prompt_tokens: int) -> list[ScoredGroup]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        lengths = rng.integers(tokens // 2, tokens + 1, size=group_size).astype(np.int32)
        logp = -rng.random((group_size, tokens), dtype=np.float32)
        logp[np.arange(tokens)[None, :] >= lengths[:, None]] = 0.0
        out.append(
            ScoredGroup(
                group_id=f"g{i}",
                prompt_id=f"p{i}",
                policy_version=0,
                prompt=rng.integers(0, 150_000, size=prompt_tokens, dtype=np.int32),
                responses=rng.integers(0, 150_000, size=(group_size, tokens), dtype=np.int32),
                response_lengths=lengths,
                behav_logp=logp,
                rewards=(rng.random(group_size) < 0.4).astype(np.float32),
                created_at=time.time(),
                actor="bench",
                task="math",
            )
        )
    return out


def run_ours(t: Transport, groups: list[ScoredGroup], per_step: int) -> float:
    """Seconds to publish every group, then read and commit them step by step."""
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    t0 = time.perf_counter()
    for g in groups:
        t.queue.publish(t.keys.groups, g, incr={"groups_written": 1}, key=g.group_id)
    done = 0
    while done < len(groups):
        got = t.queue.read(t.keys.groups, GROUP, "bench", count=per_step)
        ledger = {d.record.group_id: "used:bench" for d in got}
        t.queue.commit(
            t.keys.groups,
            GROUP,
            [d.entry_id for d in got],
            incr={"groups_used": len(got)},
            hset={t.keys.ledger: ledger},
            consumer="bench",
        )
        done += len(got)
    return time.perf_counter() - t0


def run_bare(client, stream: str, payloads: list[dict[bytes, bytes]], per_step: int) -> float:
    """The same bytes through plain XADD / XREADGROUP / XACK + XDEL."""
    client.xgroup_create(stream, "bare", id="0", mkstream=True)
    t0 = time.perf_counter()
    for fields in payloads:
        client.xadd(stream, fields)
    done = 0
    while done < len(payloads):
        reply = client.xreadgroup("bare", "bench", {stream: ">"}, count=per_step)
        ids = [entry_id for entry_id, _ in reply[0][1]]
        pipe = client.pipeline(transaction=True)
        pipe.xack(stream, "bare", *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
        done += len(ids)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--groups", type=int, default=400)
    ap.add_argument("--group-size", type=int, default=16, help="G")
    ap.add_argument("--response-tokens", type=int, default=1024, help="T of every response")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--per-step", type=int, default=32, help="groups committed together")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--gpu-tokens-per-s",
        type=float,
        default=20_000.0,
        help="generation speed of one rollout GPU, for the sizing arithmetic",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)

    groups = make_groups(args.groups, args.group_size, args.response_tokens, args.prompt_tokens)
    payloads = [g.to_fields() for g in groups]
    payload_bytes = sum(len(v) for v in payloads[0].values())
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        client = connect(server.url, socket_timeout_s=60)
        for r in range(args.repeats):  # interleaved, so drift hits both alike
            t = Transport.open(client, f"bench{r}")
            ours.append(run_ours(t, groups, args.per_step))
            bare.append(run_bare(client, f"bare{r}:groups", payloads, args.per_step))
            t.state.delete_run()
            client.delete(f"bare{r}:groups")
    ours_rate = args.groups / min(ours)
    bare_rate = args.groups / min(bare)
    ratio = ours_rate / bare_rate
    group_tokens = args.group_size * args.response_tokens
    groups_per_gpu = args.gpu_tokens_per_s / group_tokens
    result = {
        "groups": args.groups,
        "group_size": args.group_size,
        "response_tokens": args.response_tokens,
        "payload_mib": payload_bytes / 2**20,
        "ours_groups_per_s": ours_rate,
        "bare_groups_per_s": bare_rate,
        "ratio": ratio,
        "ours_mib_per_s": ours_rate * payload_bytes / 2**20,
        "gpu_tokens_per_s": args.gpu_tokens_per_s,
        "groups_per_gpu_per_s": groups_per_gpu,
        "gpus_served": ours_rate / groups_per_gpu,
    }
    lines = [
        f"# Transport throughput ({time.strftime('%Y-%m-%d')})",
        "",
        f"{args.groups} scored groups of G={args.group_size} x {args.response_tokens} response tokens "
        f"(+{args.prompt_tokens} prompt tokens) = {result['payload_mib']:.2f} MiB per group on the "
        f"wire; commits of {args.per_step} groups; best of {args.repeats} interleaved runs; one "
        "embedded redis-server on loopback, 2-core shared CPU.",
        "",
        "| path | groups/s | MiB/s |",
        "|---|---|---|",
        f"| ours (schema + consumer group + atomic commit) | {ours_rate:.0f} | {result['ours_mib_per_s']:.0f} |",
        f"| bare XADD / XREADGROUP / XACK+XDEL | {bare_rate:.0f} | {bare_rate * payload_bytes / 2**20:.0f} |",
        "",
        f"Ours is **{ratio:.2f}x** the bare loop (target: at least 0.5x).",
        "",
        f"Sizing: one rollout GPU generating {args.gpu_tokens_per_s:,.0f} tokens/s fills "
        f"{groups_per_gpu:.2f} such groups/s, so this one Redis carries the groups of about "
        f"**{result['gpus_served']:.0f} rollout GPUs** before it is the bottleneck.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transport.md").write_text(text)
    (args.out / "transport.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

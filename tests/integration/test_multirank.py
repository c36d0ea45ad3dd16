"""Teardown of a multi-rank learner (``learner.multirank.stop_ranks``): a follower rank that died
or stopped answering must not make stop raise or hang; stop ends every follower in bounded time.

Rank 0 runs in a process of its own (joining a process group would change this pytest process
for good); it starts its followers as ``d3s learner`` does and reports back on a queue."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from typing import Any

import pytest
import torch

from learner.config import LearnerConfig

pytestmark = pytest.mark.integration

_CTX = mp.get_context("spawn")
# The bound stop_ranks must meet here: a 1 s grace to kill each follower that did not end, and
# room for a loaded 2-core box; the old code raised at once or hung on the dead rank.
STOP_BOUND_S = 20.0


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from services.policy.model import PolicySpec, build_policy, save_policy
    from services.policy.tokenizer import CharTokenizer

    tok = CharTokenizer()
    model = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), tok)
    return str(save_policy(model, tok, tmp_path_factory.mktemp("policy")))


def _leader(policy_path: str, world: int, signals: list[int], queue: Any) -> None:
    """Rank 0: start the followers, send ``signals[i]`` to follower rank i+1 (0: leave it), then
    time stop_ranks; puts ("pids", ...) then ("done", ...) or ("error", traceback)."""
    try:
        from learner.multirank import start_ranks, stop_ranks
        from services.policy.model import load_policy

        torch.set_num_threads(1)
        model, _ = load_policy(policy_path)
        cfg = LearnerConfig(world_size=world, dist_timeout_s=60)
        leader, procs = start_ranks(cfg, 10, policy_path, model)
        queue.put(("pids", [p.pid for p in procs]))
        # One mirrored call: every follower has joined and sits in its follow loop.
        leader.state_dict_cpu()
        for proc, sig in zip(procs, signals, strict=True):
            if sig:
                os.kill(proc.pid, sig)
        for proc, sig in zip(procs, signals, strict=True):
            if sig == signal.SIGKILL:
                proc.join(30)  # dead before stop, as after a crash mid-run
        t0 = time.monotonic()
        outcomes = stop_ranks(leader, procs, timeout_s=30.0, grace_s=1.0)
        elapsed = time.monotonic() - t0
        queue.put(("done", outcomes, elapsed, [p.exitcode for p in procs]))
    except BaseException:
        queue.put(("error", traceback.format_exc()))


def _run_leader(policy_path: str, world: int, signals: list[int]) -> tuple[Any, ...]:
    queue = _CTX.Queue()
    proc = _CTX.Process(target=_leader, args=(policy_path, world, signals, queue))
    proc.start()
    pids: list[int] = []
    try:
        msg = queue.get(timeout=180)  # start-up: imports and DeepSpeed on a loaded box
        if msg[0] == "pids":
            pids = msg[1]
            msg = queue.get(timeout=120)
        assert msg[0] != "error", msg[1]
        return msg
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        # Followers are children of the leader; killed, it cannot end them (a stopped one
        # would stay forever).
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stop_ranks_returns_when_a_follower_was_killed_and_ends_a_stuck_one(
    policy_path: str,
) -> None:
    """Rank 1 SIGKILLed (as the OOM killer would), rank 2 SIGSTOPped (alive, never answering):
    stop returns in bounded time without raising, rank 1 reaped, rank 2 killed (SIGTERM stays
    pending on a stopped process, so terminate alone would not do). The old code's unguarded
    "stop" broadcast raised here (gloo: connection closed by peer), which in ``d3s learner``'s
    teardown replaced the error that had ended the run."""
    _, outcomes, elapsed, codes = _run_leader(policy_path, 3, [signal.SIGKILL, signal.SIGSTOP])
    assert elapsed < STOP_BOUND_S
    assert outcomes == ["exited", "killed"]
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]


def test_stop_ranks_stops_healthy_followers_cleanly(policy_path: str) -> None:
    """The ordinary path: every follower hears stop and exits 0, none terminated."""
    _, outcomes, elapsed, codes = _run_leader(policy_path, 2, [0])
    assert outcomes == ["exited"]
    assert codes == [0]
    assert elapsed < STOP_BOUND_S

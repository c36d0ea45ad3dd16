"""A learner of N ranks behind one service: rank 0 runs the service, ranks 1..N-1 follow.

Ranks 1..N-1 are either local processes (``d3s learner`` started by hand, which sees its node's
GPUs) or, under ``d3s run``, Ray actors in the learner's placement group that the caller's
``launch`` starts (``services.run.placement.start_followers``), with rank 0's node address as
``MASTER_ADDR``, so a learner may span nodes.

Only rank 0 talks to Redis and the rollout actors. Every engine call that is collective
(train_step's all-reduces, ZeRO-3 gathers, checkpoint save/load) is announced to the followers
by a broadcast first, so all ranks enter it together. Followers wait in that broadcast between
steps, bounded by learner.dist_timeout_s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from learner import distributed as D
from learner.engine import LearnerEngine
from learner.weights import gather_and_release
from services.common.net import free_port
from services.telemetry.logfiles import file_handler, redirect_output

log = logging.getLogger(__name__)

_MIRRORED = ("train_step", "state_dict_cpu", "gather", "save_checkpoint", "load_checkpoint")


class LeaderEngine:
    """Rank 0's view of the engine: the same API, each collective call mirrored to followers."""

    def __init__(self, engine: LearnerEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _announce(self, cmd: str, args: tuple) -> None:
        D.broadcast_object((cmd, args))

    def train_step(self, batch, preset, token_ratio, generator=None):
        seed = generator.initial_seed() if generator is not None else None
        self._announce("train_step", (batch, preset, token_ratio, seed))
        return self._engine.train_step(batch, preset, token_ratio, generator)

    def state_dict_cpu(self):
        self._announce("state_dict_cpu", ())
        return self._engine.state_dict_cpu()

    def device_weights(self):
        # Under ZeRO-3 the publisher gathers bucket by bucket; each gather is announced so the
        # followers enter the same all-gathers (ZeRO 0-2: every rank holds the whole weights).
        return self._engine.device_weights(
            announce=lambda names: self._announce("gather", (names,))
        )

    def save_checkpoint(self, directory, step, client_state):
        self._announce("save_checkpoint", (directory, step, client_state))
        return self._engine.save_checkpoint(directory, step, client_state)

    def load_checkpoint(self, directory):
        self._announce("load_checkpoint", (directory,))
        return self._engine.load_checkpoint(directory)

    def stop(self) -> None:
        self._announce("stop", ())


def follow(engine: LearnerEngine) -> int:
    """Run a follower rank until rank 0 says stop; returns the steps it trained."""
    while True:
        cmd, args = D.broadcast_object(None)
        if cmd == "stop":
            return engine.steps_done
        if cmd not in _MIRRORED:
            raise RuntimeError(f"follower rank {engine.rank}: unknown command {cmd!r}")
        if cmd == "train_step":
            batch, preset, ratio, seed = args
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            engine.train_step(batch, preset, ratio, gen)
        elif cmd == "gather":
            with gather_and_release(engine.engine.module, args[0]):
                pass
        else:
            getattr(engine, cmd)(*args)


def _follower_main(
    rank: int,
    world: int,
    port: int,
    learner_cfg,
    schedule_steps: int,
    policy_path: str,
    master_addr: str = "127.0.0.1",
    local_rank: int | None = None,
) -> int:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank if local_rank is None else local_rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from services.policy.model import load_policy

    model, _ = load_policy(policy_path)
    engine = LearnerEngine(model, learner_cfg, schedule_steps)
    steps = follow(engine)
    log.info("follower rank %d done after %d steps", rank, steps)
    return steps


class FollowerRank:
    """One follower rank in a process of its own that a Ray actor hosts (``ray.remote`` is
    applied by the caller, which places it). ``log_dir``: its log, stdout and stderr go to
    ``log_dir/learner-rank<r>.log``."""

    def __init__(self, log_dir: str | None = None) -> None:
        self.log_dir = log_dir

    def run(
        self,
        rank: int,
        world: int,
        master_addr: str,
        port: int,
        learner_cfg,
        schedule_steps: int,
        policy_path: str,
    ) -> int:
        """Join rank 0 at ``master_addr:port`` and follow it until it says stop; returns the steps
        trained. With a GPU of its own (Ray sets CUDA_VISIBLE_DEVICES to it) the rank's device
        is ``cuda:0``."""
        if self.log_dir is not None:
            _log_to(Path(self.log_dir) / f"learner-rank{rank}.log")
        import ray

        local_rank = 0 if ray.get_gpu_ids() else rank
        return _follower_main(
            rank, world, port, learner_cfg, schedule_steps, policy_path, master_addr, local_rank
        )


def _log_to(path: Path) -> None:
    redirect_output(path)
    logging.getLogger().handlers = [file_handler(path)]
    logging.getLogger().setLevel(logging.INFO)


# (world, port) -> (MASTER_ADDR, followers): starts ranks 1..world-1 somewhere else (Ray actors);
# each follower has join(timeout), is_alive() and kill() like a process.
Launcher = Callable[[int, int], tuple[str, list[Any]]]


def start_ranks(
    learner_cfg,
    schedule_steps: int,
    policy_path: str,
    model: torch.nn.Module,
    launch: Launcher | None = None,
    master_addr: str = "127.0.0.1",
) -> tuple[LeaderEngine, list[Any]]:
    """Start ranks 1..N-1 (local processes, or whatever ``launch`` starts) and join them as rank
    0 in this process. ``master_addr``: this node's address for local followers (loopback);
    a launcher returns its own."""
    world = learner_cfg.world_size
    if launch is not None:
        master_addr, procs = launch(world, port := free_port(master_addr))
    else:
        port = free_port()
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(
                target=_follower_main,
                args=(r, world, port, learner_cfg, schedule_steps, policy_path),
                daemon=True,
            )
            for r in range(1, world)
        ]
        for p in procs:
            p.start()
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE=str(world),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(port),
    )
    engine = LearnerEngine(model, learner_cfg, schedule_steps)
    log.info(
        "learner: rank 0 of %d leads at %s:%d; followers %s",
        world,
        master_addr,
        port,
        [p.pid for p in procs],
    )
    return LeaderEngine(engine), procs


def stop_ranks(
    leader: LeaderEngine, procs: list[Any], timeout_s: float = 60.0, grace_s: float = 5.0
) -> list[str]:
    """Tell the followers to stop and make sure each has ended; returns how each did
    (``"exited"``, ``"terminated"`` or ``"killed"``), in rank order.

    This runs in teardown, often because something failed (a follower died mid-step, say), so it
    never raises and never waits unboundedly: a follower already dead, or one dying while told,
    must not replace the error that brought the learner down. The "stop" broadcast is skipped
    when a follower is known dead (gloo would fail or wait on it). Once told, followers have
    ``timeout_s`` in all (broadcast included) to exit; when the broadcast fails or does not
    finish they cannot hear it, and get only ``grace_s``. Then each left is terminated, then
    killed, ``grace_s`` apiece.
    """
    start = time.monotonic()
    dead = [r for r, p in enumerate(procs, 1) if not p.is_alive()]
    if dead:
        log.warning("learner: follower ranks %s ended early; not announcing stop", dead)
        told = False
    else:
        told = _announce_stop(leader, timeout_s)
    deadline = start + timeout_s if told else time.monotonic() + grace_s
    return [_end(r, p, deadline, grace_s) for r, p in enumerate(procs, 1)]


def _announce_stop(leader: LeaderEngine, timeout_s: float) -> bool:
    """Broadcast "stop" in a thread so a broadcast stuck on an unresponsive rank cannot hold up
    teardown; whether it went through in ``timeout_s``. A thread left stuck ends when the
    followers are killed (its peers gone, the collective fails) and, a daemon, never holds up
    exit."""
    outcome: list[BaseException | None] = []
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def announce() -> None:
        try:
            if device is not None:  # NCCL works on the calling thread's current device
                torch.cuda.set_device(device)
            leader.stop()
            outcome.append(None)
        except BaseException as e:  # reported below; teardown goes on to end the ranks
            outcome.append(e)

    thread = threading.Thread(target=announce, name="d3s-stop-ranks", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        log.warning("learner: stop broadcast to followers not done in %.0fs", timeout_s)
        return False
    if outcome[0] is not None:
        log.warning("learner: stop broadcast to followers failed: %r", outcome[0])
        return False
    return True


def _end(rank: int, proc: Any, deadline: float, grace_s: float) -> str:
    """Wait for follower ``rank`` until ``deadline``, then terminate it (a local process; a Ray
    actor has only kill), then kill it, each with ``grace_s`` to take effect."""
    how = "exited"
    try:
        proc.join(max(0.0, deadline - time.monotonic()))
        for step, end in (("terminated", getattr(proc, "terminate", None)), ("killed", proc.kill)):
            if not proc.is_alive():
                break
            if end is not None:
                how = step
                end()
                proc.join(grace_s)
        if proc.is_alive():
            log.error("learner: follower rank %d (pid %s) outlived kill", rank, proc.pid)
    except Exception as e:  # one follower's failure to end must not leave the others running
        log.warning("learner: ending follower rank %d failed: %r", rank, e)
    code = getattr(proc, "exitcode", None)
    if how != "exited" or code not in (0, None):
        log.warning("learner: follower rank %d %s (exit code %s)", rank, how, code)
    return how

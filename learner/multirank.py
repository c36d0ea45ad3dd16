"""A learner of N ranks behind one service: rank 0 runs the service, ranks 1..N-1 follow.

Only rank 0 talks to Redis and the rollout actors. Every engine call that is collective
(train_step's all-reduces, ZeRO-3 gathers, checkpoint save/load) is announced to the followers
by a broadcast first, so all ranks enter it together. Followers wait in that broadcast between
steps, bounded by learner.dist_timeout_s.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.multiprocessing as mp

from learner import distributed as D
from learner.engine import LearnerEngine
from services.common.net import free_port

log = logging.getLogger(__name__)

_MIRRORED = ("train_step", "state_dict_cpu", "save_checkpoint", "load_checkpoint")


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
        else:
            getattr(engine, cmd)(*args)


def _follower_main(rank: int, world: int, port: int, learner_cfg, total_steps: int, policy_path: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from services.policy.model import load_policy

    model, _ = load_policy(policy_path)
    engine = LearnerEngine(model, learner_cfg, total_steps)
    steps = follow(engine)
    log.info("follower rank %d done after %d steps", rank, steps)


def start_ranks(learner_cfg, total_steps: int, policy_path: str, model: torch.nn.Module
                ) -> tuple[LeaderEngine, list[mp.Process]]:
    """Start ranks 1..N-1 as processes and join them as rank 0 in this process."""
    world = learner_cfg.world_size
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_follower_main, args=(r, world, port, learner_cfg, total_steps, policy_path),
                         daemon=True) for r in range(1, world)]
    for p in procs:
        p.start()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    engine = LearnerEngine(model, learner_cfg, total_steps)
    log.info("learner: rank 0 of %d leads; followers pids %s", world, [p.pid for p in procs])
    return LeaderEngine(engine), procs


def stop_ranks(leader: LeaderEngine, procs: list[mp.Process], timeout_s: float = 60.0) -> None:
    leader.stop()
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()

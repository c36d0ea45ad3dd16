"""Fault injection: real asynchronous runs lose their selector, learner, a rollout actor and
redis-server (kill -9) at random points, several times, and finish by themselves.

A background thread watches the run directory (the learner's ``metrics.jsonl`` for progress,
``logs/<component>.log`` for each component's pid, the process tree for redis-server) and kills
at random steps; the orchestrator's supervisor restarts what died. Afterwards the books are
audited from the run's AOF (``fault_books.audit(faults=True)``): every written group used once,
dropped as stale or dead-lettered, no batch trained twice or skipped, versions consistent. A
table prints faults per kind, runs completed, groups lost and duplicated, and recovery times.

``test_fault_injection_short`` is the default form (one run, one fault of each kind);
``test_fault_injection_soak`` (``-m slow``) runs several longer runs with more faults. Set
``D3S_FAULT_SEED`` to replay a schedule.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis
from fault_books import audit, balance

from services.run.config import RunConfig, parse_config
from services.run.orchestrator import ServiceError, run_service
from services.run.supervisor import RedisLost
from services.transport.redis_server import EmbeddedRedis

pytestmark = pytest.mark.integration

KINDS = ("selector", "learner", "rollout", "redis")
READY = re.compile(r"(\S+) ready in [\d.]+s \(pid (\d+)")
RECOVERY_TIMEOUT_S = 150.0
SHORT_STEPS = 400
SOAK_STEPS = 800


@pytest.fixture(scope="module")
def warmstart_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("warmstart")


def fault_config(tiny_config, run_dir: Path, cache: Path, steps: int, **service) -> RunConfig:
    """A tiny async run (2 rollout actors, 4 prompts a step) that tolerates restarts: a short
    restart back-off, a generous stall timeout (a restarted learner imports torch and
    DeepSpeed again), checkpoints every 4 steps."""
    return parse_config(
        tiny_config(
            run_dir,
            cache,
            name="faults",
            rollout={"prompts_per_step": 4, "num_actors": 2},
            train={"total_steps": steps, "eval_every": 1000, "checkpoint_every": 4},
            service={
                "mode": "async",
                "max_staleness": 1,
                "namespace": f"f{uuid.uuid4().hex[:8]}",
                "max_group_backlog": 8,
                "wait_timeout_s": 180,
                "max_restarts": 6,
                "restart_backoff_s": 0.5,
                "redis_outage_s": 60,
                **service,
            },
        )
    )


# ---- watching a run from outside -------------------------------------------------------------


def trained_step(run_dir: Path) -> int:
    """The highest step with a metric row (-1 before any): progress, read without Redis."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    best = -1
    for line in lines:
        try:
            best = max(best, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line being written
    return best


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def component_pid(run_dir: Path, name: str) -> int | None:
    """The pid of the live process hosting ``name`` (the last one that logged it was ready)."""
    try:
        text = (run_dir / "logs" / f"{name}.log").read_text(errors="replace")
    except OSError:
        return None
    pids = [int(m.group(2)) for m in READY.finditer(text) if m.group(1) == name]
    return pids[-1] if pids and _alive(pids[-1]) else None


def redis_pid(run_dir: Path) -> int | None:
    """The live redis-server of this run: a child of this process (the orchestrator started it)
    running in ``run_dir/redis`` (its title shows host:port, not its config file)."""
    where = str(run_dir / "redis")
    for p in psutil.Process().children(recursive=True):
        try:
            if (
                p.name() == "redis-server"
                and p.cwd() == where
                and p.status() != psutil.STATUS_ZOMBIE
            ):
                return p.pid
        except psutil.Error:
            continue
    return None


def target_pid(run_dir: Path, kind: str, rng: random.Random, actors: int) -> tuple[str, int | None]:
    if kind == "redis":
        return "redis-server", redis_pid(run_dir)
    name = f"rollout-{rng.randrange(actors)}" if kind == "rollout" else kind
    return name, component_pid(run_dir, name)


@dataclass
class Fault:
    kind: str
    target: str
    at_step: int
    pid: int | None = None
    killed_at: float | None = None
    recovered_s: float | None = None


class Injector(threading.Thread):
    """Kills one process per planned kind, each at a random moment once the run recovered from
    the fault before, and measures the recovery: until the killed process is back (a new pid)
    and the learner trained a step past the one it was at."""

    def __init__(self, run_dir: Path, plan: list[str], rng: random.Random, actors: int) -> None:
        super().__init__(name="fault-injector", daemon=True)
        self.run_dir, self.plan, self.rng, self.actors = run_dir, plan, rng, actors
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            # Every component up and training first; then each fault a random 0.3-2 s after the
            # run recovered from the one before.
            if not self._wait(lambda: trained_step(self.run_dir) >= 2, 600):
                return
            for kind in self.plan:
                time.sleep(self.rng.uniform(0.3, 2.0))
                if self.stop.is_set():
                    return
                self._inject(kind, trained_step(self.run_dir))
        except Exception as exc:  # reported by the test, never lost in a thread
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _inject(self, kind: str, at_step: int) -> None:
        fault = Fault(kind, "", at_step)
        deadline = time.monotonic() + 60
        while fault.pid is None and time.monotonic() < deadline and not self.stop.is_set():
            fault.target, fault.pid = target_pid(self.run_dir, kind, self.rng, self.actors)
            if fault.pid is None:
                time.sleep(0.2)  # between a death and its replacement being ready
        if fault.pid is None:
            self.errors.append(f"no live {kind} to kill at step {at_step}")
            return
        step = trained_step(self.run_dir)
        os.kill(fault.pid, signal.SIGKILL)
        fault.killed_at = time.monotonic()
        self.faults.append(fault)

        def recovered() -> bool:
            back = (
                redis_pid(self.run_dir)
                if kind == "redis"
                else component_pid(self.run_dir, fault.target)
            )
            return back is not None and back != fault.pid and trained_step(self.run_dir) > step

        if self._wait(recovered, RECOVERY_TIMEOUT_S):
            fault.recovered_s = time.monotonic() - fault.killed_at

    def _wait(self, cond, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.1)
        return False


def fault_plan(rng: random.Random, kinds: list[str]) -> list[str]:
    """The kinds to kill, in a random order."""
    kinds = list(kinds)
    rng.shuffle(kinds)
    return kinds


def run_with_faults(cfg: RunConfig, run_dir: Path, plan: list[str], seed: int) -> dict:
    """One run with the planned faults; returns its figures (the books audited)."""
    injector = Injector(run_dir, plan, random.Random(seed), cfg.rollout.num_actors)
    injector.start()
    t0 = time.monotonic()
    try:
        summary = run_service(cfg, run_dir)
    finally:
        injector.stop.set()
        injector.join(timeout=10)
    wall = time.monotonic() - t0
    assert not injector.errors, injector.errors
    assert summary["steps"] == cfg.train.total_steps
    with EmbeddedRedis(run_dir / "redis") as server:  # the books survive in the AOF
        client = redis.Redis.from_url(server.url)
        figures = balance(client, cfg)
        books = audit(client, cfg, faults=True)
        client.close()
    return {
        "faults": injector.faults,
        "wall_s": wall,
        "books": books,
        "balance": figures,
        "supervision": summary["supervision"],
    }


def print_table(title: str, runs: list[dict]) -> str:
    faults = [f for r in runs for f in r["faults"]]
    rec = [f.recovered_s for f in faults if f.recovered_s is not None]
    lines = [title, f"{'kind':<10}{'injected':>9}{'recovered':>10}{'recover s (mean/max)':>22}"]
    for kind in KINDS:
        mine = [f for f in faults if f.kind == kind]
        times = [f.recovered_s for f in mine if f.recovered_s is not None]
        span = f"{statistics.mean(times):.1f} / {max(times):.1f}" if times else "-"
        lines.append(f"{kind:<10}{len(mine):>9}{len(times):>10}{span:>22}")
    lost = sum(r["balance"]["lost"] for r in runs)
    dup = sum(r["balance"]["duplicated"] for r in runs)
    lines += [
        f"faults injected: {len(faults)}; recovered: {len(rec)}",
        f"runs completed: {len(runs)}; groups written: "
        f"{sum(r['balance']['written'] for r in runs)}; groups lost: {lost}; groups duplicated: "
        f"{dup}; batches duplicate-acknowledged: {sum(r['books']['batches_duplicate'] for r in runs)}",
        f"groups dropped as stale: {sum(r['balance']['stale'] for r in runs)}",
        "wall s per run: " + ", ".join(f"{r['wall_s']:.0f}" for r in runs),
        *(f"supervisor, run {i}: {r['supervision']}" for i, r in enumerate(runs)),
    ]
    return "\n".join(lines)


def _seed() -> int:
    return int(os.environ.get("D3S_FAULT_SEED") or random.SystemRandom().randrange(10**6))


def test_fault_injection_short(tmp_path: Path, warmstart_cache: Path, tiny_config, capsys) -> None:
    """One run, kill -9 of the selector, the learner, a rollout actor and redis-server."""
    seed = _seed()
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    # Long enough in steps (a step takes 0.1-0.3 s here) for four faults and their recoveries.
    cfg = fault_config(tiny_config, run_dir, warmstart_cache, steps=SHORT_STEPS)
    result = run_with_faults(cfg, run_dir, fault_plan(rng, list(KINDS)), seed)

    table = print_table(f"fault injection, short (seed {seed})", [result])
    with capsys.disabled():
        print("\n" + table)
    assert sorted(f.kind for f in result["faults"]) == sorted(KINDS)
    assert all(f.recovered_s is not None for f in result["faults"]), table
    assert result["balance"]["lost"] == result["balance"]["duplicated"] == 0
    assert result["balance"]["batches_skipped"] == result["balance"]["batches_wrong_step"] == 0
    restarts = result["supervision"]["restarts"]
    assert sum(restarts.values()) == 3 and result["supervision"]["redis_restarts"] >= 1
    # Generation wasted by the faults is at most what was in flight at each: the groups queued
    # (max_group_backlog) and the rounds being generated (one step's prompts across actors).
    in_flight = cfg.service.max_group_backlog + cfg.rollout.prompts_per_step
    assert result["balance"]["stale"] <= len(result["faults"]) * in_flight, table


@pytest.mark.slow
def test_fault_injection_soak(tmp_path: Path, warmstart_cache: Path, tiny_config, capsys) -> None:
    """Three longer runs, eight faults each (two of every kind, shuffled)."""
    runs = []
    seed = _seed()
    for i in range(3):
        rng = random.Random(seed + i)
        run_dir = tmp_path / f"run{i}"
        cfg = fault_config(tiny_config, run_dir, warmstart_cache, steps=SOAK_STEPS)
        runs.append(run_with_faults(cfg, run_dir, fault_plan(rng, list(KINDS) * 2), seed + i))
    table = print_table(f"fault injection, soak (seed {seed})", runs)
    with capsys.disabled():
        print("\n" + table)
    assert all(f.recovered_s is not None for r in runs for f in r["faults"]), table
    assert sum(r["balance"]["lost"] for r in runs) == 0
    assert sum(r["balance"]["duplicated"] for r in runs) == 0


def test_redis_lost_past_the_limit_stops_with_one_line_and_a_rerun_resumes(
    tmp_path: Path, warmstart_cache: Path, tiny_config
) -> None:
    """An external Redis (the run cannot restart it) dies for longer than redis_outage_s: the
    run stops with one line; with Redis back, the same run again finishes, books balanced."""
    run_dir = tmp_path / "run"
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        cfg = fault_config(
            tiny_config, run_dir, warmstart_cache, steps=10, redis_url=server.url, redis_outage_s=4
        )
        killer = threading.Thread(target=_kill_at_step, args=(run_dir, 3, server), daemon=True)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(RedisLost) as err:
            run_service(cfg, run_dir)
        stopped_after = time.monotonic() - t0
        killer.join(timeout=5)
        message = str(err.value)
        assert "\n" not in message and "unreachable for" in message and "d3s run" in message
        assert server.password not in message and "***" in message
        assert isinstance(err.value, ServiceError)  # what `d3s run` prints as one line
        steps_before = trained_step(run_dir)
        assert 3 <= steps_before < cfg.train.total_steps

        server.restart()  # Redis is back (same port, password and AOF): run the same again
        summary = run_service(cfg, run_dir)
        assert summary["steps"] == cfg.train.total_steps and stopped_after < 120
        client = redis.Redis.from_url(server.url)
        audit(client, cfg, faults=True)
        assert balance(client, cfg)["lost"] == 0
        client.close()
    finally:
        server.stop()


def _kill_at_step(run_dir: Path, step: int, server: EmbeddedRedis) -> None:
    deadline = time.monotonic() + 300
    while trained_step(run_dir) < step and time.monotonic() < deadline:
        time.sleep(0.1)
    if server.pid is not None:
        os.kill(server.pid, signal.SIGKILL)

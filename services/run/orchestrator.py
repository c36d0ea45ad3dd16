"""The local orchestrator behind ``d3s run``: Redis, Ray, the API and the components, supervised.

``run_service(cfg)``:
  1. Redis: the one given (``service.redis_url`` / ``$D3S_REDIS_URL``) or an embedded one with
     its AOF in the run directory (so a restarted run finds its buffered groups again).
  2. The starting policy (the warm start), prepared BEFORE any actor starts.
  3. Ray: local, or ``service.ray_address``; then the HTTP API (Ray Serve) when ``api.enabled``.
  4. The weight store, the learner, the selector and ``rollout.num_actors`` rollout actors, each
     in its own Ray actor process (:mod:`services.run.components`), all built, then all started.
  5. A progress bar fed from Redis until the learner is done; then everything is stopped in
     reverse order of starting (one ExitStack). Ctrl-C, SIGTERM and a failing component take
     the same path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.secrets import mask_url
from services.run.components import ComponentHost, component_name
from services.run.config import RunConfig
from services.run.lockdown import loopback_ray
from services.run.logs import link_ray_logs
from services.run.placement import (
    PlacementPlan,
    host_options,
    learner_placement_group,
    plan_placement,
    remove_group,
)
from services.run.progress import warmstart_progress
from services.run.supervisor import RedisLost, RedisWatch, ServiceError, Supervisor
from services.telemetry.logfiles import error_lines, last_errors, log_sizes
from services.transport.bundle import Transport
from services.transport.queue import connect

log = logging.getLogger(__name__)


# ServiceError is defined beside the supervisor (which raises most of them) and re-exported here.


def run_service(
    cfg: RunConfig, run_dir: Path | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Run the asynchronous (or lock-step) service to completion; returns a summary.

    ``verbose``: the actors' output (Ray, Serve, DeepSpeed, transformers) is forwarded to this
    process's terminal; otherwise each component's goes to ``run_dir/logs/<component>.log``.

    Raises :class:`ServiceError` when a component fails (after stopping everything), and
    re-raises KeyboardInterrupt after the same clean-up.
    """
    run_dir = Path(run_dir or cfg.train.run_dir).resolve()
    # Where this session's lines start in each log (a resumed run appends to the old ones).
    marks = log_sizes(run_dir / "logs")
    previous_sigterm = sigterm_as_interrupt()
    try:
        return _run_service(cfg, run_dir, verbose)
    except ServiceError as exc:
        exc.causes = failure_causes(exc, run_dir / "logs", marks)
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


# Processes a component starts that log beside it: the learner's other ranks, its evaluator.
_RELATED_LOGS = {"learner": ("learner-rank*.log", "evaluator.log")}
CAUSE_LINES = 6


def failure_causes(
    exc: ServiceError, log_dir: Path, marks: dict[str, int] | None = None
) -> list[tuple[str, list[str]]]:
    """``(source, lines)``: the last error lines this session wrote to the logs of the
    components ``exc`` names (and of the processes they started), then those of its
    ``detail``; lines the message already says are left out, and sources with none.

    The message alone often names only the last link: vLLM's "Engine core initialization
    failed. See root cause above." is all a rollout actor's exception says, while the engine's
    own error went from its child process to the actor's log."""
    marks = marks or {}
    said = str(exc)
    causes: list[tuple[str, list[str]]] = []
    seen: set[str] = set()

    def add(source: str, lines: list[str]) -> None:
        fresh = [x for x in lines if x not in said and x not in seen]
        seen.update(fresh)
        if fresh:
            causes.append((source, fresh))

    for name in exc.components:
        paths = [log_dir / f"{name}.log"]
        for pattern in _RELATED_LOGS.get(name, ()):
            paths += sorted(p for p in log_dir.glob(pattern) if p not in paths)
        for path in paths:
            add(path.name, last_errors(path, marks.get(path.name, 0), CAUSE_LINES))
    if exc.detail:
        add("the error's full text", error_lines(exc.detail, CAUSE_LINES))
    return causes


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_as_interrupt() -> Any:
    """Make SIGTERM (docker stop, kill) take the Ctrl-C path, so it too stops every process.

    Returns the previous handler (None off the main thread, where signals cannot be handled).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _run_service(cfg: RunConfig, run_dir: Path, verbose: bool = False) -> dict[str, Any]:
    from services.run.prepare import prepare_policy
    from services.transport.redis_server import connect_or_start

    run_dir.mkdir(parents=True, exist_ok=True)
    svc = cfg.service
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        redis_url, embedded = connect_or_start(svc.redis_url, run_dir, svc.redis_maxmemory_mb)
        if embedded is not None:
            stack.callback(embedded.stop)
        transport = Transport.open(connect(redis_url), svc.namespace)
        stack.callback(transport.close)
        try:
            # Flags of an earlier session of the same run (its stop on exit) must not end this one.
            transport.control.clear_run_flags()
            transport.state.set_config(json.dumps(cfg.redacted()))
            with warmstart_progress(enabled=cfg.train.progress_bar) as progress:
                policy_path = str(prepare_policy(cfg, progress))
            _start_ray(cfg, stack, verbose)
            link_ray_logs(run_dir / "logs")
            _log_run(cfg, redis_url, run_dir)
            api_url = _start_api(cfg, redis_url, stack) if cfg.api.enabled else None
            hosts, respawn = _start_components(
                cfg, stack, transport, redis_url, run_dir, policy_path, verbose
            )
            watch = RedisWatch(redis_url, embedded, svc.redis_outage_s)
            stack.callback(watch.close)
            supervisor = Supervisor(cfg, transport, hosts, respawn, watch, _progress_row)
            results = supervisor.run()
        except BaseException as exc:
            reason = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"{exc}"
            if not isinstance(exc, RedisLost):  # nobody to tell: Redis is gone
                _best_effort(
                    "requesting stop", transport.control.request_stop, f"orchestrator: {reason}"
                )
            raise
        counters = transport.state.stats()
    learner = results["learner"]
    return {
        "mode": svc.mode,
        "steps": learner.get("steps"),
        "final_heldout_accuracy": learner.get("final_heldout_accuracy"),
        "wall_seconds": time.perf_counter() - t_start,
        "run_dir": str(run_dir),
        "redis_url": mask_url(redis_url) if embedded is None else None,
        "api_url": api_url,
        "counters": counters,
        "components": results,
        "supervision": supervisor.summary(),
    }


def _start_ray(cfg: RunConfig, stack: contextlib.ExitStack, verbose: bool) -> None:
    """Join ``service.ray_address`` or start a local Ray (unless this process already runs one)."""
    import ray

    from services.weightsync.ray_store import RAY_NAMESPACE

    if ray.is_initialized():
        return
    address = cfg.service.ray_address
    # A local Ray listens on loopback only; a cluster's listeners are its own.
    with loopback_ray() if address is None else contextlib.nullcontext({}) as local:
        ray.init(
            address=address,
            namespace=RAY_NAMESPACE,
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=logging.WARNING,
            **local,
        )
    stack.callback(ray.shutdown)
    sigterm_as_interrupt()  # ray.init installs its own SIGTERM handler; ours first


def _log_run(cfg: RunConfig, redis_url: str, run_dir: Path) -> None:
    log.info(
        "run %s (%s, preset %s): %d prompts x %d samples per step, %d steps, %d "
        "rollout actors, max_staleness %d; Redis %s, run dir %s",
        cfg.name,
        cfg.service.mode,
        cfg.algorithm.preset,
        cfg.rollout.prompts_per_step,
        cfg.rollout.samples_per_prompt,
        cfg.train.total_steps,
        cfg.rollout.num_actors,
        cfg.service.max_staleness,
        mask_url(redis_url),
        run_dir,
    )


def _start_api(cfg: RunConfig, redis_url: str, stack: contextlib.ExitStack) -> str:
    """The HTTP API (Ray Serve) for this run; returns its URL."""
    from services.api.serve import start_api, stop_api

    stack.callback(_best_effort, "stopping the API", stop_api)
    try:
        api_url = start_api(
            redis_url, cfg.service.namespace, cfg.api.host, cfg.api.port, cfg.control_token()
        )
    except Exception as exc:  # Serve's error carries the replica's traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ServiceError(
            f"api failed to start: {type(exc).__name__}: {first}",
            components=("api",),
            detail=str(exc),
        ) from exc
    log.info("HTTP API and dashboard at %s/", api_url)
    return api_url


def _start_components(
    cfg: RunConfig,
    stack: contextlib.ExitStack,
    transport: Transport,
    redis_url: str,
    run_dir: Path,
    policy_path: str,
    verbose: bool,
) -> tuple[dict[str, Any], Callable[[str], Any]]:
    """The weight store and every component, placed and built (not yet running); returns the
    components' actors and the function that re-creates a dead one, placed the same way."""
    import ray

    from services.weightsync.ray_store import RAY_NAMESPACE, get_or_create_store, store_name

    svc = cfg.service
    # A store left by an earlier run in this Ray would hand out that run's weights.
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(store_name(svc.namespace), namespace=RAY_NAMESPACE))
    actors = {"weight store": get_or_create_store(svc.namespace)}
    stack.callback(_kill_all, actors)
    # A rendezvous left by an earlier session would send the engines to a dead learner.
    transport.client.delete(transport.keys.weight_rendezvous)
    plan = plan_placement(
        cfg.learner.world_size, _learner_gpu(cfg), cfg.rollout.num_gpus, ray.cluster_resources()
    )
    learner_group = learner_placement_group(plan, svc.wait_timeout_s)
    stack.callback(
        _best_effort, "removing the learner's placement group", remove_group, learner_group
    )
    start = functools.partial(
        _start_hosts,
        cfg,
        redis_url,
        run_dir,
        policy_path,
        not verbose,
        plan=plan,
        learner_group=learner_group,
    )
    actors.update(start())
    hosts = {name: a for name, a in actors.items() if name != "weight store"}
    log.info("starting %s; logs in %s", ", ".join(hosts), run_dir / "logs")
    _prepare_all(hosts, svc.wait_timeout_s)

    def respawn(name: str) -> Any:
        actors[name] = start(only=name)[name]
        return actors[name]

    return hosts, respawn


def _start_hosts(
    cfg: RunConfig,
    redis_url: str,
    run_dir: Path,
    policy_path: str,
    capture_output: bool = True,
    *,
    plan: PlacementPlan,
    learner_group: Any,
    only: str | None = None,
) -> dict[str, Any]:
    """One Ray actor per component, placed by ``plan`` (:mod:`services.run.placement`): the
    learner in bundle 0 of ``learner_group``, rollout actors with ``rollout.num_gpus``, the
    selector on CPU; role resources where the cluster defines them."""
    import ray

    from services.weightsync.ray_store import RAY_NAMESPACE

    host_cls = ray.remote(num_cpus=0, max_restarts=0)(ComponentHost)
    specs = [("learner", 0), ("selector", 0)] + [
        ("rollout", i) for i in range(cfg.rollout.num_actors)
    ]
    hosts = {}
    for kind, index in specs:
        name = component_name(kind, index)
        if only is not None and name != only:  # ``only``: re-create that one (the supervisor)
            continue
        opts: dict[str, Any] = {
            "name": f"{cfg.service.namespace}-{name}",
            "namespace": RAY_NAMESPACE,
        }
        opts.update(host_options(kind, plan, learner_group))
        hosts[name] = host_cls.options(**opts).remote(
            kind, cfg, redis_url, str(run_dir), index, policy_path, capture_output
        )
    return hosts


def _prepare_all(actors: dict[str, Any], timeout_s: float) -> None:
    """Build every component before any loop starts, so none runs ahead while another is still
    importing torch (seconds each on a busy machine)."""
    import ray

    t0 = time.perf_counter()
    waiting = {actors[name].prepare.remote(): name for name in actors}
    while waiting:
        left = max(0.0, timeout_s - (time.perf_counter() - t0))
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=left)
        if not ready:
            raise ServiceError(
                f"{', '.join(waiting.values())} not ready after {timeout_s:.0f}s",
                components=tuple(waiting.values()),
            )
        name = waiting.pop(ready[0])
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise ServiceError(
                f"{name} failed to start: {type(cause).__name__}: {cause}", components=(name,)
            ) from exc
    log.info("all %d components ready in %.1fs", len(actors), time.perf_counter() - t0)


def _progress_row(t: Transport) -> tuple[int, dict[str, float], float | None, str]:
    """(steps trained, metrics, held-out accuracy, queue summary) read from Redis."""
    row = t.state.numeric_metrics()
    stats = t.state.stats()
    depth = t.backlogs()
    # Short: the bar shares one terminal line with reward, accuracy and kept fractions.
    extra = (
        f"v{int(row.get('learner_version', 0))} | queue {depth['groups']}g "
        f"{depth['batches']}b | stale {stats.get('groups_stale', 0)} "
        f"skip {stats.get('batches_skipped', 0)}"
    )
    return int(row.get("learner_version", 0)), row, row.get("heldout_accuracy"), extra


def _kill_all(actors: dict[str, Any]) -> None:
    """Leave no actor process behind; every kill is tried even if an earlier one fails."""
    import ray

    for name, handle in actors.items():
        try:
            ray.kill(handle, no_restart=True)
        except Exception as exc:  # already dead is fine; anything else is worth a line
            log.debug("killing %s: %s", name, exc)


def _best_effort(what: str, fn: Any, *args: Any) -> None:
    """Shutdown steps must not hide the error that caused the shutdown (Redis may be gone)."""
    try:
        fn(*args)
    except Exception as exc:
        log.warning("%s: %s", what, exc)


def _learner_gpu(cfg: RunConfig) -> bool:
    """Whether each learner rank gets a GPU: ``learner.device`` is not cpu and the cluster has
    GPUs (asked of Ray, not of this process: the driver may sit on a CPU-only head)."""
    import ray

    if cfg.learner.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0.0) > 0

"""The local orchestrator behind ``d3s run``: Redis, Ray, the API and the four components.

``run_service(cfg)``:
  1. Redis: the one given (``service.redis_url`` / ``D3S_REDIS_URL``) or an embedded one with its
     AOF in the run directory (so a restarted run finds its buffered groups again).
  2. Ray: local, or ``service.ray_address``.
  3. The starting policy (the warm start), prepared BEFORE any actor starts, so the actors only
     read a finished checkpoint.
  4. The HTTP API (Ray Serve) when ``api.enabled``.
  5. The weight store, the learner, the selector and ``rollout.num_actors`` rollout actors, each
     its own Ray actor process. None reserves a CPU (``num_cpus=0``): on a 2-core machine
     reserved CPUs would leave no room for all of them, and they take turns anyway.
  6. A progress bar fed from Redis until the learner is done; then everything is stopped: the
     stop flag, actors killed, the API, Ray (if started here) and Redis (if embedded). Ctrl-C
     and a failing component take the same path.

``mode: sync`` runs the same pieces; the rollout actors then generate lock-step with the learner.
``run_component`` runs ONE component in the calling process, for ``d3s rollout|selector|learner``
on a cluster or under docker-compose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from services.run.config import RunConfig
from services.transport.streams import Transport, connect

log = logging.getLogger(__name__)

COMPONENTS = ("rollout", "selector", "learner")
_NOISY = ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "httpx", "filelock", "transformers")


class ServiceError(RuntimeError):
    """A component of the run failed; the message names it and says why."""


def _check_config(cfg: RunConfig) -> None:
    if cfg.service.mode == "sync" and cfg.rollout.num_actors > cfg.rollout.prompts_per_step:
        raise ServiceError(
            f"mode sync: rollout.num_actors={cfg.rollout.num_actors} exceeds "
            f"prompts_per_step={cfg.rollout.prompts_per_step}; every actor needs a share of a step"
        )
    if cfg.service.max_group_backlog < cfg.rollout.prompts_per_step:
        raise ServiceError(
            f"service.max_group_backlog={cfg.service.max_group_backlog} is below "
            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step}: rollouts would stop "
            "before the selector had one step's groups"
        )


def component_logging(run_dir: Path, name: str) -> Path:
    """In a component's process: INFO to ``run_dir/logs/<name>.log``, WARNING to stderr."""
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers = [file_handler, err]
    root.setLevel(logging.INFO)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


# ---- one component, in the calling process ---------------------------------------------------


class Component:
    """A built component, ready to run: its name, its transport, and the loop to call.

    Building (model loads, DeepSpeed start-up, Ray handles) is split from running so that the
    orchestrator can start every component's loop at the same moment, once all are built.
    """

    def __init__(self, name: str, transport: Transport, loop: Callable[[], dict[str, Any]]) -> None:
        self.name, self.transport, self._loop = name, transport, loop

    def run(self) -> dict[str, Any]:
        """Run until the run ends; on failure ask the whole run to stop, then raise."""
        with _stop_run_on_failure(self.transport, self.name):
            try:
                return self._loop()
            finally:
                self.transport.client.close()


@contextlib.contextmanager
def _stop_run_on_failure(transport: Transport, name: str) -> Iterator[None]:
    # The others would otherwise wait out their timeouts for a component that is gone.
    try:
        yield
    except Exception as exc:
        transport.request_stop(f"{name} failed: {type(exc).__name__}: {exc}")
        log.exception("%s failed", name)
        raise


def build_component(
    kind: str,
    cfg: RunConfig,
    redis_url: str,
    *,
    index: int = 0,
    policy_path: str | None = None,
    run_dir: str | Path | None = None,
    detached_store: bool = False,
) -> Component:
    """Build one component: ``rollout`` and ``learner`` need Ray initialised by the caller (the
    weight store); ``selector`` needs only Redis."""
    import torch

    if kind not in COMPONENTS:
        raise ValueError(f"unknown component {kind!r}; one of {COMPONENTS}")
    # 2 shared cores: intra-op threads would only fight the other components for them.
    torch.set_num_threads(1)
    transport = Transport(connect(redis_url), cfg.service.namespace)
    name = f"{kind}-{index}" if kind == "rollout" else kind
    with _stop_run_on_failure(transport, name):
        if kind == "selector":
            from selector.service import SelectorService

            selector = SelectorService(transport, cfg, consumer=f"selector-{index}")
            return Component(name, transport, selector.run)
        if policy_path is None:
            raise ValueError(f"{kind}: needs the policy path")
        if kind == "rollout":
            from services.rollout.actor import RolloutActor
            from services.weightsync.object_store import RayWeightSource

            source = RayWeightSource(cfg.service.namespace, cfg.service.wait_timeout_s)
            rollout = RolloutActor(cfg, transport, source, index, policy_path)
            return Component(name, transport, rollout.run)
        learner, shutdown = _build_learner(cfg, transport, policy_path, run_dir, index, detached_store)

        def learn() -> dict[str, Any]:
            try:
                return learner.run()
            finally:
                shutdown()

        return Component(name, transport, learn)


def run_component(kind: str, cfg: RunConfig, redis_url: str, **kwargs: Any) -> dict[str, Any]:
    """Build and run one component in this process until the run ends; returns its summary
    (``d3s rollout|selector|learner``). Keyword arguments as for :func:`build_component`."""
    return build_component(kind, cfg, redis_url, **kwargs).run()


def _build_learner(
    cfg: RunConfig,
    transport: Transport,
    policy_path: str,
    run_dir: str | Path | None,
    index: int,
    detached_store: bool,
) -> Any:
    from learner.engine import LearnerEngine
    from learner.service import LearnerService
    from services.policy.model import load_policy
    from services.weightsync.object_store import RayWeightPublisher, get_or_create_store

    model, tokenizer = load_policy(policy_path)
    shutdown: Callable[[], None] = lambda: None  # noqa: E731
    if cfg.learner.world_size > 1:
        from learner.multirank import start_ranks, stop_ranks

        engine, procs = start_ranks(cfg.learner, cfg.train.total_steps, policy_path, model)

        def shutdown() -> None:
            stop_ranks(engine, procs)
    else:
        engine = LearnerEngine(model, cfg.learner, cfg.train.total_steps)
    publisher = RayWeightPublisher(get_or_create_store(cfg.service.namespace, detached_store))
    service = LearnerService(transport, engine, cfg, consumer=f"learner-{index}",
                             run_dir=run_dir or cfg.train.run_dir, tokenizer=tokenizer,
                             publish_weights=publisher)  # fmt: skip
    return service, shutdown


class ComponentHost:
    """A Ray actor process hosting one component (``ray.remote`` is applied by the orchestrator):
    :meth:`prepare` builds it, :meth:`run` runs it."""

    def __init__(self, kind: str, cfg: RunConfig, redis_url: str, run_dir: str, index: int,
                 policy_path: str) -> None:  # fmt: skip
        self.kind, self.cfg, self.redis_url = kind, cfg, redis_url
        self.run_dir, self.index, self.policy_path = run_dir, index, policy_path
        self.name = f"{kind}-{index}" if kind == "rollout" else kind
        self.log_path = component_logging(Path(run_dir), self.name)
        self._component: Component | None = None

    def prepare(self) -> int:
        """Build the component (imports, model, DeepSpeed); returns this process's pid."""
        t0 = time.perf_counter()
        self._component = build_component(self.kind, self.cfg, self.redis_url, index=self.index,
                                          policy_path=self.policy_path, run_dir=self.run_dir)  # fmt: skip
        log.info("%s ready in %.1fs (pid %d)", self.name, time.perf_counter() - t0, os.getpid())
        return os.getpid()

    def run(self) -> dict[str, Any]:
        if self._component is None:
            self.prepare()
        assert self._component is not None
        return self._component.run()


# ---- the whole run -----------------------------------------------------------------------------


def _progress_row(t: Transport) -> tuple[int, dict[str, float], float | None, str]:
    """(steps trained, metrics, held-out accuracy, queue summary) read from Redis."""
    raw = t.read_hash(t.metrics_key)
    row: dict[str, float] = {}
    for k, v in raw.items():
        try:
            row[k] = float(v)
        except ValueError:
            continue
    stats = t.stats()
    acc = row.get("heldout_accuracy")
    # Short: the bar shares one terminal line with reward, accuracy and kept fractions.
    extra = (f"v{int(row.get('learner_version', 0))} | queue {t.backlog(t.groups_stream)}g "
             f"{t.backlog(t.batches_stream)}b | stale {stats.get('groups_stale', 0)} "
             f"skip {stats.get('batches_skipped', 0)}")  # fmt: skip
    return int(row.get("learner_version", 0)), row, acc, extra


def run_service(cfg: RunConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run the asynchronous (or lock-step) service to completion; returns a summary.

    Raises :class:`ServiceError` when a component fails (after stopping everything), and
    re-raises KeyboardInterrupt after the same clean-up.
    """
    _check_config(cfg)
    previous_sigterm = _sigterm_as_interrupt()
    try:
        return _run_service(cfg, run_dir)
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_as_interrupt() -> Any:
    """Make SIGTERM (docker stop, kill) take the Ctrl-C path, so it too stops every process.

    Returns the previous handler (None off the main thread, where signals cannot be handled).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _run_service(cfg: RunConfig, run_dir: Path | None) -> dict[str, Any]:
    import ray

    from services.api.serve import start_api, stop_api
    from services.run.prepare import prepare_policy
    from services.run.progress import StepProgress
    from services.transport.redis_server import connect_or_start
    from services.weightsync.object_store import RAY_NAMESPACE, get_or_create_store, store_name

    run_dir = Path(run_dir or cfg.train.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    svc = cfg.service
    t_start = time.perf_counter()
    redis_url, embedded = connect_or_start(svc.redis_url, run_dir)
    transport = Transport(connect(redis_url), svc.namespace)
    started_ray = False
    api_url: str | None = None
    actors: dict[str, Any] = {}
    store = None
    try:
        # Flags of an earlier session of the same run (its stop on exit) must not end this one.
        transport.clear_run_flags()
        policy_path = str(prepare_policy(cfg))
        if not ray.is_initialized():
            ray.init(address=svc.ray_address, namespace=RAY_NAMESPACE, include_dashboard=False,
                     log_to_driver=True, logging_level=logging.WARNING)  # fmt: skip
            started_ray = True
            _sigterm_as_interrupt()  # ray.init installs its own SIGTERM handler; ours comes first
        log.info("run %s (%s, preset %s): %d prompts x %d samples per step, %d steps, %d "
                 "rollout actors, max_staleness %d; Redis %s, run dir %s", cfg.name, svc.mode,
                 cfg.algorithm.preset, cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt,
                 cfg.train.total_steps, cfg.rollout.num_actors, svc.max_staleness, redis_url,
                 run_dir)  # fmt: skip
        if cfg.api.enabled:
            api_url = start_api(redis_url, svc.namespace, cfg.api.host, cfg.api.port,
                                cfg.control_token())  # fmt: skip
            log.info("HTTP API at %s (/schedule /metrics /metrics/prometheus /healthz)", api_url)
        # A store left by an earlier run in this Ray would hand out that run's weights.
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(store_name(svc.namespace), namespace=RAY_NAMESPACE))
        store = get_or_create_store(svc.namespace)
        host_cls = ray.remote(num_cpus=0, max_restarts=0)(ComponentHost)
        learner_gpus = 1 if cfg.learner.device != "cpu" and _cuda_available() else 0
        specs = [("learner", 0), ("selector", 0)] + [("rollout", i) for i in range(cfg.rollout.num_actors)]
        for kind, index in specs:
            name = f"{kind}-{index}" if kind == "rollout" else kind
            opts: dict[str, Any] = {"name": f"{svc.namespace}-{name}", "namespace": RAY_NAMESPACE}
            if kind == "learner":
                opts["num_gpus"] = learner_gpus
            actors[name] = host_cls.options(**opts).remote(kind, cfg, redis_url, str(run_dir),
                                                          index, policy_path)  # fmt: skip
        log.info("starting %s; logs in %s", ", ".join(actors), run_dir / "logs")
        _prepare_all(actors, svc.wait_timeout_s)
        results = _supervise(cfg, transport, actors, StepProgress)
    except BaseException as exc:
        reason = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"{exc}"
        # Best effort: when Redis itself is what failed, the original error is the one to see.
        with contextlib.suppress(Exception):
            transport.request_stop(f"orchestrator: {reason}")
        raise
    finally:
        _shutdown(transport, actors, store, api_url is not None, started_ray, embedded, stop_api)
    stats = results.pop("_stats")
    summary = {
        "mode": svc.mode, "steps": results["learner"].get("steps"),
        "final_heldout_accuracy": results["learner"].get("final_heldout_accuracy"),
        "wall_seconds": time.perf_counter() - t_start, "run_dir": str(run_dir),
        "redis_url": redis_url if embedded is None else None, "api_url": api_url,
        "counters": stats, "components": results,
    }  # fmt: skip
    return summary


def _prepare_all(actors: dict[str, Any], timeout_s: float) -> None:
    """Build every component before any loop starts, so none runs ahead while another is still
    importing torch (seconds each on a busy 2-core machine)."""
    import ray

    t0 = time.perf_counter()
    refs = {actors[name].prepare.remote(): name for name in actors}
    waiting = dict(refs)
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, timeout_s - (time.perf_counter() - t0)))
        if not ready:
            raise ServiceError(f"{', '.join(waiting.values())} not ready after {timeout_s:.0f}s")
        name = waiting.pop(ready[0])
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise ServiceError(f"{name} failed to start: {type(cause).__name__}: {cause}") from exc
    log.info("all %d components ready in %.1fs", len(actors), time.perf_counter() - t0)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a driver without torch can still orchestrate CPU actors
        return False


def _supervise(cfg: RunConfig, transport: Transport, actors: dict[str, Any], progress_cls: Any) -> dict[str, Any]:
    """Wait for the learner, showing progress; on a failure stop everything and raise."""
    import ray

    pending = {actors[name].run.remote(): name for name in actors}
    results: dict[str, Any] = {}
    bar = progress_cls(cfg.train.total_steps, 0, enabled=cfg.train.progress_bar,
                       description=f"{cfg.name} ({cfg.service.mode})")  # fmt: skip
    try:
        while "learner" not in results:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                name = pending.pop(ref)
                try:
                    results[name] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    transport.request_stop(f"{name} failed")
                    raise ServiceError(f"{name} failed: {type(cause).__name__}: {cause}") from exc
                log.info("%s finished: %s", name, _short(results[name]))
            step, row, acc, extra = _progress_row(transport)
            bar.update(step, row, acc, extra)
        if not transport.is_done():
            reason = transport.stop_reason() or "unknown reason"
            raise ServiceError(f"the learner stopped before the run was done: {reason}")
        step, row, acc, extra = _progress_row(transport)
        bar.update(step, row, acc, extra)
    finally:
        bar.close()
    # The learner is done: rollouts and the selector see it and return their reports.
    transport.request_stop("run complete")
    deadline = time.monotonic() + 30.0
    while pending and time.monotonic() < deadline:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.1, deadline - time.monotonic()))
        for ref in ready:
            name = pending.pop(ref)
            try:
                results[name] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                log.warning("%s failed while stopping: %s", name, exc)
    for name in pending.values():
        log.warning("%s did not stop within 30s; it will be killed", name)
    results["_stats"] = transport.stats()
    return results


def _short(result: Any) -> str:
    if isinstance(result, dict):
        keys = ("steps", "step", "batches_written", "groups_published", "versions_loaded")
        return ", ".join(f"{k}={result[k]}" for k in keys if k in result) or "ok"
    return str(result)


def _shutdown(transport: Transport, actors: dict[str, Any], store: Any, api: bool, started_ray: bool,
              embedded: Any, stop_api: Any) -> None:  # fmt: skip
    """Leave no process behind; every step runs even if an earlier one fails."""
    import ray

    for name, handle in [*actors.items(), ("weight store", store)]:
        if handle is None:
            continue
        try:
            ray.kill(handle, no_restart=True)
        except Exception as exc:  # already dead is fine; anything else is worth a line
            log.debug("killing %s: %s", name, exc)
    if api:
        try:
            stop_api()
        except Exception as exc:
            log.warning("stopping the API: %s", exc)
    if started_ray and ray.is_initialized():
        ray.shutdown()
    try:
        transport.client.close()
    finally:
        if embedded is not None:
            embedded.stop()
    log.info("shut down: actors killed%s%s%s", ", API stopped" if api else "",
             ", Ray stopped" if started_ray else "", ", Redis stopped" if embedded else "")

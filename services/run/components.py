"""Building one component of a run from the run config: the selector, a rollout actor, the learner.

Building (model loads, DeepSpeed start-up, Ray handles) is split from running, so that the
orchestrator can start every component's loop at the same moment, once all are built. The same
factory serves ``d3s run`` (each component in a Ray actor, :class:`ComponentHost`) and
``d3s rollout|selector|learner`` (one component in the calling process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from services.run.config import RunConfig
from services.telemetry.logfiles import LOG_FORMAT, file_handler, redirect_output
from services.transport.bundle import Transport
from services.transport.queue import connect

log = logging.getLogger(__name__)

COMPONENTS = ("rollout", "selector", "learner")
# Libraries whose INFO lines belong in a component's log file, not on the terminal.
NOISY_LOGGERS = (
    "DeepSpeed",
    "deepspeed",
    "torch.distributed",
    "urllib3",
    "httpx",
    "filelock",
    "transformers",
)


def component_name(kind: str, index: int) -> str:
    return f"{kind}-{index}" if kind == "rollout" else kind


def component_logging(run_dir: Path, name: str, capture_output: bool = False) -> Path:
    """In a component's process: INFO to ``run_dir/logs/<name>.log``, WARNING also to stderr.

    ``capture_output``: the process's stdout and stderr themselves (print, C++ logs, progress
    bars of Ray, DeepSpeed, transformers) go to the same file, and nothing to stderr.
    """
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    handlers: list[logging.Handler] = [file_handler(path)]
    if capture_output:
        redirect_output(path)
    else:
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        err.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(err)
    root = logging.getLogger()
    root.handlers = handlers
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # a library's warnings become records in the same file
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


def link_ray_logs(log_dir: Path) -> Path | None:
    """``log_dir/ray``: a link to this Ray session's log directory (the Serve controller, proxy
    and API replica, the raylet), so every log of a run is found under its run directory.
    Returns the link, or None when the session's directory is unknown (a Ray not started here)."""
    try:
        import ray

        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:  # a private API: the link is a convenience, never worth failing a run
        return None
    link = Path(log_dir) / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(logs, target_is_directory=True)
        return link
    return None


class Component:
    """A built component, ready to run: its name, its transport, and the loop to call."""

    def __init__(self, name: str, transport: Transport, loop: Callable[[], dict[str, Any]]) -> None:
        self.name, self.transport, self._loop = name, transport, loop

    def run(self) -> dict[str, Any]:
        """Run until the run ends; on failure ask the whole run to stop, then raise."""
        with stop_run_on_failure(self.transport, self.name):
            try:
                return self._loop()
            finally:
                self.transport.close()


@contextlib.contextmanager
def stop_run_on_failure(transport: Transport, name: str) -> Iterator[None]:
    # The others would otherwise wait out their timeouts for a component that is gone.
    try:
        yield
    except Exception as exc:
        with contextlib.suppress(Exception):  # Redis itself may be what failed
            transport.control.request_stop(f"{name} failed: {type(exc).__name__}: {exc}")
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
    # Cores are shared by every component of a run: intra-op threads would only fight.
    torch.set_num_threads(1)
    # A Redis restart is waited out, not fatal (the supervisor brings the embedded one back).
    transport = Transport.open(
        connect(redis_url, outage_s=cfg.service.redis_outage_s), cfg.service.namespace
    )
    name = component_name(kind, index)
    with stop_run_on_failure(transport, name):
        cfg = with_run_horizon(cfg, transport)
        if kind == "selector":
            from selector.service import SelectorService
            from services.policy.limits import model_limits

            limits = model_limits(policy_path) if policy_path else None
            selector = SelectorService(
                transport, cfg.selector_settings(limits), consumer=f"selector-{index}"
            )
            return Component(name, transport, selector.run)
        if policy_path is None:
            raise ValueError(f"{kind}: needs the policy path")
        if kind == "rollout":
            actor = _build_rollout(cfg, transport, policy_path, index)

            def roll() -> dict[str, Any]:
                try:
                    return actor.run()
                finally:
                    actor.weights.close()  # leave the broadcast group, release sockets

            return Component(name, transport, roll)
        learner, shutdown = _build_learner(
            cfg, transport, policy_path, run_dir, index, detached_store
        )

        def learn() -> dict[str, Any]:
            try:
                return learner.run()
            finally:
                shutdown()

        return Component(name, transport, learn)


def with_run_horizon(cfg: RunConfig, transport: Transport) -> RunConfig:
    """``cfg`` with the schedules' horizon the run in ``transport`` started with (claimed in its
    Redis by the first component of the run), so components started one by one (``d3s
    selector``, ``d3s learner``), which no resume check passed, also keep it. A different
    horizon given explicitly is refused."""
    horizon = transport.state.claim_schedule_horizon(cfg.train.horizon)
    if cfg.train.schedule_steps not in (None, horizon):
        raise ValueError(
            f"train.schedule_steps: {cfg.train.schedule_steps} given, but this run's schedules "
            f"span {horizon} steps (set at its first start and kept on resume); leave it unset "
            "to keep it, or start a new run"
        )
    if cfg.train.horizon == horizon:
        return cfg
    log.info("train.schedule_steps: the run's horizon of %d steps is kept", horizon)
    return cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"schedule_steps": horizon})}
    )


def run_component(kind: str, cfg: RunConfig, redis_url: str, **kwargs: Any) -> dict[str, Any]:
    """Build and run one component in this process until the run ends; returns its summary
    (``d3s rollout|selector|learner``). Keyword arguments as for :func:`build_component`."""
    return build_component(kind, cfg, redis_url, **kwargs).run()


def build_worker(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    name: str,
    device: str | None = None,
    *,
    model_path: str | Path | None = None,
    history: Any = None,
) -> Any:
    """A rollout worker (engine + tasks + prompt rendering and length limit). The engine is the
    HF one around ``model`` (``device``: where it runs, None: where the model is), or with
    ``rollout.engine: vllm`` a vLLM engine that loads ``model_path`` (``model`` unused). With
    ``rollout.prefilter.enabled`` it selects prompts with the streaks and p's in ``history``
    (a run's :class:`RunState`; None: in this process's memory, the in-process trainer)."""
    from services.rollout.prefilter import MemoryHistoryStore, Prefilter, PromptHistory
    from services.rollout.worker import RolloutWorker
    from services.tasks.prompting import PromptFormat
    from services.tasks.source import TaskSource

    r = cfg.rollout
    if r.engine == "vllm":
        from services.rollout.vllm_engine import VLLMRolloutEngine

        if model_path is None:
            raise ValueError("rollout.engine: vllm needs the policy's model directory")
        v = r.vllm_settings
        kv = None
        if r.num_gpus == 0:
            from services.rollout.vllm_memory import cpu_kv_cache, read_model_memory

            kv = cpu_kv_cache(r, read_model_memory(model_path))
            log.info(
                "vLLM KV cache on CPU: %g GiB (%s; the model and batch call for %g)",
                kv.gib,
                kv.source,
                kv.derived_gib,
            )
        engine: Any = VLLMRolloutEngine(
            model_path,
            tokenizer,
            r.max_new_tokens,
            r.temperature,
            r.top_p,
            gpu_memory_utilization=v.gpu_memory_utilization,
            tensor_parallel_size=v.tensor_parallel_size,
            enforce_eager=v.enforce_eager,
            max_model_len=v.max_model_len,
            dtype=v.dtype,
            seed=cfg.train.seed,
            cpu_kv_cache_gib=None if kv is None else kv.gib,
        )
    else:
        from services.rollout.hf_engine import HFRolloutEngine

        engine = HFRolloutEngine(
            model, tokenizer, r.max_new_tokens, r.temperature, r.top_p, device=device
        )
    return RolloutWorker(
        engine,
        TaskSource.from_config(cfg.task),
        r.samples_per_prompt,
        name=name,
        prompt_format=PromptFormat.from_task(cfg.task),
        max_prompt_tokens=r.max_prompt_tokens,
        prefilter=Prefilter(
            r.prefilter,
            PromptHistory(
                history if history is not None else MemoryHistoryStore(), r.prefilter.p_init
            ),
        )
        if r.prefilter.enabled
        else None,
    )


def heldout_prompts(cfg: RunConfig, tokenizer: Any) -> tuple[list, dict]:
    """The task's held-out prompts rendered as the rollouts render them (instruction, chat
    template), without those over ``rollout.max_prompt_tokens``, and the task's verifiers.

    Raises:
        ValueError: when no held-out prompt is within ``rollout.max_prompt_tokens``.
    """
    from services.policy.tokenizer import encode_text
    from services.tasks.prompting import PromptFormat
    from services.tasks.source import TaskSource

    source = TaskSource.from_config(cfg.task)
    prompts = PromptFormat.from_task(cfg.task).apply(tokenizer, source.heldout())
    limit = cfg.rollout.max_prompt_tokens
    if limit is not None:
        kept = [p for p in prompts if len(encode_text(tokenizer, p.text)) <= limit]
        if not kept:
            raise ValueError(f"rollout.max_prompt_tokens: {limit} is below every held-out prompt")
        if len(kept) < len(prompts):
            log.info(
                "evaluation: %d of %d held-out prompts exceed rollout.max_prompt_tokens=%d "
                "and are left out",
                len(prompts) - len(kept),
                len(prompts),
                limit,
            )
        prompts = kept
    return prompts, source.verifiers


def evaluation_metrics(result: Any) -> dict[str, float]:
    """The metric row of an :class:`EvalResult`: ``eval/*`` (greedy, pass@k, maj@k, mean length,
    per difficulty) and ``heldout_accuracy``, the greedy accuracy (pass@1 when greedy is off)."""
    row = result.metrics(prefix="eval/")
    greedy = result.greedy_accuracy
    row["heldout_accuracy"] = greedy if greedy is not None else result.pass_at_k.get(1, 0.0)
    return row


def run_evaluation(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    prompts: list | None = None,
    verifiers: Any = None,
    **changes: Any,
) -> Any:
    """Evaluate ``model`` on the task's held-out prompts as ``cfg.eval`` says (``changes``
    override its fields, e.g. ``n_samples``); returns the :class:`EvalResult`."""
    from services.evaluation.evaluate import evaluate_policy

    if prompts is None:
        prompts, verifiers = heldout_prompts(cfg, tokenizer)
    e = cfg.eval.model_copy(update=changes)
    return evaluate_policy(
        model,
        tokenizer,
        prompts,
        verifiers,
        n_samples=e.n_samples,
        ks=e.ks,
        temperature=e.temperature if e.temperature is not None else cfg.rollout.temperature,
        top_p=e.top_p if e.top_p is not None else cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens,
        seed=e.seed,
        greedy=e.greedy,
        batch_size=e.batch_size,
    )


def build_evaluator(cfg: RunConfig, tokenizer: Any) -> Callable[[Any], dict[str, float]]:
    """Held-out evaluation of a policy module, as every run reports it (``cfg.eval``): greedy
    accuracy as ``heldout_accuracy``, pass@k, maj@k and mean response length as ``eval/*``."""
    heldout, verifiers = heldout_prompts(cfg, tokenizer)

    def evaluate(model: Any) -> dict[str, float]:
        return evaluation_metrics(run_evaluation(cfg, model, tokenizer, heldout, verifiers))

    return evaluate


def _build_rollout(cfg: RunConfig, transport: Transport, policy_path: str, index: int) -> Any:
    from services.policy.model import load_policy, load_tokenizer
    from services.rollout.actor import RolloutActor
    from services.rollout.vllm_weights import rollout_receiver

    name = component_name("rollout", index)
    if cfg.rollout.engine == "vllm":  # vLLM loads the weights itself, in its own workers
        model, tokenizer = None, load_tokenizer(policy_path)
    else:
        model, tokenizer = load_policy(policy_path)
    worker = build_worker(
        cfg,
        model,
        tokenizer,
        name,
        device=rollout_device(cfg),
        model_path=policy_path,
        history=transport.state,
    )
    ws = cfg.weight_sync
    receiver = rollout_receiver(worker.engine, ws, cfg.service.namespace, name, transport.client)
    log.info(
        "%s: engine on %s, weights by %s",
        name,
        getattr(worker.engine, "device", cfg.rollout.engine),
        cfg.weight_sync.transport,
    )
    return RolloutActor(cfg.rollout_settings(), transport, receiver, worker, index)


def rollout_device(cfg: RunConfig) -> str | None:
    """``cuda`` when the rollout actors reserve GPUs (``rollout.num_gpus``) and one is visible
    (Ray's CUDA_VISIBLE_DEVICES makes the reserved one ``cuda:0``); None keeps the CPU."""
    import torch

    return "cuda" if cfg.rollout.num_gpus > 0 and torch.cuda.is_available() else None


def _build_learner(
    cfg: RunConfig,
    transport: Transport,
    policy_path: str,
    run_dir: str | Path | None,
    index: int,
    detached_store: bool,
) -> tuple[Any, Callable[[], None]]:
    from learner.engine import LearnerEngine
    from learner.service import LearnerService
    from services.policy.limits import model_limits
    from services.policy.model import load_policy, save_policy
    from services.run.placement import in_placement_group, node_address, start_followers
    from services.weightsync.factory import make_publisher

    model, tokenizer = load_policy(policy_path)
    settings = cfg.learner_settings(Path(run_dir) if run_dir else None)
    stop_followers: Callable[[], None] = lambda: None  # noqa: E731
    if cfg.learner.world_size > 1:
        from learner.multirank import start_ranks, stop_ranks

        launch = None
        if in_placement_group():  # under d3s run: followers in the learner's other bundles
            log_dir = str(settings.run_dir / "logs")

            def launch(world: int, port: int) -> tuple[str, list[Any]]:
                return start_followers(
                    world, port, cfg.learner, cfg.train.horizon, policy_path, log_dir
                )

        engine, procs = start_ranks(
            cfg.learner,
            cfg.train.horizon,
            policy_path,
            model,
            launch=launch,
            master_addr=node_address(),
        )

        def stop_followers() -> None:
            stop_ranks(engine, procs)
    else:
        engine = LearnerEngine(model, cfg.learner, cfg.train.horizon)
    ns = cfg.service.namespace
    if cfg.weight_sync.transport == "object_store":
        from services.weightsync.ray_store import get_or_create_store

        get_or_create_store(ns, detached_store)  # the publisher below finds it
    publisher = make_publisher(
        cfg.weight_sync, ns, host=node_address(), redis_client=transport.client
    )

    def shutdown() -> None:
        try:
            stop_followers()
        finally:
            publisher.close()  # a catch-up write in flight finishes first

    snapshot_eval = None
    if cfg.eval.background and _ray_initialized():
        from services.run.evaluator import RayEvaluator

        snapshot_eval = RayEvaluator(cfg, policy_path, settings.run_dir)
    elif cfg.eval.background:
        log.info("learner: no Ray here, so held-out evaluation runs between steps")
    service = LearnerService(
        transport,
        engine,
        settings,
        consumer=f"learner-{index}",
        evaluate=None if snapshot_eval else build_evaluator(cfg, tokenizer),
        snapshot_eval=snapshot_eval,
        export=lambda module: save_policy(module, tokenizer, settings.run_dir / "final_policy"),
        publisher=publisher,
        limits=model_limits(policy_path),
        logger_kwargs=cfg.logger_kwargs(),
    )
    return service, shutdown


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def ray_node_id() -> str:
    """The Ray node this process runs on ('-' outside Ray): logged, so a run's logs say where
    each component was placed."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
    except Exception:  # a log line is not worth failing a component
        return "-"


class ComponentHost:
    """A Ray actor process hosting one component (``ray.remote`` is applied by the orchestrator):
    :meth:`prepare` builds it, :meth:`run` runs it."""

    def __init__(
        self,
        kind: str,
        cfg: RunConfig,
        redis_url: str,
        run_dir: str,
        index: int,
        policy_path: str,
        capture_output: bool = True,
    ) -> None:
        self.kind, self.cfg, self.redis_url = kind, cfg, redis_url
        self.run_dir, self.index, self.policy_path = run_dir, index, policy_path
        self.name = component_name(kind, index)
        self.log_path = component_logging(Path(run_dir), self.name, capture_output)
        self._component: Component | None = None

    def prepare(self) -> int:
        """Build the component (imports, model, DeepSpeed); returns this process's pid."""
        t0 = time.perf_counter()
        self._component = build_component(
            self.kind,
            self.cfg,
            self.redis_url,
            index=self.index,
            policy_path=self.policy_path,
            run_dir=self.run_dir,
        )
        log.info(
            "%s ready in %.1fs (pid %d, node %s)",
            self.name,
            time.perf_counter() - t0,
            os.getpid(),
            ray_node_id(),
        )
        return os.getpid()

    def run(self) -> dict[str, Any]:
        if self._component is None:
            self.prepare()
        assert self._component is not None
        return self._component.run()

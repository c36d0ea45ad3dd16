"""Building the learner from the run config: its engine (one rank, or rank 0 of several with
the followers started beside it), the weight publisher, and its held-out evaluation (between
steps, or in the background evaluator actor)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.run.config import RunConfig
from services.transport.bundle import Transport

log = logging.getLogger(__name__)


def build_learner(
    cfg: RunConfig,
    transport: Transport,
    policy_path: str,
    run_dir: str | Path | None,
    index: int,
    detached_store: bool,
) -> tuple[Any, Callable[[], None]]:
    """The learner service and the function that stops what it started (follower ranks, the
    publisher). ``detached_store``: the object-store transport's weight store outlives this
    process (``d3s learner``, whose rollout actors run elsewhere)."""
    from learner.export_lora import adapter_config, save_final_adapter
    from learner.service import LearnerService
    from services.policy.limits import model_limits
    from services.policy.model import load_policy, save_policy
    from services.run.build_rollout import engine_dtype
    from services.run.placement import node_address
    from services.weightsync.factory import make_publisher

    model, tokenizer = load_policy(policy_path)
    settings = cfg.learner_settings(Path(run_dir) if run_dir else None)
    engine, stop_followers = _learner_engine(cfg, model, policy_path, settings.run_dir)
    engine.set_sync_dtype(engine_dtype(cfg))  # a LoRA adapter travels in the engines' dtype
    ns = cfg.service.namespace
    if cfg.weight_sync.transport == "object_store":
        from services.weightsync.ray_store import get_or_create_store

        get_or_create_store(ns, detached_store)  # the publisher below finds it
    publisher = make_publisher(
        cfg.weight_sync,
        ns,
        host=node_address(),
        redis_client=transport.client,
        adapter_config=adapter_config(engine.module),  # LoRA: each version a PEFT directory
    )
    final = settings.run_dir / "final_policy"

    def shutdown() -> None:
        try:
            stop_followers()
        finally:
            publisher.close()  # a catch-up write in flight finishes first

    evaluate, snapshot_eval = _evaluation(cfg, policy_path, settings.run_dir, tokenizer)
    service = LearnerService(
        transport,
        engine,
        settings,
        consumer=f"learner-{index}",
        evaluate=evaluate,
        snapshot_eval=snapshot_eval,
        # LoRA: the adapter gathered through the engine (at ZeRO-3 the module holds shards)
        export=(
            (lambda module: save_final_adapter(engine, tokenizer, final))
            if cfg.learner.lora is not None
            else (lambda module: save_policy(module, tokenizer, final))
        ),
        publisher=publisher,
        limits=model_limits(policy_path),
        logger_kwargs=cfg.logger_kwargs(),
    )
    return service, shutdown


def _learner_engine(
    cfg: RunConfig, model: Any, policy_path: str, run_dir: Path
) -> tuple[Any, Callable[[], None]]:
    """The learner engine of rank 0 and what stops the other ranks (nothing with one rank)."""
    from learner.engine import LearnerEngine
    from services.run.placement import in_placement_group, node_address, start_followers

    if cfg.learner.world_size == 1:
        return LearnerEngine(model, cfg.learner, cfg.train.horizon), lambda: None
    from learner.multirank import start_ranks, stop_ranks

    launch = None
    if in_placement_group():  # under d3s run: followers in the learner's other bundles
        log_dir = str(run_dir / "logs")

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
    return engine, lambda: stop_ranks(engine, procs)


def _evaluation(cfg: RunConfig, policy_path: str, run_dir: Path, tokenizer: Any) -> tuple[Any, Any]:
    """``(evaluate, snapshot_eval)`` for the learner: the background evaluator actor when
    ``eval.background`` and Ray is up, else held-out evaluation between steps."""
    from services.run.evaluator import RayEvaluator, build_evaluator

    if cfg.eval.background and _ray_initialized():
        return None, RayEvaluator(cfg, policy_path, run_dir)
    if cfg.eval.background:
        log.info("learner: no Ray here, so held-out evaluation runs between steps")
    return build_evaluator(cfg, tokenizer), None


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()

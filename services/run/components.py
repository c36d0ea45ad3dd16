"""Building one component of a run from the run config: the selector, a rollout actor, the learner.

Building (model loads, DeepSpeed start-up, Ray handles) is split from running, so that the
orchestrator can start every component's loop at the same moment, once all are built. The same
factory serves ``d3s run`` (each component in a Ray actor, :class:`ComponentHost`) and
``d3s rollout|selector|learner`` (one component in the calling process). What goes into a
rollout actor is in :mod:`services.run.build_rollout`, into the learner in
:mod:`services.run.build_learner`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from services.run.config import RunConfig
from services.run.logs import component_logging, ray_node_id
from services.transport.bundle import Transport
from services.transport.queue import connect

log = logging.getLogger(__name__)

COMPONENTS = ("rollout", "selector", "learner")


def component_name(kind: str, index: int) -> str:
    return f"{kind}-{index}" if kind == "rollout" else kind


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
            from services.run.build_rollout import build_rollout

            actor = build_rollout(cfg, transport, policy_path, index, name)

            def roll() -> dict[str, Any]:
                try:
                    return actor.run()
                finally:
                    actor.weights.close()  # leave the broadcast group, release sockets

            return Component(name, transport, roll)
        from services.run.build_learner import build_learner

        learner, shutdown = build_learner(
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

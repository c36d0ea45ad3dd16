"""Where each component of a ``d3s run`` goes: Ray resources per role, and a placement group
that holds the learner's ranks.

One plan covers three shapes of machine:

- one CPU box (the tests): no GPUs, no role resources; every component shares the node and
  reserves (almost) no CPU, since on a small machine reserved CPUs would leave no room for all of
  them and they take turns anyway;
- one multi-GPU host: each learner rank gets one GPU in its bundle, each rollout actor
  ``rollout.num_gpus``; Ray's ``CUDA_VISIBLE_DEVICES`` then gives every process its own GPU as
  ``cuda:0``;
- a cluster whose nodes advertise role resources (``d3s_learner``, ``d3s_rollout``,
  ``d3s_selector``, as ``deploy/cluster.yaml`` does, one unit per GPU or per service): a
  component asks for one unit of its role's resource, but only when the cluster defines it, so
  the same config runs on a box that defines none.

The learner's ranks live in one placement group, one bundle per rank (PACK: on as few nodes as
fit, so ranks share NVLink where they can). Rank 0 is the learner's component host in bundle 0;
it starts ranks 1..N-1 as Ray actors in bundles 1..N-1 (:func:`start_followers`) and gives them
its own node address as ``MASTER_ADDR``, so a learner may span nodes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: a CPU bundle must reserve something; this share lets every bundle fit on a busy 2-core box
CPU_TOKEN = 0.01
ROLES = ("learner", "rollout", "selector", "api")


def role_resource(role: str) -> str:
    """The custom resource a cluster node advertises for ``role`` (``d3s_rollout``)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    return f"d3s_{role}"


def role_resources(role: str, cluster: Mapping[str, float]) -> dict[str, float]:
    """One unit of the role's resource when the cluster defines it (``ray.cluster_resources()``),
    else nothing: a box without role resources places every role anywhere."""
    key = role_resource(role)
    return {key: 1.0} if cluster.get(key, 0.0) > 0 else {}


@dataclass(frozen=True)
class PlacementPlan:
    """What each component asks Ray for.

    ``learner_bundles``: one resource dict per learner rank (rank r in bundle r).
    ``rollout``, ``selector``: the actor resources of each rollout actor and of the selector, as
    ``num_cpus`` / ``num_gpus`` / ``resources`` options.
    """

    learner_bundles: list[dict[str, float]]
    learner_gpu: bool
    rollout: dict[str, Any] = field(default_factory=dict)
    selector: dict[str, Any] = field(default_factory=dict)

    def learner_rank_options(self, rank: int) -> dict[str, Any]:
        """Actor options matching bundle ``rank`` (an actor in a bundle asks for at most it)."""
        bundle = dict(self.learner_bundles[rank])
        opts: dict[str, Any] = {
            "num_cpus": bundle.pop("CPU", 0.0),
            "num_gpus": bundle.pop("GPU", 0.0),
        }
        if bundle:
            opts["resources"] = bundle
        return opts


def plan_placement(
    world_size: int, learner_gpu: bool, rollout_gpus: float, cluster: Mapping[str, float]
) -> PlacementPlan:
    """The plan for a learner of ``world_size`` ranks (one GPU each when ``learner_gpu``), rollout
    actors of ``rollout_gpus`` GPUs each, on a cluster with ``cluster`` resources in total.

    Raises ValueError naming the config field when the cluster cannot hold the learner's ranks
    or one rollout actor (a placement group would otherwise wait forever)."""
    if learner_gpu and cluster.get("GPU", 0.0) < world_size:
        raise ValueError(
            f"learner.world_size: {world_size} ranks need {world_size} GPUs; the "
            f"Ray cluster has {cluster.get('GPU', 0.0):g}"
        )
    if rollout_gpus > cluster.get("GPU", 0.0):
        raise ValueError(
            f"rollout.num_gpus: {rollout_gpus:g} per actor; the Ray cluster has "
            f"{cluster.get('GPU', 0.0):g} GPUs"
        )
    base = {"GPU": 1.0} if learner_gpu else {"CPU": CPU_TOKEN}
    bundles = [{**base, **role_resources("learner", cluster)} for _ in range(world_size)]
    rollout: dict[str, Any] = {"num_cpus": 0, "num_gpus": rollout_gpus}
    selector: dict[str, Any] = {"num_cpus": 0, "num_gpus": 0}
    for opts, role in ((rollout, "rollout"), (selector, "selector")):
        if extra := role_resources(role, cluster):
            opts["resources"] = extra
    return PlacementPlan(bundles, learner_gpu, rollout, selector)


def learner_placement_group(plan: PlacementPlan, timeout_s: float) -> Any:
    """Reserve the learner's bundles (PACK) and wait until they are placed; raises TimeoutError
    naming what was asked when the cluster cannot place them in ``timeout_s``."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(plan.learner_bundles, strategy="PACK", name="")
    import ray

    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise TimeoutError(
            f"the learner's {len(plan.learner_bundles)} bundles "
            f"{plan.learner_bundles} could not be placed in {timeout_s:.0f}s; "
            "check learner.world_size and the cluster's GPUs and d3s_learner "
            "resources"
        )
    return pg


def remove_group(pg: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)


def host_options(kind: str, plan: PlacementPlan, pg: Any) -> dict[str, Any]:
    """Ray actor options of a component host: the learner in bundle 0 of ``pg``, the others
    from the plan."""
    if kind == "learner":
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {
            **plan.learner_rank_options(0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0
            ),
        }
    return dict(plan.rollout if kind == "rollout" else plan.selector)


def node_address() -> str:
    """This node's address as other nodes reach it (the Ray node's IP; loopback without Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except Exception:  # an address is all that is wanted here; loopback is always right locally
        pass
    return "127.0.0.1"


def in_placement_group() -> bool:
    """Whether this process is a Ray actor placed in a placement group (the learner's host)."""
    try:
        import ray

        return ray.is_initialized() and ray.util.get_current_placement_group() is not None
    except Exception:
        return False


class RayFollower:
    """A follower rank in a Ray actor in bundle ``rank`` of this actor's placement group; the
    ``join``/``is_alive``/``kill`` of a process, for :func:`learner.multirank.stop_ranks`."""

    def __init__(
        self,
        rank: int,
        world: int,
        master_addr: str,
        port: int,
        learner_cfg: Any,
        schedule_steps: int,
        policy_path: str,
        log_dir: str | None,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from learner.multirank import FollowerRank

        pg = ray.util.get_current_placement_group()
        bundle = pg.bundle_specs[rank]
        opts: dict[str, Any] = {
            "num_cpus": bundle.get("CPU", 0.0),
            "num_gpus": bundle.get("GPU", 0.0),
        }
        extra = {
            k: v
            for k, v in bundle.items()
            if k not in ("CPU", "GPU", "memory") and not k.startswith("bundle_group")
        }
        if extra:
            opts["resources"] = extra
        cls = ray.remote(max_restarts=0)(FollowerRank)
        self.rank = rank
        self.actor = cls.options(
            **opts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=rank
            ),
        ).remote(log_dir)
        self.ref = self.actor.run.remote(
            rank, world, master_addr, port, learner_cfg, schedule_steps, policy_path
        )
        self.pid: Any = f"ray actor (bundle {rank})"

    def join(self, timeout: float | None = None) -> None:
        import ray

        ray.wait([self.ref], timeout=timeout)

    def is_alive(self) -> bool:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        return not ready

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


def start_followers(
    world: int,
    port: int,
    learner_cfg: Any,
    schedule_steps: int,
    policy_path: str,
    log_dir: str | None = None,
) -> tuple[str, list[RayFollower]]:
    """From the learner's host (rank 0, bundle 0): ranks 1..world-1 as Ray actors in the other
    bundles; returns ``(MASTER_ADDR, followers)`` with this node's address as MASTER_ADDR."""
    master = node_address()
    t0 = time.perf_counter()
    followers = [
        RayFollower(r, world, master, port, learner_cfg, schedule_steps, policy_path, log_dir)
        for r in range(1, world)
    ]
    log.info(
        "learner: followers 1..%d started as Ray actors in %.1fs; MASTER_ADDR %s:%d (pid %d)",
        world - 1,
        time.perf_counter() - t0,
        master,
        port,
        os.getpid(),
    )
    return master, followers

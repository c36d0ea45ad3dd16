"""Placement plans for one CPU box, one multi-GPU host and a cluster with role resources."""

from __future__ import annotations

import pytest

from services.run.placement import CPU_TOKEN, plan_placement, role_resources

CPU_BOX = {"CPU": 2.0, "memory": 1e9}
GPU_HOST = {"CPU": 64.0, "GPU": 8.0}
CLUSTER = {"CPU": 64.0, "GPU": 6.0, "d3s_learner": 4.0, "d3s_rollout": 2.0, "d3s_selector": 1.0}


def test_a_cpu_box_places_everything_on_cpu_without_role_resources() -> None:
    plan = plan_placement(2, learner_gpu=False, rollout_gpus=0.0, cluster=CPU_BOX)
    assert plan.learner_bundles == [{"CPU": CPU_TOKEN}, {"CPU": CPU_TOKEN}]
    assert plan.learner_rank_options(1) == {"num_cpus": CPU_TOKEN, "num_gpus": 0.0}
    assert plan.rollout == {"num_cpus": 0, "num_gpus": 0.0}
    assert plan.selector == {"num_cpus": 0, "num_gpus": 0}


def test_a_gpu_host_gives_each_rank_a_gpu_and_each_rollout_its_share() -> None:
    plan = plan_placement(4, learner_gpu=True, rollout_gpus=1.0, cluster=GPU_HOST)
    assert plan.learner_bundles == [{"GPU": 1.0}] * 4
    assert plan.learner_rank_options(3) == {"num_cpus": 0.0, "num_gpus": 1.0}
    assert plan.rollout["num_gpus"] == 1.0 and "resources" not in plan.rollout


def test_a_cluster_with_role_resources_pins_each_role() -> None:
    plan = plan_placement(2, learner_gpu=True, rollout_gpus=1.0, cluster=CLUSTER)
    assert plan.learner_bundles == [{"GPU": 1.0, "d3s_learner": 1.0}] * 2
    assert plan.learner_rank_options(0)["resources"] == {"d3s_learner": 1.0}
    assert plan.rollout["resources"] == {"d3s_rollout": 1.0}
    assert plan.selector["resources"] == {"d3s_selector": 1.0}
    assert role_resources("api", CLUSTER) == {}  # not defined there: anywhere


def test_impossible_requests_name_the_field() -> None:
    with pytest.raises(
        ValueError, match=r"learner.world_size: 2 ranks need 2 GPUs; the Ray cluster has 1"
    ):
        plan_placement(2, learner_gpu=True, rollout_gpus=0.0, cluster={"GPU": 1.0})
    with pytest.raises(ValueError, match=r"rollout.num_gpus: 2 per actor"):
        plan_placement(1, learner_gpu=False, rollout_gpus=2.0, cluster=GPU_HOST | {"GPU": 1.0})
    with pytest.raises(ValueError, match="unknown role"):
        role_resources("critic", CLUSTER)

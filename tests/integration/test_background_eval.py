"""Held-out evaluation in its own Ray actor: the same numbers as evaluating between steps, at most
``eval.max_pending`` snapshots waiting, and a failed or killed evaluator never stops training;
the reporter puts each late result into its step's row."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from services.run.config import parse_config
from services.run.evaluator import build_evaluator
from services.telemetry.reporter import RunReporter
from services.telemetry.run_log import read_metrics

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def setup(tiny_config, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from services.policy.model import PolicySpec, build_policy, save_policy
    from services.policy.tokenizer import CharTokenizer

    cfg = parse_config(
        tiny_config(
            tmp_path / "run",
            tmp_path_factory.getbasetemp() / "ws",
            task={"type": "arithmetic", "digits": 1, "heldout_size": 30},
            eval={"n_samples": 4, "ks": [1, 4], "max_pending": 2},
        )
    )
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), tok)
    path = save_policy(model, tok, tmp_path / "policy")
    return cfg, model, tok, str(path), tmp_path / "run"


def _perturbed(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_snapshots_evaluate_as_inline_and_land_in_their_rows(local_ray, setup) -> None:
    from services.run.evaluator import RayEvaluator

    cfg, model, tok, path, run_dir = setup
    inline = build_evaluator(cfg, tok)
    snapshots = {step: _perturbed(model, step) for step in (0, 2, 4)}
    evaluator = RayEvaluator(cfg, path, run_dir)

    reporter = RunReporter(
        run_dir, 4, 2, background=evaluator, snapshot=snapshots.__getitem__, tensorboard=False
    )
    for step in range(5):
        reporter.record(step, {"loss": float(step)})
        assert len(evaluator.pending) <= cfg.eval.max_pending
    reporter.finish("t")
    reporter.close()

    rows = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    for step, weights in snapshots.items():
        model.load_state_dict(weights)
        expected = inline(model)
        got = {k: rows[step][k] for k in expected}
        assert got == pytest.approx(expected), step
        assert rows[step]["loss"] == float(step) and rows[step]["eval_step"] == step
        assert rows[step]["eval_wall_time"] >= rows[step]["wall_time"]
    assert "heldout_accuracy" not in rows[1] and "heldout_accuracy" not in rows[3]
    assert reporter.last_eval["heldout_accuracy"] == rows[4]["heldout_accuracy"]
    assert (run_dir / "logs" / "evaluator.log").is_file()


def test_a_failing_or_killed_evaluator_never_stops_training(local_ray, setup) -> None:
    from services.run.evaluator import RayEvaluator

    cfg, model, _, path, run_dir = setup
    evaluator = RayEvaluator(cfg, path, run_dir)
    evaluator.submit(0, {"not.a.weight": torch.zeros(1)})  # load_state_dict raises in the actor
    evaluator.submit(1, model.state_dict())
    done = evaluator.results(wait=True)
    assert [s for s, _ in done] == [1] and evaluator.failed == 1

    ray.kill(evaluator.actor)
    time.sleep(0.5)
    evaluator.submit(2, model.state_dict())  # the dead actor fails this one: a new one retries it
    assert [s for s, _ in evaluator.results(wait=True)] == [2]
    assert evaluator.failed == 1 and evaluator.restarts == 1
    evaluator.submit(3, model.state_dict())
    assert [s for s, _ in evaluator.results(wait=True)] == [3]
    evaluator.close()


class _KillsItsReader:
    """Unpickled in the evaluator, it ends the evaluator's process (as the OOM killer would)."""

    def __reduce__(self):
        return (os._exit, (1,))


def test_a_snapshot_whose_evaluator_dies_twice_is_skipped(local_ray, setup) -> None:
    from services.run.evaluator import RayEvaluator

    cfg, model, _, path, run_dir = setup
    evaluator = RayEvaluator(cfg, path, run_dir)
    evaluator.submit(0, {"w": _KillsItsReader()})  # kills the evaluator, then its replacement
    assert evaluator.results(wait=True) == []
    assert evaluator.restarts == 1 and evaluator.failed == 1 and not evaluator.pending
    evaluator.submit(1, model.state_dict())  # and the next snapshot still gets evaluated
    assert [s for s, _ in evaluator.results(wait=True)] == [1]
    evaluator.close()


def test_an_evaluator_gpu_the_cluster_lacks_is_refused_at_once(local_ray, setup) -> None:
    from services.run.evaluator import RayEvaluator

    cfg, _, _, path, run_dir = setup
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_gpus": 1.0})})
    with pytest.raises(
        ValueError, match=r"^eval.num_gpus: 1 for the evaluator; the Ray cluster has 0 GPUs"
    ):
        RayEvaluator(cfg, path, run_dir)

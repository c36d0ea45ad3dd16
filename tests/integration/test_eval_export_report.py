"""`d3s eval`, `d3s export` and `d3s report` on two tiny runs: addition under ZeRO-1 and the mixed
task under ZeRO-3 (world size 1), each trained 2 steps with a checkpoint at every step."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from learner.engine import LearnerEngine
from learner.export import checkpoint_steps, consolidated_state_dict
from services.policy.model import load_policy
from services.run.cli import app
from services.run.config import parse_config
from services.run.prepare import prepare_policy
from services.run.trainer import SyncTrainer
from services.telemetry.report import FIGURES
from services.telemetry.run_log import read_metrics

pytestmark = pytest.mark.integration
runner = CliRunner()

RUNS = {
    "add-z1": {
        "task": {"type": "arithmetic", "digits": 1, "heldout_size": 24},
        "learner": {"zero_stage": 1},
    },
    "mix-z3": {
        "task": {"type": "mixed", "levels": [1], "heldout_size": 24},
        "learner": {"zero_stage": 3},
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config_module):
    """name -> (run dir, config file, parsed config), each run trained 2 steps."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, over in RUNS.items():
        data = tiny_config_module(
            root / name,
            root / "ws_cache",
            task=over["task"],
            warmstart={"steps": 150, "band": None, "lr": 3e-3, "eval_prompts": 0},
            learner={**over["learner"], "lr": 1e-3},
            train={"total_steps": 2, "eval_every": 1, "checkpoint_every": 1},
        )
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(json.loads(json.dumps(data))))
        cfg = parse_config(data)
        SyncTrainer(cfg).run()
        out[name] = (root / name, path, cfg)
    return out


@pytest.fixture(scope="module")
def tiny_config_module():
    from tests.conftest import _merge

    def build(run_dir, cache_dir, **sections):
        base = {
            "name": "tiny",
            "policy": {"n_layer": 1, "n_embd": 32, "n_head": 2},
            "warmstart": {"cache_dir": str(cache_dir)},
            "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4},
            "eval": {"n_samples": 4, "ks": [1, 4]},
            "train": {"run_dir": str(run_dir), "progress_bar": False},
            "api": {"enabled": False},
        }
        return _merge(base, sections)

    return build


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", list(RUNS))
def test_export_matches_the_engine_module(runs, name, tmp_path):
    run_dir, _, cfg = runs[name]
    assert checkpoint_steps(run_dir / "checkpoints") == [1, 2]
    result = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "hf"), "--step", "1"])
    assert result.exit_code == 0, result.output
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = torch.tensor([tokenizer.encode("3+4=", add_special_tokens=False)])

    # The engine's own module, resumed from the same checkpoint (under ZeRO-3 its forward gathers
    # the partitioned parameters).
    model, _ = load_policy(prepare_policy(cfg))
    engine = LearnerEngine(model, cfg.learner, cfg.train.total_steps)
    engine.engine.load_checkpoint(str(run_dir / "checkpoints"), tag="step0000001")
    engine.engine.eval()
    torch.testing.assert_close(
        _logits(exported, ids), _logits(engine.engine, ids), rtol=1e-5, atol=1e-5
    )

    # Step 2 is the final policy the trainer saved; where step 2 trained, step 1 differs from it.
    final, _ = load_policy(run_dir / "final_policy")
    step2 = consolidated_state_dict(run_dir / "checkpoints", 2)
    assert all(torch.equal(step2[k], v) for k, v in final.state_dict().items() if k in step2)
    if "loss" in read_metrics(run_dir / "metrics.jsonl")[2]:
        assert not torch.allclose(_logits(exported, ids), _logits(final, ids))
    if cfg.learner.zero_stage == 3:
        # The module file holds placeholders only: the weights came from the fp32 partitions.
        (states,) = (run_dir / "checkpoints" / "step0000001").glob("*model_states.pt")
        saved = torch.load(states, map_location="cpu", weights_only=False)
        assert all(t.numel() == 0 for t in saved["module"].values() if t.dtype.is_floating_point)


def test_export_errors_name_the_problem(runs, tmp_path):
    run_dir = runs["add-z1"][0]
    bad = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "x"), "--step", "7"])
    assert bad.exit_code == 2 and "--step 7" in bad.output and "[1, 2]" in bad.output
    none = runner.invoke(app, ["export", str(tmp_path), str(tmp_path / "x")])
    assert none.exit_code == 2 and "--policy" in none.output


def test_eval_of_the_final_policy_reproduces_the_runs_last_evaluation(runs):
    run_dir, config, _ = runs["mix-z3"]
    result = runner.invoke(app, ["eval", str(run_dir), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "pass@4" in result.output and "difficulty" in result.output
    record = json.loads((run_dir / "eval.json").read_text())
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    # Same weights, prompts, seed and settings as the run's own evaluation at its last step.
    assert record["overall"]["greedy_accuracy"] == pytest.approx(last["heldout_accuracy"])
    assert record["overall"]["pass_at_k"]["4"] == pytest.approx(last["eval/pass@4"])
    assert record["by_difficulty"]["1"]["n_prompts"] == 24 and "eval/pass@1/d1" in last
    assert record["n_samples"] == 4 and record["ks"] == [1, 4]


def test_eval_of_a_step_and_of_a_model_dir(runs, tmp_path):
    run_dir, config, _ = runs["add-z1"]
    res = runner.invoke(
        app,
        [
            "eval",
            str(run_dir),
            "--config",
            str(config),
            "--step",
            "1",
            "--n",
            "8",
            "--k",
            "1",
            "--k",
            "8",
            "--temperature",
            "0.7",
        ],
    )
    assert res.exit_code == 0, res.output
    rec = json.loads((run_dir / "eval" / "step-1.json").read_text())
    assert rec["step"] == 1 and rec["n_samples"] == 8 and rec["temperature"] == 0.7
    assert set(rec["overall"]["pass_at_k"]) == {"1", "8"}
    assert 0.0 <= rec["overall"]["pass_at_k"]["1"] <= rec["overall"]["pass_at_k"]["8"] <= 1.0

    out = tmp_path / "m.json"
    res = runner.invoke(
        app,
        [
            "eval",
            str(run_dir / "final_policy"),
            "--config",
            str(config),
            "--n",
            "0",
            "--k",
            "1",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2 and "n_samples" in res.output  # n < k is refused, naming the field
    res = runner.invoke(
        app, ["eval", str(run_dir / "final_policy"), "--config", str(config), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["overall"]["greedy_accuracy"] is not None


def test_report_writes_every_figure_for_two_runs(runs, tmp_path):
    dirs = [str(runs[n][0]) for n in RUNS]
    res = runner.invoke(app, ["report", *dirs, "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    for name in FIGURES:
        assert (tmp_path / "rep" / name).stat().st_size > 5_000, name
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "metrics.jsonl" in bad.output

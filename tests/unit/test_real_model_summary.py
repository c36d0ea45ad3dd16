"""bench.real_model's summary read back from metrics.jsonl files as training writes them (step
rows, then evaluation rows merged into their step): per-task Pass@1 curves from the
``eval/pass@1/src:<source>`` keys, each task's bar (GRPO's final Pass@1 on it) and the first
evaluation at or above it, and a single-source run's summary left as it was. No training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import real_model

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = REPO / ".cache" / "models" / "smollm2-135m-instruct"
STEPS = [0, 2, 4]
# Pass@1 per (preset, seed, task) at STEPS. GRPO's mean final on products is 0.3, reached by
# D3S at step 2; on leg_counting GRPO ends below its start (no gain).
PASS1 = {
    ("grpo", 0): {"products": [0.1, 0.2, 0.3], "leg_counting": [0.2, 0.1, 0.1]},
    ("grpo", 1): {"products": [0.1, 0.2, 0.3], "leg_counting": [0.2, 0.1, 0.1]},
    ("d3s", 0): {"products": [0.1, 0.4, 0.5], "leg_counting": [0.2, 0.0, 0.3]},
    ("d3s", 1): {"products": [0.1, 0.2, 0.5], "leg_counting": [0.2, 0.0, 0.3]},
}
TOKENS_PER_STEP = {"grpo": 1000.0, "d3s": 100.0}


def _write_run(out: Path, preset: str, seed: int, per_source: bool) -> None:
    run = real_model._run_dir(out, preset, seed)
    run.mkdir(parents=True)
    lines = []
    for i, step in enumerate(STEPS):
        tasks = PASS1[(preset, seed)]
        if step:
            lines.append(
                {
                    "step": step,
                    "reward_mean": 0.1 * i,
                    "learner_tokens_total": TOKENS_PER_STEP[preset] * step,
                    "learner_seconds_total": 10.0 * step,
                }
            )
        pass1 = float(np.mean([c[i] for c in tasks.values()]))
        row = {
            "row": "eval",
            "step": step,
            "heldout_accuracy": pass1,
            "eval/greedy_accuracy": pass1,
            "eval/pass@1": pass1,
            "eval/pass@4": min(1.0, 2 * pass1),
            "eval/format_rate": 0.5,
            "eval/mean_response_length": 20.0,
        }
        if not step:
            row |= {"learner_tokens_total": 0.0, "learner_seconds_total": 0.0}
        if per_source:
            for src, curve in tasks.items():
                row[f"eval/pass@1/src:{src}"] = curve[i]
                row[f"eval/greedy_accuracy/src:{src}"] = curve[i] / 2
        lines.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "wall_seconds").write_text("60.0\n")


def _runs(out: Path, per_source: bool = True) -> Path:
    for preset, seed in PASS1:
        _write_run(out, preset, seed, per_source)
    return out


def test_per_task_curves_and_first_reach(tmp_path):
    s = real_model.summarise(_runs(tmp_path), ["grpo", "d3s"], 2, [1, 4])

    assert list(s["tasks"]) == ["leg_counting", "products"]
    d3s = s["mean_curves"]["d3s"]
    np.testing.assert_allclose(d3s["eval/pass@1/src:products"], [0.1, 0.3, 0.5])
    np.testing.assert_allclose(d3s["eval/greedy_accuracy/src:products"], [0.05, 0.15, 0.25])

    products = s["tasks"]["products"]
    assert products["target_pass1"] == pytest.approx(0.3)
    assert not products["target_at_start"]
    grpo, d3s_row = products["rows"]
    assert (grpo["steps_to_target"], grpo["tokens_to_target"]) == (4, 4000)
    assert (d3s_row["steps_to_target"], d3s_row["tokens_to_target"]) == (2, 200)
    assert d3s_row["tokens_to_target_ratio"] == pytest.approx(0.05)
    assert d3s_row["pass1_final_sd"] == pytest.approx(0.0)
    assert d3s_row["pass1_start"] == pytest.approx(0.1)

    legs = s["tasks"]["leg_counting"]
    assert legs["target_at_start"]  # GRPO 0.2 -> 0.1: the bar is met at the first evaluation
    assert [r["steps_to_target"] for r in legs["rows"]] == [0, 0]

    table = real_model.task_table(s)
    assert "| products | d3s | 0.100 | 0.300 | 0.500 |" in table
    assert "| leg_counting (GRPO no gain) | grpo |" in table
    # Overall bars as before: GRPO's mean final Pass@1 over both tasks.
    assert s["target_pass1"] == pytest.approx(0.2)


def test_single_source_summary_has_no_tasks(tmp_path):
    s = real_model.summarise(_runs(tmp_path, per_source=False), ["grpo", "d3s"], 2, [1, 4])

    assert "tasks" not in s
    assert not any("/src:" in k for k in s["mean_curves"]["grpo"])


@pytest.mark.skipif(
    not (SMOLLM2 / "config.json").is_file(),
    reason="configs/smollm2_rg.yaml validates against the model: run `d3s prepare-model`",
)
def test_report_of_finished_runs(tmp_path, monkeypatch):
    """main() on finished runs trains nothing and writes the per-task table (with each task's
    held-out count from the config), the JSON and a plot with the per-task panels."""
    pytest.importorskip("reasoning_gym")
    monkeypatch.chdir(REPO)  # the config's model path is relative to the repository
    out = _runs(tmp_path / "rg")
    config = "configs/smollm2_rg.yaml"
    argv = ["--config", config, "--seeds", "2", "--steps", "4", "--eval-every", "2"]
    real_model.main([*argv, "--out", str(out)])

    md = Path(f"{out}.md").read_text()
    assert f"--config {config} " in md
    assert "## Pass@1 per task" in md
    assert "leg_counting 24, products 24" in md  # 72 held out over the three datasets
    assert json.loads(Path(f"{out}.json").read_text())["tasks"]["products"]["target_pass1"] == 0.3
    assert Path(f"{out}.png").stat().st_size > 0

"""bench/real_pipeline.py's reading, on synthetic metrics rows: where a mean curve first reaches
GRPO's final Pass@1, the wall-clock and generated tokens there, lock-step evaluations taken out
of the clock, and the table and targets it prints."""

from __future__ import annotations

import json

import pytest

from bench import real_pipeline as rp
from services.telemetry.run_log import read_metrics

T0 = 1000.0


def rows(
    passes: dict[int, float],
    step_s: float,
    tokens_per_group: float,
    draws: float = 1.0,
    eval_s: float = 0.0,
    zero_var: float = 2.0,
) -> list[dict]:
    """metrics rows of a run: step 0, then one per step ``step_s`` apart, each step drawing
    ``draws`` x 8 groups of which 8 are kept (the rest dropped), evaluation rows at ``passes``
    steps (inline ones add ``eval_s`` to the clock)."""
    out = [{"step": 0, "wall_time": T0, "eval_seconds": eval_s, "eval/pass@1": passes[0]}]
    clock = T0 + eval_s
    for s in range(1, max(passes) + 1):
        clock += step_s
        r = {
            "step": s,
            "wall_time": clock,
            "groups": 8.0,
            "groups_zero_var": zero_var,
            "groups_generated": 8.0 * draws,
            "groups_zero_var_dropped": 8.0 * draws - 8.0,
            "groups_surplus_dropped": 0.0,
            "draws_per_step": draws,
            "gen_tokens_per_kept_group": tokens_per_group,
            "padded_token_share": 0.03,
        }
        if s in passes:
            r.update({"eval/pass@1": passes[s], "eval_seconds": eval_s})
            clock += eval_s
        out.append(r)
    return out


START = 0.02


def test_first_reach_wall_and_tokens_of_the_mean_curve():
    grpo = [
        rp.read_rows(rows({0: START, 2: 0.05, 4: 0.10}, 50.0, 200.0), 4, lockstep=False),
        rp.read_rows(rows({0: START, 2: 0.07, 4: 0.14}, 70.0, 200.0), 4, lockstep=False),
    ]
    # mean curve 0.02, 0.13, 0.20: reaches GRPO's final 0.12 at step 2, not at step 0
    d3s = [
        rp.read_rows(rows({0: START, 2: 0.12, 4: 0.18}, 20.0, 100.0, draws=2.0), 4, False),
        rp.read_rows(rows({0: START, 2: 0.14, 4: 0.22}, 40.0, 100.0, draws=2.0), 4, False),
    ]
    s = rp.summarise({"grpo": grpo, "d3s": d3s})
    assert s["target"] == pytest.approx(0.12)
    d = s["configs"]["d3s"]
    assert d["reach_step"] == 2
    assert d["wall_to_target_s"] == pytest.approx(60.0)  # seeds at 40 s and 80 s
    # 2 draws x 8 groups, 8 kept at 100 tokens each: 800 tokens a step, two steps
    assert d["tokens_to_target"] == pytest.approx(1600.0)
    assert d["draws_per_step"] == pytest.approx(2.0)
    assert d["tokens_per_kept_group"] == pytest.approx(100.0)
    assert d["tokens_per_var_group"] == pytest.approx(800 / 6)  # 2 of the 8 without variance
    g = s["configs"]["grpo"]
    assert g["reach_step"] == 4 and g["wall_to_target_s"] == pytest.approx(240.0)
    assert d["wall_to_target_s_vs_grpo"] == pytest.approx(0.25)
    assert g["tokens_to_target"] == pytest.approx(6400.0)  # 4 steps x 8 groups x 200
    assert d["tokens_to_target_vs_grpo"] == pytest.approx(0.25)
    text = rp.table(s)
    assert "| d3s | 2 | 0.200 | 120 | 60 | 0.25 | 1600 | 0.25 | 100 | 133 | 2.00 | 0.030 |" in text
    assert "0.120" in text.splitlines()[0]
    lines = rp.targets(s)
    assert "0.25x **met**" in lines[0]
    assert lines[1].endswith("—")  # no dynamic-sampling rows to compare
    assert "**met**" in lines[2]


def test_a_curve_that_never_reaches_the_target_has_no_time():
    grpo = [rp.read_rows(rows({0: START, 2: 0.06, 4: 0.2}, 50.0, 200.0), 4, False)]
    flat = [rp.read_rows(rows({0: START, 2: 0.1, 4: 0.19}, 10.0, 100.0), 4, False)]
    s = rp.summarise({"grpo": grpo, "d3s": flat})
    assert s["configs"]["d3s"]["reach_step"] is None
    assert s["configs"]["d3s"]["wall_to_target_s_vs_grpo"] is None
    assert "| d3s | 1 | 0.190 | 40 | — | — | — |" in rp.table(s)


def test_lockstep_evaluations_are_taken_out_of_the_clock():
    got = rp.read_rows(rows({0: START, 1: 0.1, 2: 0.2}, 30.0, 100.0, eval_s=25.0), 2, True)
    assert [p[1] for p in got["curve"]] == pytest.approx([0.0, 30.0, 60.0])
    assert got["wall_s"] == pytest.approx(60.0)
    async_ = rp.read_rows(rows({0: START, 1: 0.1, 2: 0.2}, 30.0, 100.0), 2, False)
    assert [p[1] for p in async_["curve"]] == pytest.approx([0.0, 30.0, 60.0])


def test_no_target_when_grpo_does_not_rise_above_the_shared_start():
    grpo = [rp.read_rows(rows({0: START, 2: 0.01, 4: START}, 50.0, 200.0), 4, False)]
    s = rp.summarise({"grpo": grpo})
    assert s["target"] is None
    assert s["configs"]["grpo"]["reach_step"] is None
    assert rp.table(s).startswith("Target: none")


def test_a_run_without_its_last_evaluation_is_unfinished(tmp_path):
    # background evaluation rows arrive as their own lines and merge into their step's row
    path = tmp_path / "metrics.jsonl"
    lines = rows({0: START, 2: 0.1, 4: 0.2}, 50.0, 200.0)
    last = lines[-1]
    ev = {"row": "eval", "step": 4, "eval_step": 4, "eval/pass@1": last.pop("eval/pass@1")}
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert rp.read_rows(read_metrics(path), 4, False) is None
    with path.open("a") as f:
        f.write(json.dumps(ev) + "\n")
    done = rp.read_rows(read_metrics(path), 4, False)
    assert done["final_pass1"] == pytest.approx(0.2)
    assert done["curve"][-1][1] == pytest.approx(200.0)  # the step's clock, not the evaluation's


def test_the_invocation_reads_finished_runs_and_writes_its_results(tmp_path):
    # every run already finished: nothing is trained, the results are written from the metrics
    curves = {
        "grpo": {0: START, 2: 0.06, 4: 0.10, 6: 0.12},
        "d3s": {0: START, 2: 0.13, 4: 0.15, 6: 0.2},
        "d3s+ds": {0: START, 2: 0.1, 4: 0.2, 6: 0.25},
        "d3s+ds+prefilter": {0: START, 2: 0.1, 4: 0.2, 6: 0.25},
        "grpo lock-step": {0: START, 2: 0.04, 4: 0.08, 6: 0.11},
        "d3s lock-step": {0: START, 2: 0.1, 4: 0.14, 6: 0.16},
    }
    for label, passes in curves.items():
        tokens = 150.0 if label == "d3s+ds+prefilter" else 300.0
        rdir = rp.run_dir(tmp_path / "runs", label, 0)
        rdir.mkdir(parents=True)
        lines = rows(passes, 40.0 if "d3s" in label else 60.0, tokens, draws=2.0)
        (rdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "res"
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--seeds", "0"]
    s = rp.main(argv)
    assert s["target"] == pytest.approx(0.12)
    assert s["configs"]["d3s"]["reach_step"] == 2
    assert s["configs"]["d3s"]["wall_to_target_s_vs_grpo"] == pytest.approx(80 / 360)
    text = (tmp_path / "res.md").read_text()
    assert "2.00x **met**" in text  # 300 against 150 generated tokens per kept group
    assert json.loads((tmp_path / "res.json").read_text())["failed"] == []
    assert (tmp_path / "res.png").stat().st_size > 0

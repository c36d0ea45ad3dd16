"""bench/lora.py's configs and reading, on synthetic run directories: the variants' configs, the
mean curves and standard errors over seeds, the per-sync and learner figures, the verdict line
whichever way it falls, and the md/json/png it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import lora as bl


def write_run(
    path: Path, passes: dict[int, float], sync_bytes: float, sync_s: float, rss: float
) -> None:
    """A run's metrics.jsonl (step 0's evaluation, one row per step, evaluation rows at
    ``passes``) and its bench.json."""
    path.mkdir(parents=True)
    rows = []
    for step in range(max(passes) + 1):
        r: dict = {"step": step}
        if step:
            r.update(
                learner_seconds=2.0 + step,
                weight_sync_bytes=sync_bytes,
                weight_sync_seconds=sync_s,
            )
        if step in passes:
            r.update({"heldout_accuracy": passes[step], "eval/pass@1": passes[step]})
        rows.append(r)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"wall_seconds": 100.0, "peak_rss_mb": rss, "heldout_prompts": 32}
    (path / "bench.json").write_text(json.dumps({**info, "cuda_max_allocated_mb": None}))


FULL = 538_000_000.0


def make_runs(root: Path, lora32_final: tuple[float, float], lora32_bytes: float) -> None:
    for seed, (full_final, l8_final) in enumerate([(0.30, 0.20), (0.34, 0.24)]):
        write_run(
            bl.run_dir(root, "full", "d3s", seed), {0: 0.1, 2: 0.2, 4: full_final}, FULL, 2.0, 4000
        )
        write_run(
            bl.run_dir(root, "lora8", "d3s", seed), {0: 0.1, 2: 0.15, 4: l8_final}, 5e6, 0.1, 2500
        )
        write_run(
            bl.run_dir(root, "lora32", "d3s", seed),
            {0: 0.1, 2: 0.2, 4: lora32_final[seed]},
            lora32_bytes,
            0.2,
            2600,
        )


def test_variant_configs_share_everything_but_the_learner(smollm2_dir):
    assert bl.variant_config("full", False) == ("configs/smollm2.yaml", [])
    config, sets = bl.variant_config("lora32", False)
    assert config == "configs/smollm2_lora.yaml"
    assert sets == ["learner.lora.rank=32", "learner.lora.alpha=64.0"]
    from services.run.config import load_config

    # the configs validate against the model directory; one shaped like SmolLM2 stands in, so
    # that the test needs no `d3s prepare-model`
    here = [f"policy.path={smollm2_dir}"]
    full, lora = load_config(bl.FULL_CONFIG, here), load_config(config, [*sets, *here])
    assert lora.learner.lora.rank == 32 and lora.learner.lr == 10 * full.learner.lr
    assert full.learner.lora is None
    assert lora.task == full.task and lora.rollout == full.rollout and lora.policy == full.policy
    short = load_config(*bl.variant_config("lora8", True))
    assert short.learner.lora.rank == 8 and short.policy.n_layer == 1
    config_attn, sets_attn = bl.variant_config("lora32-attn", False)
    attn = load_config(config_attn, [*sets_attn, *here])
    assert attn.learner.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert attn.learner.lora.rank == 32 and attn.learner == lora.learner.model_copy(
        update={"lora": attn.learner.lora}
    )
    with pytest.raises(ValueError, match="--variants: 'lora32-mlp'"):
        bl.variant_config("lora32-mlp", False)
    with pytest.raises(ValueError, match="--variants: 'lora'"):
        bl.variant_config("lora", False)


def test_reading_table_and_a_met_target(tmp_path: Path):
    make_runs(tmp_path, (0.31, 0.35), FULL * 0.04)
    s = bl.summarise(tmp_path, ["full", "lora8", "lora32"], ["d3s"], [0, 1])
    full, l32 = s["cells"]["full/d3s"], s["cells"]["lora32/d3s"]
    assert full["step"] == [0, 2, 4] and full["pass1"] == pytest.approx([0.1, 0.2, 0.32])
    assert full["pass1_final_se"] == pytest.approx(0.02)  # sd 0.0283 over 2 seeds / sqrt(2)
    assert full["learner_seconds"] == pytest.approx(4.5)  # steps 1..4: 3, 4, 5, 6
    assert full["sync_bytes"] == FULL and l32["sync_seconds"] == pytest.approx(0.2)
    assert l32["peak_rss_mb"] == 2600
    (v,) = s["verdicts"]
    assert v["within_noise"] and v["bytes_ok"] and v["met"]
    assert v["bytes_ratio"] == pytest.approx(0.04)
    assert "target MET" in v["line"] and "within noise" in v["line"]
    md = bl.report(s, "python -m bench.lora", "test")
    assert "| lora32 | d3s | 2 | 0.100 -> 0.330" in md and v["line"] in md


def test_the_verdict_says_so_when_the_target_is_missed(tmp_path: Path):
    # LoRA far below full fine-tuning and at 0.073x the bytes (SmolLM2 at rank 32)
    make_runs(tmp_path, (0.10, 0.12), FULL * 0.073)
    (v,) = bl.summarise(tmp_path, ["full", "lora32"], ["d3s"], [0, 1])["verdicts"]
    assert not v["within_noise"] and not v["bytes_ok"] and not v["met"]
    assert "outside noise" in v["line"] and "0.073x" in v["line"] and "NOT MET" in v["line"]


def test_each_rank_32_variant_gets_its_own_verdict(tmp_path: Path):
    # every projection at 0.073x the bytes misses; the attention alone at 0.023x meets it
    make_runs(tmp_path, (0.31, 0.35), FULL * 0.073)
    for seed, final in enumerate((0.30, 0.36)):
        write_run(
            bl.run_dir(tmp_path, "lora32-attn", "d3s", seed),
            {0: 0.1, 2: 0.2, 4: final},
            FULL * 0.023,
            0.1,
            2550,
        )
    variants = ["full", "lora8", "lora32", "lora32-attn"]
    every, attn = bl.summarise(tmp_path, variants, ["d3s"], [0, 1])["verdicts"]
    assert (every["variant"], attn["variant"]) == ("lora32", "lora32-attn")
    assert every["within_noise"] and not every["bytes_ok"] and not every["met"]
    assert attn["met"] and attn["bytes_ratio"] == pytest.approx(0.023)
    assert attn["line"].startswith("verdict (lora32-attn, d3s)") and "target MET" in attn["line"]


def test_one_seed_takes_the_binomial_error_over_the_heldout_prompts(tmp_path: Path):
    make_runs(tmp_path, (0.31, 0.35), FULL * 0.04)
    s = bl.summarise(tmp_path, ["full"], ["d3s"], [0])
    assert s["cells"]["full/d3s"]["pass1_final_se"] == pytest.approx((0.3 * 0.7 / 32) ** 0.5)
    assert s["verdicts"] == []  # no rank-32 cell: no verdict


def test_main_summarises_finished_runs_into_md_json_png(tmp_path: Path):
    runs = tmp_path / "runs"
    make_runs(runs, (0.31, 0.35), FULL * 0.04)
    out = tmp_path / "lora"
    argv = ["--variants", "full", "lora8", "lora32", "--presets", "d3s", "--seeds", "2"]
    argv += ["--steps", "4", "--runs", str(runs), "--out", str(out)]
    summary = bl.main(argv)  # every run finished: nothing trains
    assert "the finished runs summarised again" in Path(f"{out}.md").read_text()
    assert json.loads(Path(f"{out}.json").read_text())["verdicts"][0]["met"]
    assert Path(f"{out}.png").stat().st_size > 0 and summary["verdicts"][0]["met"]

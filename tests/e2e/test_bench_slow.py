"""The learning benchmark, shortened (kept out of CI: `make test-slow`)."""

from __future__ import annotations

import pytest

from bench.learning import main

pytestmark = pytest.mark.slow


def test_short_benchmark_d3s_uses_fewer_tokens_and_both_learn(tmp_path):
    summary = main(
        [
            "--tasks",
            "addition",
            "--presets",
            "grpo",
            "d3s",
            "--experiments",
            "ladder",
            "--seeds",
            "1",
            "--steps",
            "30",
            "--eval-every",
            "10",
            "--eval-n",
            "8",
            "--eval-prompts",
            "200",
            "--jobs",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    rows = {r["label"]: r for r in summary["groups"]["ladder/addition"]["rows"]}
    assert rows["d3s"]["tokens_total"] < 0.3 * rows["grpo"]["tokens_total"]
    assert rows["d3s"]["seconds_total"] < rows["grpo"]["seconds_total"]
    for r in rows.values():
        assert r["greedy_mean"] > 0.25, r  # the warm start is ~0.2; 30 RL steps must move it
        assert 0 < r["pass1_mean"] <= r["pass8_mean"] <= 1
    assert (tmp_path / "learning.png").stat().st_size > 10_000
    assert (tmp_path / "grad_norm_vs_var.png").stat().st_size > 10_000
    assert "| d3s |" in (tmp_path / "learning.md").read_text()

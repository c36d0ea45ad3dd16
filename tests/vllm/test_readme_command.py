"""The README's vLLM command, as a user runs it: SmolLM2 under ``d3s run`` with vLLM rollout
engines on CPU, read out of README.md (so the test follows the text), with fewer steps and
without ``VLLM_CPU_KVCACHE_SPACE`` in the environment (the Makefile sets it for the rest of this
suite; a user has none). What must hold: the run trains its steps, and the engine starts with
the KV cache derived from the model and the batch (1 GiB here), explicitly, instead of vLLM's
CPU default of 90% of all RAM, which does not fit beside the learner on a 24 GiB box.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / ".cache/models/smollm2-135m-instruct"
STEPS = 2


def readme_vllm_command() -> list[str]:
    """The arguments after ``d3s`` of the README's vLLM command (its continuation lines
    joined, the ``make venv-vllm &&`` before it left out)."""
    text = (REPO / "README.md").read_text()
    found = re.search(r"\.venv-vllm/bin/d3s (run configs/smollm2\.yaml(?:[^\n]*\\\n)*[^\n]*)", text)
    assert found, "README.md no longer has the .venv-vllm/bin/d3s run configs/smollm2.yaml command"
    args = shlex.split(found.group(1).replace("\\\n", " "))
    assert args[:2] == ["run", "configs/smollm2.yaml"] and "rollout.engine=vllm" in args
    return args


@pytest.mark.timeout(1800)
def test_readme_vllm_command_runs_as_written(tmp_path):
    if not (MODEL / "config.json").is_file():
        prepared = subprocess.run(
            [sys.executable, "-m", "services.run.cli", "prepare-model"], cwd=REPO, timeout=900
        )
        assert prepared.returncode == 0
    # The command's relative paths (the config, the task's data, the model) resolve as in the
    # repository root; its run directory and weight files land here, not in the checkout.
    for name in ("configs", "bench", ".cache"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    d3s = Path(sys.executable).with_name("d3s")
    extra = [
        f"train.total_steps={STEPS}",
        "api.port=0",  # a free port: another run on this machine may hold 8000
    ]
    args = [str(d3s), *readme_vllm_command(), *(a for s in extra for a in ("--set", s))]
    t0 = time.perf_counter()
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    took = time.perf_counter() - t0
    run_dir = tmp_path / "runs/smollm2"
    assert out.returncode == 0, (out.stderr + out.stdout)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert (tmp_path / "runs/smollm2-weights").is_dir()  # the collective transport's catch-up
    log = (run_dir / "logs/rollout-0.log").read_text()
    assert "vLLM KV cache on CPU: 1 GiB (derived" in log
    # vLLM's own line: the size it was given, not a share of RAM.
    assert re.search(r"Explicitly set \(1\.0+/[\d.]+\) GiB for KV cache", log), log[-3000:]
    print(f"README vLLM command, {STEPS} steps: {took:.0f} s")

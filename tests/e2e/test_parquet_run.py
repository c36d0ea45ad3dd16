"""A parquet file with a column mapping trains a tiny model under ``d3s run`` (a subprocess, as a
user runs it): verl's layout (the answer in a ``reward_model`` struct, the source in
``data_source``) with two sources, so metrics.jsonl and the API's ``/metrics/history`` carry the
training reward, the zero-variance share and the held-out accuracy per source."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from d3s_cli import run_d3s
from two_sources import SOURCES, run_config, save_tiny_policy, write_task

from services.common.net import free_port
from services.telemetry.run_log import read_metrics

pytestmark = pytest.mark.integration


class HistoryPoller(threading.Thread):
    """Reads ``/metrics/history`` (every metric, no names) while the run's API is up and keeps
    every metric name it served."""

    def __init__(self, url: str) -> None:
        super().__init__(name="history-poller", daemon=True)
        self.url = url
        self.stop_event = threading.Event()
        self.names: set[str] = set()
        self.pages = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    page = json.load(resp)
                self.names.update(page["series"])
                self.pages += 1
            except OSError:
                pass  # not up yet, or gone
            time.sleep(0.25)


def test_d3s_run_trains_on_a_parquet_file_and_reports_per_source(tmp_path: Path) -> None:
    task = write_task(tmp_path / "data")
    policy = save_tiny_policy(tmp_path / "policy")
    run_dir = tmp_path / "run"
    port = free_port()
    data = run_config(
        task,
        policy,
        run_dir,
        service={
            "namespace": f"pq{uuid.uuid4().hex[:8]}",
            "max_group_backlog": 12,
            "wait_timeout_s": 120,
        },
        api={"enabled": True, "port": port},
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))

    poller = HistoryPoller(f"http://127.0.0.1:{port}/metrics/history?limit=1000")
    poller.start()
    t0 = time.monotonic()
    try:
        out = run_d3s("run", str(config), pythonpath=tmp_path / "data")
    finally:
        poller.stop_event.set()
        poller.join(timeout=10)
    assert out.returncode == 0, (out.stderr + out.stdout)[-4000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    rows = read_metrics(run_dir / "metrics.jsonl")
    trained = [r for r in rows if r["step"] >= 1 and "loss" in r]
    assert len(trained) == 2, [sorted(r) for r in rows]
    per_source = [r for r in trained if "reward_mean/src:add" in r]
    assert per_source, [sorted(r) for r in trained]
    for r in per_source:
        assert r["reward_mean/src:sub"] > r["reward_mean/src:add"]  # larger answers, more reward
        assert {f"zero_var_share/src:{s}" for s in SOURCES} <= set(r)
    evaluated = [r for r in rows if "heldout_accuracy" in r]
    assert evaluated and all(
        {f"eval/greedy_accuracy/src:{s}" for s in SOURCES} <= set(r) for r in evaluated
    )
    # The API served them while the run went.
    assert poller.pages > 0, "the run's API never answered /metrics/history"
    assert {f"reward_mean/src:{s}" for s in SOURCES} <= poller.names, sorted(poller.names)
    assert {f"eval/greedy_accuracy/src:{s}" for s in SOURCES} <= poller.names
    print(
        f"\nd3s run on parquet, 2 steps: {time.monotonic() - t0:.1f}s; per source at step "
        f"{per_source[0]['step']}: "
        + ", ".join(
            f"{s}: reward {per_source[0][f'reward_mean/src:{s}']:.3f}, zero-var "
            f"{per_source[0][f'zero_var_share/src:{s}']:.2f}"
            for s in SOURCES
        )
    )

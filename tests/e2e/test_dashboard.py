"""The dashboard in a real headless Chromium.

* Against the API over a real Redis, while a writer thread records learner steps through
  ``RunState`` the way the services do (one every 0.2 s): every chart fills, the page follows
  the run, the status badge follows a stop request, and the held-out accuracy and reward charts
  draw one line per source of a two-source run (``.../src:<source>`` metrics); screenshot
  ``tests/artifacts/dashboard.png``.
* Against a short real run (``run_service``: Ray, DeepSpeed, Ray Serve serving the API): the
  browser watches while the run trains, until every chart shows points and keeps growing;
  screenshot ``tests/artifacts/dashboard-run.png`` (``D3S_README_SCREENSHOT=1`` also writes
  ``docs/img/dashboard.png``, the README's picture, from this real run).

Needs Debian's ``chromium`` and ``chromium-driver`` packages and the ``selenium`` package; skips
with the reason when one is missing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from services.api.app import create_app
from services.api.serve import serve_in_thread
from services.common.net import free_port
from services.run.config import parse_config
from services.run.orchestrator import run_service
from services.transport.bundle import Transport
from services.transport.records import ScoredGroup
from services.transport.redis_server import EmbeddedRedis

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHARTS = (
    "chart-accuracy",
    "chart-reward",
    "chart-kept",
    "chart-staleness",
    "chart-queues",
    "chart-loss",
)
TOTAL_STEPS = 400
# The run's two sources (reasoning-gym datasets), as their per-source metrics name them.
SOURCES = ("chain_sum", "leg_counting")


def _browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "headless browser test needs Debian's chromium and chromium-driver packages "
            "(apt-get install chromium chromium-driver)"
        )
    return chromium, driver


def _group(i: int) -> ScoredGroup:
    return ScoredGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        policy_version=max(0, i // 4 - 1),
        prompt=np.array([1, 2], dtype=np.int32),
        responses=np.ones((4, 3), dtype=np.int32),
        response_lengths=np.full(4, 3, dtype=np.int32),
        behav_logp=np.zeros((4, 3), dtype=np.float32),
        rewards=np.array([0, 1, 0, 1], dtype=np.float32),
        created_at=1.0,
        actor=f"rollout-{i % 2}",
        task="arith",
    )


class StepWriter(threading.Thread):
    """Writes what a run writes, one learner step every ``period_s``: the step's history row,
    latest metrics, schedule, actor heartbeats, a scored group for the queue, a checkpoint every
    10 steps and, once, a dead letter."""

    def __init__(self, t: Transport, period_s: float = 0.2) -> None:
        super().__init__(name="step-writer", daemon=True)
        self.t = t
        self.period_s = period_s
        self.stop_event = threading.Event()
        self.step = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by the test, not lost in a thread
            self.error = exc

    def _run(self) -> None:
        t, state = self.t, self.t.state
        t.queue.ensure_consumer_group(t.keys.groups, "selector")
        state.set_config(json.dumps({"train": {"total_steps": TOTAL_STEPS}}))
        start = time.time()
        while not self.stop_event.is_set() and self.step < TOTAL_STEPS:
            self.step += 1
            s = self.step
            progress = s / TOTAL_STEPS
            sample_ratio = 0.5 + 0.5 * progress
            token_ratio = 0.2 + 0.3 * progress
            before = 32.0
            row = {
                "reward_mean": 0.2 + 0.5 * (1 - math.exp(-s / 15)) + 0.03 * math.sin(s),
                "loss": 0.7 * math.exp(-s / 30) + 0.05,
                "samples_before": before,
                "samples_kept": round(before * sample_ratio),
                "tokens_valid": 400.0,
                "tokens_kept": 400.0 * token_ratio,
                "sample_ratio": sample_ratio,
                "token_ratio": token_ratio,
                "staleness_mean": 0.5 + 0.3 * math.sin(s / 3),
                "staleness_max": 1.0 + (s % 3 == 0),
                "token_staleness_mean": 0.4 + 0.2 * math.sin(s / 3),
                "samples_total": before * sample_ratio * s,
                "learner_tokens_total": 400.0 * token_ratio * s,
                "learner_seconds_total": 0.12 * s,
                "wall_time": time.time(),
            }
            # Per-source training reward: only at steps whose batch held both sources.
            if s % 4 != 1:
                for i, src in enumerate(SOURCES):
                    row[f"reward_mean/src:{src}"] = row["reward_mean"] + 0.1 * (2 * i - 1)
            if s % 5 == 0:
                row["heldout_accuracy"] = 0.1 + 0.6 * (1 - math.exp(-s / 20))
                for i, src in enumerate(SOURCES):
                    row[f"eval/greedy_accuracy/src:{src}"] = row["heldout_accuracy"] * (0.5 + i)
                    row[f"eval/pass@1/src:{src}"] = row["heldout_accuracy"] * (0.4 + i)
            state.record_step(s, row)
            state.set_metrics({**row, "learner_version": s})
            state.record_published_version(s)
            state.write_schedule(
                {
                    "step": s + 1,
                    "total_steps": TOTAL_STEPS,
                    "progress": progress,
                    "sample_ratio": sample_ratio,
                    "token_ratio": token_ratio,
                    "preset": "d3s",
                }
            )
            for actor in (0, 1):
                state.record_heartbeat(
                    f"rollout-{actor}",
                    {"weight_version": max(0, s - actor), "groups_published": 2 * s + actor},
                )
            t.queue.publish(t.keys.groups, _group(s), incr={"groups_written": 1})
            if s % 10 == 0:
                state.record_checkpoint(s, f"runs/demo/checkpoints/step_{s:06d}")
            if s == 3:
                entry = t.queue.publish(t.keys.groups, _group(10_000))
                t.queue.read(t.keys.groups, "selector", "demo", count=100)
                t.queue.dead_letter(
                    t.keys.groups, "selector", "demo", entry, "group size 4 != run's 8"
                )
            # Keep a steady cadence: the throughput tiles divide by wall time.
            time.sleep(max(0.0, start + s * self.period_s - time.time()))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def driver() -> Iterator[Any]:
    chromium, chromedriver = _browser()
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    try:
        yield browser
    finally:
        browser.quit()


def _points(browser: Any) -> dict[str, int]:
    return {c: int(browser.find_element("id", c).get_attribute("data-points") or 0) for c in CHARTS}


def _lines(browser: Any, chart: str) -> dict[str, int]:
    """Each line of ``chart`` (its legend label) and how many points it shows."""
    el = browser.find_element("id", chart)
    labels = json.loads(el.get_attribute("data-series") or "[]")
    counts = json.loads(el.get_attribute("data-series-points") or "[]")
    return dict(zip(labels, counts, strict=False))


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"dashboard: {what} within {timeout_s:.0f}s")
        time.sleep(0.2)


def test_dashboard_follows_a_live_run(redis_server: EmbeddedRedis, driver: Any) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    t = Transport.open(client, "dash")
    t.state.delete_run()
    writer = StepWriter(t)
    app = create_app(redis_server.url, t.namespace, control_token="tok")
    t0 = time.monotonic()
    with serve_in_thread(app) as url:
        writer.start()
        try:
            driver.get(f"{url}/?interval=500")
            assert driver.title == "D3S-RL run"

            # Every chart shows points: accuracy only every 5th step, so wait for 3 of those.
            _wait(lambda: min(_points(driver).values()) >= 3, 60, "every chart shows 3+ points")
            t_points = time.monotonic() - t0
            first = _points(driver)
            # ... and keeps following the run.
            _wait(
                lambda: _points(driver)["chart-reward"] >= first["chart-reward"] + 5,
                30,
                "the reward chart grows by 5 steps",
            )
            assert writer.error is None, writer.error

            # One line per source next to the overall one, each with its own points.
            for chart, overall in (
                ("chart-accuracy", "held-out accuracy"),
                ("chart-reward", "reward mean"),
            ):
                _wait(
                    lambda chart=chart: min(_lines(driver, chart).values(), default=0) >= 3,
                    30,
                    f"every line of {chart} shows 3+ points",
                )
                lines = _lines(driver, chart)
                assert list(lines) == [overall, *SOURCES], lines
                legend = driver.find_element("id", chart).text
                assert all(src in legend for src in SOURCES), legend
            # The reward chart's source lines skip the steps without both sources.
            reward = _lines(driver, "chart-reward")
            assert reward["chain_sum"] < reward["reward mean"]

            text = driver.find_element("tag name", "body").text
            assert "running" in driver.find_element("id", "run-status").text
            step = int(driver.find_element("tag name", "body").get_attribute("data-step"))
            assert 1 < step <= writer.step + 1
            assert f"/ {TOTAL_STEPS}" in driver.find_element("id", "progress-text").text
            assert "rollout-0" in text and "rollout-1" in text
            assert "group size 4 != run's 8" in text
            assert "d3s ·" in driver.find_element("id", "t-schedule").text
            _wait(
                lambda: driver.find_element("id", "t-samples").text not in ("", "–"),
                10,
                "the samples/s tile shows a number",
            )
            samples_per_s = float(driver.find_element("id", "t-samples").text)
            assert samples_per_s > 0

            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == [], errors

            # A stop request shows on the page.
            t.control.request_stop("operator: enough")
            _wait(
                lambda: "stopping" in driver.find_element("id", "run-status").text,
                10,
                "the status badge shows the stop request",
            )
            t.control.clear_run_flags()
            _wait(
                lambda: "running" in driver.find_element("id", "run-status").text,
                10,
                "the status badge returns to running",
            )
            _screenshot(driver, "dashboard.png")
        finally:
            writer.stop_event.set()
            writer.join(timeout=10)
            t.state.delete_run()
            client.close()
    print(
        f"\ndashboard: every chart had 3+ points {t_points:.1f}s after start "
        f"(steps written: {writer.step}); whole test {time.monotonic() - t0:.1f}s"
    )


def _screenshot(browser: Any, name: str, readme: bool = False) -> Path:
    """Save the whole page to ``tests/artifacts/<name>``; with ``readme`` and
    ``D3S_README_SCREENSHOT=1`` also to ``docs/img/dashboard.png``."""
    # The viewport grown to the whole page (a window size would include the browser's frame);
    # twice, as charts re-lay out at the new size.
    for _ in range(2):
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": int(height) + 16, "deviceScaleFactor": 1, "mobile": False},
        )
        time.sleep(0.7)  # a poll at the new size, so charts redraw to fit
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    assert browser.save_screenshot(str(path)), path
    assert path.stat().st_size > 10_000
    if readme and README_SCREENSHOT:
        readme_img = REPO / "docs" / "img" / "dashboard.png"
        readme_img.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, readme_img)
    return path


# ---- a real run ---------------------------------------------------------------------------------

README_SCREENSHOT = os.environ.get("D3S_README_SCREENSHOT") == "1"
# Long enough for the page to fill while the run trains. The README's picture is of the
# quickstart run (what `make run` trains, its warm start cached in .cache/warmstart), watched
# until most of it is drawn.
RUN_STEPS = 60 if README_SCREENSHOT else 30
RUN_EVAL_EVERY = 5 if README_SCREENSHOT else 3


class RunWatcher(threading.Thread):
    """The browser's side of the real-run test, in a thread while the main thread runs the
    service: open the dashboard once the API answers, wait for every chart, screenshot."""

    def __init__(self, browser: Any, url: str, min_reward_points: int) -> None:
        super().__init__(name="dashboard-watcher", daemon=True)
        self.browser, self.url, self.min_reward_points = browser, url, min_reward_points
        self.error: BaseException | None = None
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.shot: Path | None = None
        self.seconds_to_points: float | None = None

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def _watch(self) -> None:
        t0 = time.monotonic()
        _wait(lambda: _answers(self.url + "/healthz"), 180, "the run's API answers /healthz")
        b = self.browser
        b.get(f"{self.url}/?interval=500")
        assert b.title == "D3S-RL run"
        _wait(lambda: min(_points(b).values()) >= 3, 120, "every chart shows 3+ points")
        self.seconds_to_points = time.monotonic() - t0
        self.first = _points(b)
        _wait(
            lambda: (
                _points(b)["chart-reward"]
                >= max(self.first["chart-reward"] + 3, self.min_reward_points)
            ),
            120,
            "the reward chart grows with the run",
        )
        self.last = _points(b)
        assert "running" in b.find_element("id", "run-status").text
        assert "rollout-0" in b.find_element("tag name", "body").text
        # A page opened before the selector's first schedule gets 404 from /schedule (the page
        # shows "no schedule yet"); the browser logs that request, which is no error of the page.
        errors = [
            e
            for e in b.get_log("browser")
            if e["level"] == "SEVERE"
            and not ("/schedule " in e["message"] and "404" in e["message"])
        ]
        assert errors == [], errors
        self.shot = _screenshot(b, "dashboard-run.png", readme=True)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_dashboard_follows_a_real_run(
    tiny_config, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, driver: Any
) -> None:
    port = free_port()
    run = {
        "train": {
            "total_steps": RUN_STEPS,
            "eval_every": RUN_EVAL_EVERY,
            "checkpoint_every": RUN_STEPS // 2,
            "run_dir": str(tmp_path / "run"),
            "progress_bar": False,
        },
        "service": {"namespace": f"dash{uuid.uuid4().hex[:8]}", "wait_timeout_s": 120},
        "api": {"enabled": True, "port": port},
    }
    if README_SCREENSHOT:
        data = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
        data = _merge(
            data,
            {
                **run,
                "warmstart": {"cache_dir": str(REPO / ".cache" / "warmstart")},
                "rollout": {"num_actors": 2},
            },
        )
    else:
        data = tiny_config(
            tmp_path / "run",
            tmp_path_factory.getbasetemp() / "warmstart",
            name="dashboard",
            rollout={"num_actors": 2},
            **run,
        )
        data["service"]["max_group_backlog"] = 8
    cfg = parse_config(data)
    watcher = RunWatcher(driver, f"http://127.0.0.1:{port}", 45 if README_SCREENSHOT else 0)
    t0 = time.monotonic()
    watcher.start()
    try:
        summary = run_service(cfg)  # the main thread: Ray wants it
    finally:
        watcher.join(timeout=60)
    assert watcher.error is None, watcher.error
    assert not watcher.is_alive(), "the browser was still waiting when the run ended"
    assert summary["steps"] == RUN_STEPS
    # The page showed what the run recorded: no more points than steps (+ step 0) per series.
    assert watcher.last["chart-reward"] <= RUN_STEPS + 1
    assert watcher.last["chart-accuracy"] <= RUN_STEPS // RUN_EVAL_EVERY + 2
    assert watcher.shot is not None and watcher.shot.stat().st_size > 10_000
    print(
        f"\ndashboard on a real run: every chart had 3+ points {watcher.seconds_to_points:.1f}s "
        f"after start; points at the screenshot {watcher.last}; whole test {time.monotonic() - t0:.1f}s"
    )

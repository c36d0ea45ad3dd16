"""A Ray cluster of real nodes on this machine, loopback only, for the end-to-end tests.

``ray start --head`` and ``ray start --address`` daemonise, so their process ids are unknown to
the caller; every process of the cluster names its own temporary directory on its command line,
and :meth:`LocalRayCluster.stop` ends exactly those (never ``ray stop``, which would end every
Ray of this user on a shared machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from services.common.net import free_port

RAY = str(Path(sys.executable).parent / "ray")


def ray_env() -> dict[str, str]:
    """The environment of every ``ray`` command: no auth token (loopback only), no usage
    stats, the venv's executables first on PATH (the job driver runs ``d3s``)."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    return env


class LocalRayCluster:
    """A head node (optionally with the dashboard, which ``ray job submit`` talks to) and any
    number of worker nodes, each with the custom resources it is given."""

    def __init__(self, dashboard: bool = False) -> None:
        # short: Ray's socket paths under it must stay below the 107-byte limit
        self.temp_dir = tempfile.mkdtemp(prefix="d3sray", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = free_port() if dashboard else None
        self.dashboard = dashboard

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str) -> None:
        out = subprocess.run(
            [RAY, *args], env=ray_env(), capture_output=True, text=True, timeout=180
        )
        if out.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")

    def start_head(self, resources: dict[str, float], num_cpus: int = 1) -> None:
        args = [
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            f"--include-dashboard={str(self.dashboard).lower()}",
        ]
        if self.dashboard:
            args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        self._ray(*args)

    def add_node(self, resources: dict[str, float], num_cpus: int = 1) -> None:
        self._ray(
            "start",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            "--disable-usage-stats",
        )

    def wait_for_nodes(self, count: int, timeout_s: float = 60.0) -> list[dict]:
        """The alive nodes (``ray.util.state`` rows) once there are ``count`` of them."""
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                nodes = [n for n in list_nodes(address=self.address) if n.state == "ALIVE"]
            except Exception:  # the state API answers once the GCS is up
                nodes = []
            if len(nodes) >= count:
                return [n.__dict__ if hasattr(n, "__dict__") else dict(n) for n in nodes]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {count} Ray nodes up after {timeout_s:.0f}s")
            time.sleep(1.0)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those naming its temp dir (raylets, GCS, workers) or its
        GCS address."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
            except psutil.Error:
                continue
            if self.temp_dir in cmd or f"127.0.0.1:{self.port}" in cmd:
                found.append(p)
        return found

    def stop(self) -> None:
        """End this cluster's processes (only these), then remove its temp dir."""
        procs = [p for p in self.processes() if p.pid != os.getpid()]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

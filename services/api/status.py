"""``d3s status``: a run's state at a glance in the terminal, read from its HTTP API.

:func:`print_status` fetches the JSON routes the dashboard uses and prints them as rich tables;
:func:`fetch_status` and :func:`render_status` are its two halves.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from services.api.serve import DEFAULT_HOST, DEFAULT_PORT

__all__ = ["DEFAULT_URL", "StatusData", "fetch_status", "print_status", "render_status"]

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


class StatusError(RuntimeError):
    """The API could not be read (unreachable, or an answer that is not what it documents)."""


@dataclass(frozen=True)
class StatusData:
    """The API's answers ``d3s status`` shows (None: the route answered 404, nothing yet)."""

    url: str
    metrics: dict[str, Any]
    schedule: dict[str, Any] | None
    throughput: dict[str, Any]
    actors: dict[str, Any]
    dead_letters: dict[str, Any]
    checkpoints: dict[str, Any]


def _get(base: str, path: str, timeout_s: float) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{base}{path}", timeout=timeout_s) as resp:
            return json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        detail = exc.read().decode(errors="replace")[:300]
        raise StatusError(f"{base}{path}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach the D3S API at {base} ({reason})") from None
    except ValueError as exc:
        raise StatusError(f"{base}{path}: not JSON ({exc})") from None


def fetch_status(url: str = DEFAULT_URL, timeout_s: float = 5.0) -> StatusData:
    """Read everything :func:`render_status` shows; raises :class:`StatusError` with the reason."""
    base = url.rstrip("/")

    def need(path: str) -> dict[str, Any]:
        body = _get(base, path, timeout_s)
        if body is None:
            raise StatusError(f"{base}{path}: HTTP 404 (is this a D3S API?)")
        return body

    return StatusData(
        url=base,
        metrics=need("/metrics"),
        schedule=_get(base, "/schedule", timeout_s),
        throughput=need("/metrics/throughput"),
        actors=need("/actors"),
        dead_letters=need("/dead-letters?count=200"),
        checkpoints=need("/checkpoints"),
    )


def _num(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _run_state(m: dict[str, Any]) -> str:
    if m.get("done"):
        return "[blue]done[/]"
    if m.get("stop_reason"):
        return f"[red]stopping[/] ({escape(str(m['stop_reason']))})"
    return "[yellow]paused[/]" if m.get("paused") else "[green]running[/]"


def render_status(data: StatusData, now: float | None = None) -> Group:
    """The tables ``d3s status`` prints: the run, its rollout actors, its dead letters."""
    now = time.time() if now is None else now
    m, s, tp = data.metrics, data.schedule or {}, data.throughput
    metrics, counters, queues = m["metrics"], m["counters"], m["queues"]

    run = Table(title=Text(f"D3S run at {data.url}"), show_header=False, title_justify="left")
    run.add_column(style="bold")
    run.add_column()
    step, total = s.get("step"), s.get("total_steps")
    progress = s.get("progress")
    run.add_row("state", _run_state(m))
    run.add_row(
        "step",
        "–"
        if step is None
        else f"{step}"
        + (f" / {total}" if total else "")
        + (f"  ({100 * progress:.0f}%)" if progress is not None else ""),
    )
    run.add_row(
        "schedule",
        f"{s.get('preset') or '–'}  rho_s {_num(s.get('sample_ratio'), 2)}  "
        f"K {_num(s.get('token_ratio'), 2)}",
    )
    run.add_row("held-out accuracy", _num(metrics.get("heldout_accuracy"), 3))
    run.add_row("reward (mean)", _num(metrics.get("reward_mean"), 3))
    busy = tp["learner_busy_fraction"]["value"]
    run.add_row(
        "throughput",
        f"{_num(tp['samples_per_s']['value'], 1)} samples/s  "
        f"{_num(tp['tokens_per_s']['value'], 0)} kept tokens/s  "
        f"learner busy {'–' if busy is None else f'{100 * busy:.0f}%'}",
    )
    run.add_row(
        "queues",
        f"groups {queues['groups']}  batches {queues['batches']}  dead {queues['dead']}",
    )
    run.add_row(
        "staleness",
        f"mean {_num(metrics.get('staleness_mean'), 2)}  max {_num(metrics.get('staleness_max'), 0)}"
        f"  per token {_num(metrics.get('token_staleness_mean'), 2)}"
        f"  stale groups {counters.get('groups_stale', 0)}",
    )
    latest = data.checkpoints.get("latest")
    run.add_row(
        "checkpoint", "–" if latest is None else Text(f"step {latest['step']}: {latest['path']}")
    )

    actors = Table(title="Rollout actors", title_justify="left")
    for col in ("actor", "weights", "behind", "groups", "heartbeat"):
        actors.add_column(col, justify="left" if col == "actor" else "right")
    for a in data.actors["actors"]:
        beat = a.get("last_heartbeat")
        actors.add_row(
            Text(str(a["name"])),
            str(a.get("weight_version") if a.get("weight_version") is not None else "–"),
            str(a.get("versions_behind") if a.get("versions_behind") is not None else "–"),
            str(a.get("groups_published") if a.get("groups_published") is not None else "–"),
            "–" if beat is None else f"{max(0.0, now - beat):.0f} s ago",
        )
    if not data.actors["actors"]:
        actors.add_row("(no heartbeat yet)", "", "", "", "")

    dead = Table(title=f"Dead letters: {data.dead_letters['total']} in all", title_justify="left")
    dead.add_column("reason")
    dead.add_column("recent", justify="right")
    for reason, count in data.dead_letters["by_reason"].items():
        dead.add_row(Text(str(reason)), str(count))
    if not data.dead_letters["by_reason"]:
        dead.add_row("(none)", "")
    return Group(run, actors, dead)


def print_status(
    url: str = DEFAULT_URL, console: Console | None = None, timeout_s: float = 5.0
) -> int:
    """Print the run's status from the API at ``url``; returns the exit code (0, or 1 with the
    reason printed when the API cannot be read)."""
    console = console or Console()
    try:
        data = fetch_status(url, timeout_s)
    except StatusError as exc:
        console.print(Text.assemble(("d3s status:", "red"), f" {exc}"), soft_wrap=True)
        return 1
    console.print(render_status(data))
    return 0

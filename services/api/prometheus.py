"""The run's metrics in the Prometheus text exposition format (version 0.0.4).

Families: every counter as ``d3s_<name>_total`` (counter), every metric as ``d3s_<name>``
(gauge, latest value), ``d3s_queue_depth{queue=...}``, ``d3s_paused`` and the schedule's
``d3s_schedule_*`` gauges plus ``d3s_schedule_info{preset=...}``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from services.api.views import RunSnapshot

__all__ = ["PROMETHEUS_CONTENT_TYPE", "prometheus_name", "render_prometheus"]

log = logging.getLogger(__name__)

# The classic text format: what every Prometheus server and most scrapers parse. The library's
# CONTENT_TYPE_LATEST moved to 1.0.0 (UTF-8 names), which older scrapers reject.
PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_PREFIX = "d3s_"
_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_SCHEDULE_GAUGES = ("step", "total_steps", "progress", "sample_ratio", "token_ratio")


def prometheus_name(name: str) -> str:
    """``d3s_`` + ``name`` with every character Prometheus does not allow replaced by ``_``.

    Colons are allowed by the format but reserved for recording rules, so they are replaced too.
    """
    return _PREFIX + _INVALID_NAME_CHARS.sub("_", name)


class _SnapshotCollector:
    """A one-shot collector over a :class:`RunSnapshot`, for a registry that lives one request.

    Sanitising can map two names onto one (``a.b`` and ``a/b``) or onto a fixed family
    (a metric called ``paused``); a duplicate family would make the whole exposition unparsable,
    so the first claim wins (fixed families, then counters, then metrics, each by name) and the
    rest are logged and left out.
    """

    def __init__(self, snap: RunSnapshot) -> None:
        self.snap = snap
        self._taken: set[str] = set()

    def _claim(self, *names: str) -> bool:
        if self._taken.intersection(names):
            log.warning("Prometheus name %s is taken; leaving that series out", names[0])
            return False
        self._taken.update(names)
        return True

    def collect(self) -> Iterable[Metric]:
        self._taken.clear()
        yield from self._fixed()
        for name, value in self.snap.counters.items():
            family = prometheus_name(name).removesuffix("_total")  # the library appends it
            # A counter's samples are named <family>_total: both names are spoken for.
            if self._claim(family, family + "_total"):
                yield CounterMetricFamily(family, f"D3S counter {name!r}", value=value)
        for name, value in self.snap.metrics.items():
            family = prometheus_name(name)
            if self._claim(family):
                yield GaugeMetricFamily(family, f"D3S metric {name!r} (latest value)", value=value)

    def _fixed(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "d3s_queue_depth", "records waiting in each stream", labels=["queue"]
        )
        for label, depth in self.snap.queues.model_dump().items():
            queue.add_metric([label], depth)
        self._claim("d3s_queue_depth")
        yield queue
        self._claim("d3s_paused")
        yield GaugeMetricFamily(
            "d3s_paused", "1 while an operator paused the run", value=int(self.snap.paused)
        )
        schedule = self.snap.schedule
        if schedule is None:
            return
        for field in _SCHEDULE_GAUGES:
            value = getattr(schedule, field)
            if value is not None and self._claim(f"d3s_schedule_{field}"):
                yield GaugeMetricFamily(
                    f"d3s_schedule_{field}", f"schedule {field}", value=float(value)
                )
        if schedule.preset is not None and self._claim("d3s_schedule_info"):
            info = GaugeMetricFamily(
                "d3s_schedule_info",
                "selection preset of the run (value always 1)",
                labels=["preset"],
            )
            info.add_metric([schedule.preset], 1)
            yield info


def render_prometheus(snap: RunSnapshot) -> bytes:
    """The exposition of ``snap``, in :data:`PROMETHEUS_CONTENT_TYPE`."""
    # A fresh registry per request: nothing global to go stale or to collide across apps.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)

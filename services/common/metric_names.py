"""Metric-name pieces shared by the parts that write per-source metrics (held-out evaluation, the
selector's curate) and read them (the API, the dashboard)."""

from __future__ import annotations

import re

# Characters the API's metric names hold (services.api.views): anything else becomes "_".
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.@:-]")
# A source's share of a name: the API takes names of up to 128 characters, and the longest
# per-source name (eval/mean_response_length/src:...) has 30 before the source.
MAX_SOURCE_CHARS = 64
SOURCE_MARK = "/src:"


def source_suffix(source: str) -> str:
    """The metric-name suffix of a source's metrics: ``/src:<source>``, with each character a
    metric name cannot hold (``/``, spaces) written as ``_`` and the source cut to
    :data:`MAX_SOURCE_CHARS` (a data file's long name), so the name passes the API's pattern."""
    return SOURCE_MARK + _NOT_IN_NAME.sub("_", source)[:MAX_SOURCE_CHARS]

"""Locked-down defaults of a local run: every listener Ray opens binds loopback.

``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough on Linux: Ray turns a loopback
node address back into the host's address (``resolve_ip_for_localhost``) unless it believes
clusters are disabled, and then its GCS, raylet, workers and agents listen on ``::``, ``0.0.0.0``
or the host IP. With clusters disabled for the local Ray (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
read by the driver and inherited by every process it starts) the node address stays
``127.0.0.1`` and every gRPC server, agent and worker binds it. A run that joins a cluster
(``service.ray_address``) is left alone: its listeners are the cluster's business.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from services.common.net import LOOPBACK

CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_ray() -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``ray.init`` of a local Ray whose listeners all bind loopback.

    While the block runs, :data:`CLUSTER_ENV` is set in this process's environment (the GCS and
    raylet started by ``ray.init`` inherit it, and the workers inherit it from the raylet) and
    in the already-imported Ray constant the driver consults. Both are restored afterwards, so
    nothing else this process starts later (another Ray joining a cluster, a ``ray start``) is
    affected.
    """
    previous_env = os.environ.get(CLUSTER_ENV)
    os.environ[CLUSTER_ENV] = "0"
    constants: Any = None
    previous_flag: Any = None
    # A private constant: if it moves, the environment still covers a Ray imported after this.
    with contextlib.suppress(ImportError, AttributeError):
        import ray._private.ray_constants as constants

        previous_flag = constants.ENABLE_RAY_CLUSTER
        constants.ENABLE_RAY_CLUSTER = False
    try:
        # The caller passes include_dashboard=False; should it ever be on, it too binds loopback.
        yield {"_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}
    finally:
        if previous_env is None:
            os.environ.pop(CLUSTER_ENV, None)
        else:
            os.environ[CLUSTER_ENV] = previous_env
        if constants is not None and previous_flag is not None:
            constants.ENABLE_RAY_CLUSTER = previous_flag

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
from typing import Any

from services.common.net import LOOPBACK

CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_ray_options() -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` of a local Ray whose listeners all bind loopback.

    Also sets :data:`CLUSTER_ENV` in this process's environment (the processes Ray starts
    inherit it) and in the already-imported Ray constant the driver consults.
    """
    os.environ[CLUSTER_ENV] = "0"
    # A private constant: if it moves, the environment still covers a Ray imported after this.
    with contextlib.suppress(ImportError, AttributeError):
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    # The caller passes include_dashboard=False; should it ever be on, it too binds loopback.
    return {"_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}

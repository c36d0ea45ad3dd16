"""The weight store: a named Ray actor holding the newest policy weights as an object-store ref.

Local/CPU weight sync: the learner ``ray.put``s its state dict once per
version and hands the ref here; rollout actors poll :meth:`WeightStore.latest_version` between
generations and fetch the ref only when it is newer than what they run. Only the latest ref is
kept, so the object store holds one copy of the weights (plus any a rollout actor is still
loading), however long the run.

The ref travels inside a list: Ray resolves a bare ObjectRef argument to its value, which would
copy the whole state dict into this actor; nested in a list it stays a ref.

The transport that publishes into it and polls it is :mod:`services.weightsync.object_store`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RAY_NAMESPACE = "d3s"


def store_name(namespace: str) -> str:
    """The Ray actor name of the weight store of a run namespace."""
    return f"{namespace}-weights"


@dataclass(frozen=True)
class WeightVersion:
    """One published version: the ref (in a one-element list, see module doc) and its checksum."""

    version: int
    refs: list[Any]
    checksum: str
    published_at: float


class WeightStore:
    """Holds (version, [ObjectRef of the state dict], checksum) of the newest weights.

    Versions only move forward, with one exception: a learner that resumes from a checkpoint
    republishes the checkpoint's version, which may be older than the last one it published
    before it crashed. That republish is accepted (``allow_rewind``), because the weights now
    live in the learner are those of the checkpoint and rollout actors must not keep believing
    a newer version exists.
    """

    def __init__(self) -> None:
        self._latest: WeightVersion | None = None
        self._published = 0

    def publish(
        self, version: int, refs: list[Any], checksum: str, allow_rewind: bool = False
    ) -> int:
        """Make ``version`` the latest; returns it. Refuses a version that goes backwards."""
        if not isinstance(refs, list) or len(refs) != 1:
            raise ValueError("refs must be a list holding exactly one ObjectRef")
        current = self._latest.version if self._latest is not None else -1
        if version < current and not allow_rewind:
            raise ValueError(f"weight version {version} is older than the stored {current}")
        # Replacing the entry drops the store's reference to the previous version's object.
        self._latest = WeightVersion(int(version), refs, checksum, time.time())
        self._published += 1
        return int(version)

    def latest_version(self) -> int:
        """The newest version, or -1 before the learner published any."""
        return self._latest.version if self._latest is not None else -1

    def get(self) -> tuple[int, list[Any], str] | None:
        """(version, [ref], checksum) of the newest weights, or None before any was published."""
        if self._latest is None:
            return None
        return self._latest.version, self._latest.refs, self._latest.checksum

    def info(self) -> dict[str, Any]:
        """Version, checksum and publish count, for logs and tests."""
        latest = self._latest
        return {
            "version": latest.version if latest else -1,
            "checksum": latest.checksum if latest else None,
            "published": self._published,
        }


def get_or_create_store(namespace: str, detached: bool = False) -> Any:
    """The run's weight store actor handle, created if it does not exist yet.

    ``detached``: the store outlives the process that created it (the standalone ``d3s learner``
    on a cluster, so a restarted learner finds it); otherwise it dies with the creating job, as
    under ``d3s run``. Works whatever namespace ``ray.init`` was given.
    """
    import ray

    # num_cpus=0: it only stores a ref; a reserved CPU would be one the learner cannot use.
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(WeightStore)
    options: dict[str, Any] = {
        "name": store_name(namespace),
        "namespace": RAY_NAMESPACE,
        "get_if_exists": True,
    }
    if detached:
        options["lifetime"] = "detached"
    return actor_cls.options(**options).remote()


def wait_for_store(namespace: str, timeout_s: float) -> Any:
    """The handle of an existing weight store, waiting up to ``timeout_s`` for it to appear."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(store_name(namespace), namespace=RAY_NAMESPACE)
        except ValueError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no weight store {store_name(namespace)!r} in Ray namespace "
                    f"{RAY_NAMESPACE!r} after {timeout_s:.0f}s; is the learner running?"
                ) from None
            time.sleep(0.5)


class RayWeightSource:
    """The rollout side: poll the store's version, fetch the newest state dict when asked."""

    def __init__(self, namespace: str, timeout_s: float) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.store = wait_for_store(namespace, timeout_s)

    def latest_version(self) -> int:
        import ray

        return int(ray.get(self.store.latest_version.remote(), timeout=self.timeout_s))

    def fetch(self) -> tuple[int, dict[str, Any], str] | None:
        """(version, state dict, checksum) of the newest weights; None if there are none, or
        the object is gone (its owner, the learner, died: the caller keeps its weights)."""
        import ray
        from ray.exceptions import ObjectLostError, OwnerDiedError

        got = ray.get(self.store.get.remote(), timeout=self.timeout_s)
        if got is None:
            return None
        version, refs, checksum = got
        try:
            state = ray.get(refs[0], timeout=self.timeout_s)
        except (ObjectLostError, OwnerDiedError) as exc:
            log.warning(
                "weights of version %d are gone from the object store (%s); keeping the "
                "current weights until the learner publishes again",
                version,
                type(exc).__name__,
            )
            return None
        return int(version), state, checksum

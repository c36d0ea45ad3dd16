"""Build the configured transport's publisher (learner rank 0) or receiver (a rollout engine)."""

from __future__ import annotations

import time
from typing import Any

import torch

from services.transport.keys import RunKeys
from services.weightsync.base import WeightPublisher, WeightReceiver
from services.weightsync.collective import CollectivePublisher, CollectiveReceiver, parse_address
from services.weightsync.config import WeightSyncConfig
from services.weightsync.files import FilesPublisher, FilesReceiver


def make_publisher(
    cfg: WeightSyncConfig,
    namespace: str,
    *,
    host: str = "127.0.0.1",
    redis_client: Any = None,
    adapter_config: dict[str, Any] | None = None,
) -> WeightPublisher:
    """The learner's publisher. ``host``: this node's address as the engines reach it (used
    when ``cfg.rendezvous`` is None); the collective transport announces its ``host:port`` under
    :attr:`~services.transport.keys.RunKeys.weight_rendezvous` when a Redis client is given.
    ``adapter_config``: the versions are a LoRA adapter with this ``adapter_config.json``; the
    files (and the collective transport's catch-up files) write each version as a PEFT adapter
    directory too."""
    sample = {"sample_every": cfg.sample_every, "sample_elements": cfg.sample_elements}
    if cfg.transport == "files":
        assert cfg.path is not None  # the config's validator
        return FilesPublisher(
            cfg.path, cfg.keep_last, cfg.wire(), **sample, adapter_config=adapter_config
        )
    if cfg.transport == "object_store":
        from services.weightsync.object_store import ObjectStorePublisher

        return ObjectStorePublisher(namespace, wire=cfg.wire(), **sample)
    bind_host, port = parse_address(cfg.rendezvous) if cfg.rendezvous else (host, 0)
    pub = CollectivePublisher(
        bind_host,
        port,
        bucket_bytes=cfg.bucket_bytes,
        wire=cfg.wire(),
        catchup_dir=cfg.path,
        catchup_every=cfg.catchup_every,
        keep_last=cfg.keep_last,
        timeout_s=cfg.timeout_s,
        member_timeout_s=cfg.member_timeout_s,
        adapter_config=adapter_config,
        **sample,
    )
    if redis_client is not None:
        redis_client.set(RunKeys(namespace).weight_rendezvous, pub.address)
    return pub


def lookup_rendezvous(redis_client: Any, namespace: str, timeout_s: float) -> str:
    """The ``host:port`` the learner announced, waiting up to ``timeout_s`` for it."""
    key = RunKeys(namespace).weight_rendezvous
    deadline = time.monotonic() + timeout_s
    while True:
        value = redis_client.get(key)
        if value:
            return value.decode() if isinstance(value, bytes) else str(value)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no weight-sync rendezvous under {key!r} after "
                f"{timeout_s:.0f}s; is the learner running with weight_sync.transport: collective?"
            )
        time.sleep(0.2)


def make_receiver(
    cfg: WeightSyncConfig,
    namespace: str,
    name: str,
    *,
    device: str | torch.device = "cpu",
    redis_client: Any = None,
) -> WeightReceiver:
    """A rollout engine's receiver; ``name`` is its stable name (``rollout-{index}``)."""
    sample = {"sample_every": cfg.sample_every, "sample_elements": cfg.sample_elements}
    if cfg.transport == "files":
        assert cfg.path is not None
        return FilesReceiver(cfg.path, cfg.timeout_s, **sample)
    if cfg.transport == "object_store":
        from services.weightsync.object_store import ObjectStoreReceiver

        return ObjectStoreReceiver(namespace, cfg.timeout_s, **sample)
    address = cfg.rendezvous
    if address is None:
        if redis_client is None:
            raise ValueError("weight_sync.rendezvous: needed when no Redis client can look it up")
        address = lookup_rendezvous(redis_client, namespace, cfg.timeout_s)
    return CollectiveReceiver(
        address, name, device=device, catchup_dir=cfg.path, timeout_s=cfg.timeout_s, **sample
    )

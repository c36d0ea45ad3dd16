"""The API's connection to a run's Redis, kept on ``app.state.run``."""

from __future__ import annotations

import threading

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services.transport.bundle import Transport

__all__ = ["RunConnection"]


class RunConnection:
    """The app's Redis client and the run's :class:`Transport`, created on first use.

    Lazily, so building the app opens no connection: the app can be built before Redis is up,
    and in a process other than the one that serves it (a Ray Serve replica).
    """

    def __init__(self, url: str, namespace: str, timeout_s: float) -> None:
        self.url = url
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._transport: Transport | None = None
        self._lock = threading.Lock()

    def transport(self) -> Transport:
        with self._lock:
            if self._transport is None:
                client = redis.Redis.from_url(
                    self.url,
                    decode_responses=False,  # the Transport requires bytes
                    socket_timeout=self.timeout_s,
                    socket_connect_timeout=min(self.timeout_s, 1.0),
                    # Enough to replace a connection Redis dropped, not so much that a dead
                    # Redis keeps a health check waiting (redis-py's default backs off for
                    # seconds).
                    retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
                    health_check_interval=30,
                )
                self._transport = Transport.open(client, self.namespace)
            return self._transport

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

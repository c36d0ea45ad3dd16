"""Integration fixtures: a real Redis server (the embedded one) shared by the session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from services.transport.bundle import Transport
from services.transport.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One embedded redis-server (AOF on) for the whole session, stopped at the end."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def transport(redis_client: redis.Redis) -> Iterator[Transport]:
    """A Transport in a namespace of its own, so tests never see each other's keys."""
    ns = f"t{uuid.uuid4().hex[:12]}"
    yield Transport.open(redis_client, ns)
    keys = list(redis_client.scan_iter(match=f"{ns}:*"))
    if keys:
        redis_client.delete(*keys)

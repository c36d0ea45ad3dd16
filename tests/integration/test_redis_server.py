"""The embedded Redis: start, persistence, clean stop, and connect_or_start."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import redis

from services.transport.redis_server import (
    REDIS_URL_ENV,
    EmbeddedRedis,
    RedisStartError,
    connect_or_start,
    is_loopback,
    mask_url,
)

pytestmark = pytest.mark.integration


def aof_bytes(run_dir: Path) -> bytes:
    # Redis 6.2 writes appendonly.aof; 7+ writes a manifest and parts under appendonlydir/.
    files = [run_dir / "appendonly.aof", *sorted((run_dir / "appendonlydir").glob("*.aof"))]
    return b"".join(f.read_bytes() for f in files if f.exists())


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_start_ping_aof_and_clean_stop(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        assert server.url == f"redis://:{server.password}@127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        conf = (tmp_path / "redis.conf").read_text().splitlines()
        assert "appendonly yes" in conf and "bind 127.0.0.1" in conf
        client.set("d3s-probe", "persisted-value")
        deadline = time.monotonic() + 5  # everysec may postpone the write briefly
        while b"persisted-value" not in aof_bytes(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"persisted-value" in aof_bytes(tmp_path)
        client.close()
        pid, port = server.pid, server.port
    assert pid is not None and process_gone(pid)
    assert not server.is_running() and port_closed(port)
    server.stop()  # idempotent


def test_restart_on_the_same_dir_keeps_the_data(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first:
        redis.Redis.from_url(first.url).xadd("d3s:groups", {"k": "v"})
    with EmbeddedRedis(tmp_path) as second:
        entries = redis.Redis.from_url(second.url).xrange("d3s:groups")
    assert [fields for _, fields in entries] == [{b"k": b"v"}]


def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = EmbeddedRedis(tmp_path, port=port, start_timeout_s=5)
        with pytest.raises(RedisStartError, match=r"(?s)exited with code .*Address already in use"):
            server.start()
    assert not server.is_running()


def test_connect_or_start_with_a_url_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    url, server = connect_or_start("redis://10.0.0.5:6379/0", tmp_path)
    assert (url, server) == ("redis://10.0.0.5:6379/0", None)

    monkeypatch.setenv(REDIS_URL_ENV, "redis://10.0.0.6:6379/1")
    url, server = connect_or_start(None, tmp_path)
    assert (url, server) == ("redis://10.0.0.6:6379/1", None)
    assert list(tmp_path.iterdir()) == []  # no config, log or AOF: nothing was started


def test_connect_or_start_starts_an_embedded_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    url, server = connect_or_start(None, tmp_path)
    assert server is not None
    try:
        assert url == server.url
        assert redis.Redis.from_url(url).ping()
        assert (tmp_path / "redis" / "redis.conf").exists()
    finally:
        server.stop()
    assert server.pid is None


def test_locked_down_password_no_config_maxmemory_noeviction(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, maxmemory_mb=2) as server:
        assert len(server.password) >= 24
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        client = redis.Redis.from_url(server.url)
        with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
            client.execute_command("CONFIG", "GET", "maxmemory")
        info = client.info("memory")
        assert info["maxmemory"] == 2 * 1024 * 1024 and info["maxmemory_policy"] == "noeviction"
        # Full: writes are refused, and nothing written before is evicted to make room.
        client.set("run-state", "kept")
        with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
            for i in range(1000):
                client.set(f"filler-{i}", b"x" * 64 * 1024)
        assert client.get("run-state") == b"kept"
        client.close()
        assert (tmp_path / "redis.conf").stat().st_mode & 0o077 == 0  # the password file
    assert server.password not in (tmp_path / "redis.log").read_text()


def test_a_non_loopback_bind_needs_a_password(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="host: 0.0.0.0 is not loopback"):
        EmbeddedRedis(tmp_path, host="0.0.0.0", password="")
    EmbeddedRedis(tmp_path, host="127.0.0.1", password="")  # loopback may go without


def test_restart_after_kill_keeps_port_password_and_data(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        url = server.url
        redis.Redis.from_url(url).xadd("d3s:groups", {"k": "v"})
        os.kill(server.pid, 9)
        deadline = time.monotonic() + 5
        while server.is_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.is_running()
        server.restart()
        assert server.url == url
        assert [f for _, f in redis.Redis.from_url(url).xrange("d3s:groups")] == [{b"k": b"v"}]


def test_mask_url_and_is_loopback() -> None:
    assert mask_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert mask_url("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "example.org"]))

"""The supervisor's parts on their own: restart back-off, what counts as a death, and the Redis
watch against a real redis-server killed with SIGKILL (restarted from its AOF, or given up on
after the outage limit with one line). Whole runs under faults: tests/e2e/test_faults.py."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import redis

from services.run.config import ConfigError, parse_config
from services.run.supervisor import RedisLost, RedisWatch, RestartPolicy, is_death
from services.transport.queue import connect
from services.transport.redis_server import EmbeddedRedis

pytestmark = pytest.mark.integration


def _wait_dead(server: EmbeddedRedis) -> None:
    deadline = time.monotonic() + 5
    while server.is_running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.is_running()


def test_restart_backoff_doubles_and_is_capped() -> None:
    policy = RestartPolicy(max_restarts=5, backoff_s=0.5, max_backoff_s=3.0)
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert RestartPolicy(3, 0.0).delay(2) == 0.0


def test_a_dead_process_is_a_death_an_exception_is_not() -> None:
    import ray.exceptions as rex

    assert is_death(rex.ActorDiedError())
    try:
        raise ValueError("a bug in the loop")
    except ValueError as exc:
        failure = rex.RayTaskError("run", "traceback", exc).as_instanceof_cause()
    assert not is_death(failure)
    assert not is_death(ValueError("not from Ray"))


def test_restart_settings_are_validated_by_field() -> None:
    cfg = parse_config(
        {
            "service": {
                "max_restarts": 2,
                "restart_backoff_s": 0.1,
                "redis_outage_s": 5,
                "redis_maxmemory_mb": 64,
            }
        }
    )
    assert (cfg.service.max_restarts, cfg.service.redis_outage_s) == (2, 5)
    for field, value in (
        ("max_restarts", -1),
        ("restart_backoff_s", -1),
        ("redis_outage_s", 0),
        ("redis_maxmemory_mb", -5),
    ):
        with pytest.raises(ConfigError, match=f"service.{field}"):
            parse_config({"service": {field: value}})


def test_the_watch_restarts_a_killed_embedded_server_from_its_aof(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        # A component's client: it waits out the restart instead of failing.
        client = connect(server.url, outage_s=10)
        client.xadd("d3s:groups", {"k": "v"})
        watch = RedisWatch(server.url, server, outage_s=10)
        assert watch.check() and not watch.down
        os.kill(server.pid, signal.SIGKILL)
        _wait_dead(server)
        t0 = time.monotonic()
        while not watch.check():
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)
        assert server.is_running() and watch.outages == 1 and watch.server_restarts == 1
        assert len(watch.recovery_s) == 1 and watch.recovery_s[0] < 10
        assert [f for _, f in client.xrange("d3s:groups")] == [{b"k": b"v"}]
        client.close()
        watch.close()


def test_the_watch_gives_up_after_the_outage_limit_with_one_line(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    try:
        # Not the run's own server (embedded=None): the watch can only wait for it.
        watch = RedisWatch(server.url, None, outage_s=0.5)
        assert watch.check()
        os.kill(server.pid, signal.SIGKILL)
        _wait_dead(server)
        assert watch.check() is False and watch.down
        time.sleep(0.7)
        with pytest.raises(RedisLost) as err:
            watch.check()
        message = str(err.value)
        assert "\n" not in message and re.search(r"unreachable for \d+s", message)
        assert server.password not in message and ":***@" in message
        assert "d3s run" in message
        with pytest.raises(redis.exceptions.ConnectionError):
            connect(server.url).ping()  # no outage_s: a plain client fails at once
    finally:
        server.stop()

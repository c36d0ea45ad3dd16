"""The reliable queue over Redis streams: consumer groups, atomic commit, dead letters.

Delivery discipline (what makes "a crash loses nothing and duplicates nothing" true):

* A consumer reads with XREADGROUP; entries stay pending until :meth:`StreamQueue.commit`.
* ``commit`` is one Lua script (:mod:`services.transport.commit`): it checks the consumer still holds every consumed entry (so a
  consumer whose entries were reclaimed by another cannot also publish a product), writes each
  output unless its idempotency key was produced before, then XACKs and XDELs the consumed entries
  and applies counters and hash fields. A crash before the script leaves the entries pending for
  :meth:`StreamQueue.reclaim`; a crash after it leaves nothing to redo; a retried script (redis-py
  retries on connection errors) finds its entries no longer pending and changes nothing.
* Acknowledged entries are deleted, so XLEN is the backlog (Redis 6.2 has no XINFO ``lag``).
* A record that fails to decode is moved to the dead stream with its reason, in the same kind of
  atomic step, and never returned; the reader keeps going.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services.transport.commit import CommitResult, CommitScript, EncodedOutput
from services.transport.keys import RunKeys
from services.transport.records import CuratedBatch, ScoredGroup, decode
from services.transport.values import text

__all__ = ["CommitResult", "Delivery", "Record", "StreamQueue", "connect"]

log = logging.getLogger(__name__)

Record = ScoredGroup | CuratedBatch
Output = tuple[str, str, Record]  # (stream, idempotency key, record)


_PREFIX_BYTES = 256
_REASON_CHARS = 1000


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _raw(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def dead_letter_fields(
    stream: str, group: str, consumer: str, entry_id: str, fields: Mapping[Any, Any], reason: str
) -> dict[bytes, bytes]:
    """The dead letter of one entry: why, from where, and a bounded summary of its payload."""
    digest = hashlib.sha256()
    size = 0
    for name in sorted(fields, key=_raw):
        value = _raw(fields[name])
        digest.update(_raw(name) + b"\0" + value + b"\0")
        size += len(value)
    meta = fields.get(b"meta", fields.get("meta", b""))
    first = _raw(meta) if meta else (_raw(next(iter(fields.values()))) if fields else b"")
    return {
        b"source": stream.encode(),
        b"entry_id": entry_id.encode(),
        b"reason": reason[:_REASON_CHARS].encode("utf-8", errors="backslashreplace"),
        b"group": group.encode(),
        b"consumer": consumer.encode(),
        b"fields": str(len(fields)).encode(),
        b"bytes": str(size).encode(),
        b"sha256": digest.hexdigest().encode(),
        b"prefix": first[:_PREFIX_BYTES].decode("utf-8", errors="backslashreplace").encode(),
    }


@dataclass(frozen=True)
class Delivery:
    """One decoded record handed to a consumer; commit ``entry_id`` when its product is written."""

    stream: str
    entry_id: str
    record: Record


def connect(url: str, socket_timeout_s: float = 10.0, outage_s: float = 0.0) -> redis.Redis:
    """A Redis client fit for :class:`Transport`: raw bytes, and a socket timeout above the
    ``block_ms`` the services read with (1-2 s), so a dead server fails a read instead of
    hanging it.

    ``outage_s`` > 0: a command that fails to connect (or times out) is retried with
    exponential back-off (0.05 s doubling to 1 s) for at least that long before the error
    reaches the caller, so a component waits out a Redis restart instead of dying. Every write
    of the services is safe to retry: commits are fenced and idempotent (see the module doc).
    """
    kwargs: dict[str, Any] = {}
    if outage_s > 0:
        cap = 1.0
        # Connection refused fails at once, so the wait is the sum of the back-offs: about
        # 1 s per retry once the back-off reaches its cap, after 4 shorter ones (1.5 s).
        kwargs["retry"] = Retry(ExponentialBackoff(cap=cap, base=0.05), int(outage_s / cap) + 3)
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=5.0,
        **kwargs,
    )


class StreamQueue:
    """The streams of one run over one Redis client (``decode_responses=False``).

    Streams are named by :class:`~services.transport.keys.RunKeys` (groups, batches, dead);
    :meth:`commit` also writes the run's counters (``keys.stats``) and idempotency keys
    (``keys.produced``) in the same atomic step.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: RunKeys,
        *,
        dead_maxlen: int = 10_000,
        max_deliveries: int = 5,
    ) -> None:
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("StreamQueue needs a Redis client with decode_responses=False")
        self.client = client
        self.keys = keys
        self.dead_maxlen = dead_maxlen
        self.max_deliveries = max_deliveries
        timeout = kwargs.get("socket_timeout", kwargs.get("orig_socket_timeout"))
        self._socket_timeout_s: float | None = float(timeout) if timeout else None
        self._commit_script = CommitScript(client, keys.produced, keys.stats)

    # ---- groups and publishing ----------------------------------------------------------------

    def ensure_consumer_group(self, stream: str, group: str) -> None:
        """Create ``group`` on ``stream`` (and the stream) if missing.

        The group starts at id 0, so records published before any consumer existed are read.
        """
        try:
            self.client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def publish(
        self,
        stream: str,
        record: Record,
        incr: Mapping[str, int] | None = None,
        *,
        key: str | None = None,
    ) -> str:
        """XADD ``record`` and HINCRBY ``incr`` counters atomically; returns the entry id.

        With ``key`` (e.g. the group id) the write is idempotent: a retried publish returns the
        entry id of the first and writes nothing. Without it, one MULTI/EXEC.
        """
        if key is not None:
            result = self.commit(stream, "", [], outputs=[(stream, key, record)], incr=incr)
            return next(iter({**result.duplicates, **result.written}.values()))
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(stream, record.to_fields())
        for name, amount in (incr or {}).items():
            pipe.hincrby(self.keys.stats, name, int(amount))
        return text(pipe.execute()[0])

    # ---- consuming ----------------------------------------------------------------------------

    def read(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int,
        block_ms: int | None = None,
        *,
        pending: bool = False,
    ) -> list[Delivery]:
        """Read up to ``count`` new records as ``consumer`` of ``group``.

        ``block_ms``: wait up to this long for a record; None or <= 0 does not block (Redis would
        read 0 as "forever", and every wait here has a bound). It must stay below the client's
        socket timeout, or the client times out and retries the read, leaving the first reply's
        entries pending. ``pending=True`` re-reads this consumer's own unacknowledged entries
        instead (what a restarted consumer with the same name does first).

        Malformed records are dead-lettered and skipped; this never raises on a bad record.
        """
        block = block_ms if block_ms is not None and block_ms > 0 else None
        timeout = self._socket_timeout_s
        if block is not None and timeout is not None and block / 1000.0 >= timeout:
            raise ValueError(
                f"block_ms={block} is not below the client's socket timeout of {timeout}s"
            )
        reply = self.client.xreadgroup(
            group, consumer, {stream: "0" if pending else ">"}, count=count, block=block
        )
        entries = self._entries(reply)
        if pending:
            entries = self._drop_redelivered(stream, group, consumer, entries)
        return self._decode_entries(stream, group, consumer, entries)

    def reclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[Delivery]:
        """Take over up to ``count`` entries pending longer than ``min_idle_ms`` (XAUTOCLAIM).

        These are entries a consumer read and never committed, most likely because it died.
        Malformed ones are dead-lettered like in :meth:`read`.
        """
        claimed: list[tuple[bytes | None, Any]] = []
        cursor: bytes | str = "0-0"
        saw_deleted = False
        for _ in range(100):  # the cursor ends at 0-0; the bound only guards a pathological PEL
            reply = self.client.xautoclaim(
                stream, group, consumer, min_idle_ms, start_id=cursor, count=count - len(claimed)
            )
            cursor, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                if entry_id is None:  # Redis 6.2 reports a deleted-but-pending entry as nil
                    saw_deleted = True
                else:
                    claimed.append((entry_id, fields))
            if text(cursor) == "0-0" or len(claimed) >= count:
                break
        if saw_deleted:
            self._ack_deleted_pending(stream, group, consumer)
        claimed = self._drop_redelivered(stream, group, consumer, claimed)
        return self._decode_entries(stream, group, consumer, claimed)

    def _drop_redelivered(
        self, stream: str, group: str, consumer: str, entries: list[tuple[Any, Any]]
    ) -> list[tuple[Any, Any]]:
        """Dead-letter entries delivered more than ``max_deliveries`` times: a record that every
        consumer that reads it dies on (before it can commit) would otherwise stop the run again
        on every restart."""
        if not entries:
            return entries
        ids = [text(i) for i, _ in entries]
        rows = self.client.xpending_range(
            stream,
            group,
            min(ids, key=_id_key),
            max(ids, key=_id_key),
            len(ids) + 100,
            consumername=consumer,
        )
        times = {text(r["message_id"]): int(r["times_delivered"]) for r in rows}
        kept = []
        for raw_id, fields in entries:
            delivered = times.get(text(raw_id), 1)
            if delivered > self.max_deliveries:
                reason = (
                    f"delivered {delivered} times without being committed (limit "
                    f"{self.max_deliveries}): its consumer probably fails on it"
                )
                self._dead_letter(stream, group, consumer, text(raw_id), fields or {}, reason)
            else:
                kept.append((raw_id, fields))
        return kept

    @staticmethod
    def _entries(reply: Any) -> list[tuple[bytes, Any]]:
        """Entries of a one-stream XREADGROUP reply, RESP2 (list) or RESP3 (dict)."""
        if not reply:
            return []
        if isinstance(reply, Mapping):
            streams = list(reply.values())
            return list(streams[0][0]) if streams and streams[0] else []
        return list(reply[0][1])

    def _decode_entries(
        self, stream: str, group: str, consumer: str, entries: Iterable[tuple[Any, Any]]
    ) -> list[Delivery]:
        out: list[Delivery] = []
        for raw_id, fields in entries:
            entry_id = text(raw_id)
            try:
                record = decode(fields or {})
            except Exception as exc:  # any decode failure is the record's fault, never fatal
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                self._dead_letter(stream, group, consumer, entry_id, fields or {}, reason)
                continue
            out.append(Delivery(stream=stream, entry_id=entry_id, record=record))
        return out

    def _dead_letter(
        self,
        stream: str,
        group: str,
        consumer: str,
        entry_id: str,
        fields: Mapping[Any, Any],
        reason: str,
    ) -> None:
        """Move one entry to the dead stream, acknowledge and delete it, count it: one step.

        The dead letter keeps the reason, where the entry came from, its size, a hash and a short
        prefix of its payload, never the payload itself: a flood of large bad records must not
        fill Redis with copies.
        """
        dead = dead_letter_fields(stream, group, consumer, entry_id, fields, reason)
        result = self._run_commit(
            stream,
            group,
            consumer,
            [entry_id],
            [(self.keys.dead, f"{stream}/{entry_id}", dead)],
            {"dead": 1},
            None,
        )
        if result.committed:
            log.warning("dead-lettered %s %s: %s", stream, entry_id, reason)
            # Trimming is housekeeping, not correctness: outside the atomic step, approximate.
            self.client.xtrim(self.keys.dead, maxlen=self.dead_maxlen, approximate=True)
        else:
            log.warning(
                "malformed %s %s was taken by another consumer: %s", stream, entry_id, reason
            )

    def _ack_deleted_pending(self, stream: str, group: str, consumer: str) -> None:
        """Acknowledge this consumer's pending ids whose entries no longer exist."""
        rows = self.client.xpending_range(stream, group, "-", "+", 1000, consumername=consumer)
        gone = [
            row["message_id"]
            for row in rows
            if not self.client.xrange(stream, row["message_id"], row["message_id"])
        ]
        if gone:
            self.client.xack(stream, group, *gone)
            log.warning(
                "acknowledged %d pending entries of %s that were deleted", len(gone), stream
            )

    # ---- committing ---------------------------------------------------------------------------

    def commit(
        self,
        stream: str,
        group: str,
        entry_ids: Sequence[str],
        outputs: Sequence[Output] = (),
        incr: Mapping[str, int] | None = None,
        hset: Mapping[str, Mapping[str, str | int | float]] | None = None,
        *,
        consumer: str | None = None,
    ) -> CommitResult:
        """Atomically: write ``outputs``, XACK+XDEL ``entry_ids``, HINCRBY ``incr``, HSET ``hset``.

        ``outputs`` are ``(out_stream, idempotency_key, record)``; an output whose key was already
        produced on that stream is not written again (reported in ``duplicates``). ``incr``
        counters go to :attr:`stats_key`; ``hset`` maps a hash key to fields to set. Counters
        and fields are skipped when every output was a duplicate (they were applied then).

        With ``consumer`` every consumed entry must still be pending for that consumer, else
        nothing happens and ``committed`` is False; pass it whenever there are entry ids.
        """
        encoded = [(out, key, record.to_fields()) for out, key, record in outputs]
        return self._run_commit(stream, group, consumer, entry_ids, encoded, incr, hset)

    def _run_commit(
        self,
        stream: str,
        group: str,
        consumer: str | None,
        entry_ids: Sequence[str],
        outputs: Sequence[EncodedOutput],
        incr: Mapping[str, int] | None,
        hset: Mapping[str, Mapping[str, str | int | float]] | None,
    ) -> CommitResult:
        result = self._commit_script(stream, group, consumer, entry_ids, outputs, incr, hset)
        if not result.committed:
            log.warning(
                "commit on %s refused: %d entries no longer pending for %r",
                stream,
                len(result.not_pending),
                consumer,
            )
        return result

    # ---- backlog and dead letters ------------------------------------------------------------

    def backlog(self, stream: str) -> int:
        """Records in ``stream`` not yet acknowledged (undelivered plus pending).

        Committed and dead-lettered entries are deleted, so this is XLEN (works on Redis 6.2).
        """
        return int(self.client.xlen(stream))

    def dead_letter(
        self, stream: str, group: str, consumer: str, entry_id: str, reason: str
    ) -> bool:
        """Move a pending entry that decoded but cannot be used (e.g. a group size the run does
        not use) to the dead stream with ``reason``, atomically, like a malformed record.

        Returns False when the entry is no longer there (another consumer took it).
        """
        rows = self.client.xrange(stream, entry_id, entry_id)
        if not rows:
            return False
        self._dead_letter(stream, group, consumer, entry_id, rows[0][1], reason)
        return True

"""A rollout engine's end of the weight group: it joins by name, follows the publishes in order
on the right generation's group, and loads each version bucket by bucket as it arrives.

It receives into a pool of two bucket buffers (the next bucket arrives while this one loads),
checks each bucket against its digest and loads it before the buffer is reused. Outside a group,
or dirty after a version failed midway, it loads the newest catch-up file instead.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.weightsync.base import Into, WeightReceiver, bucket_aliases
from services.weightsync.checksum import (
    SAMPLE_PREFIX,
    WeightSyncError,
    bucket_digest,
    combine_sample_parts,
    sample_part,
    sampled_names,
)
from services.weightsync.collective.buckets import Bucket, bucket_nbytes, slot_view, unflatten
from services.weightsync.collective.group import (
    GroupLost,
    broadcast,
    get_json,
    new_group,
    on_group,
    parse_address,
    recv_json,
    wait_for,
)
from services.weightsync.files import FilesReceiver

log = logging.getLogger(__name__)


class CollectiveReceiver(WeightReceiver):
    """A rollout engine's end of the broadcast.

    Args:
        address: ``host:port`` of rank 0's rendezvous store.
        name: this engine's stable name (``rollout-{index}``): a restart under the same name
            replaces the old member.
        device: where buckets land (``cuda:i`` joins an NCCL group, ``cpu`` a gloo one; must
            match the publisher's side).
        catchup_dir: the publisher's catch-up files, read before this engine is in a group.
    """

    def __init__(
        self,
        address: str,
        name: str,
        *,
        device: str | torch.device = "cpu",
        catchup_dir: str | Path | None = None,
        timeout_s: float = 300.0,
        sample_every: int = 1,
        sample_elements: int = 1024,
    ) -> None:
        self.address = address
        self.name = name
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.sample = (sample_every, sample_elements)
        self.catchup = (
            FilesReceiver(catchup_dir, timeout_s, *self.sample) if catchup_dir is not None else None
        )
        self.version = -1
        self.seq = 0
        self.generation = 0
        self._pg: Any = None
        self._pool: list[torch.Tensor] = []  # two byte buffers, each the largest bucket
        self._connect()

    def _connect(self) -> None:
        host, port = parse_address(self.address)
        self.store = dist.TCPStore(
            host, port, None, False, datetime.timedelta(seconds=self.timeout_s)
        )
        self.epoch = self.store.get("epoch").decode()
        self.seq, self.generation = 0, 0
        self._join()

    def _join(self) -> None:
        self.ticket = int(self.store.add("joins", 1))
        self.store.set(f"join/{self.ticket}", self.name)
        self._pg = None
        log.info("weight sync: %s asked to join (ticket %d)", self.name, self.ticket)

    def _beat(self) -> None:
        self.store.add(f"hb/{self.ticket}", 1)

    def _dropped(self) -> str | None:
        """Why rank 0 left this engine's ticket out of the group, or None."""
        key = f"dropped/{self.ticket}"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _abandoned(self) -> str | None:
        """Why the broadcast this engine waits on will never complete, or None: rank 0 left
        this engine out of the group (it drops the group when a member dies mid-broadcast),
        restarted, or is gone."""
        try:
            dropped = self._dropped()
            if dropped is not None:
                return dropped
            if self.store.get("epoch").decode() != self.epoch:
                return "the publisher restarted"
        except (RuntimeError, dist.DistError) as exc:
            return f"the rendezvous store is gone: {exc}"
        return None

    def _leave_group(self) -> None:
        """Let go of the group after a failure. A broadcast the publisher abandoned may still be
        pending on it (until the group's timeout), and a process group's teardown waits for its
        pending work: it is let go on a thread of its own, with the buffers those receives
        were posted into."""
        if self._pg is not None:
            box, self._pg = [self._pg], None  # no other reference: the thread's is the last
            threading.Thread(target=_let_go, args=(box,), daemon=True).start()
        self._pool = []

    def _latest(self) -> dict[str, int] | None:
        try:
            self._beat()
            epoch = self.store.get("epoch").decode()
        except (RuntimeError, dist.DistError) as exc:  # the publisher's store went away
            log.warning(
                "weight sync: %s lost the rendezvous store (%s); reconnecting", self.name, exc
            )
            self._connect()
            epoch = self.epoch
        dropped = self._dropped()
        if dropped is not None:
            log.warning(
                "weight sync: %s was left out of the group (%s); joining again", self.name, dropped
            )
            self._join()
        if epoch != self.epoch:
            # rank 0 restarted: a new store, new tickets and generations
            log.warning("weight sync: %s sees a restarted publisher; joining again", self.name)
            self.epoch = epoch
            self.seq, self.generation = 0, 0
            self._join()
        return get_json(self.store, "latest")

    def latest_version(self) -> int:
        latest = self._latest()
        return -1 if latest is None else int(latest["version"])

    def has_update(self) -> bool:
        """True when :meth:`receive` has something to do (a broadcast to take part in, or
        catch-up files newer than what is loaded). Collective members must call receive then,
        even when the version number did not change (a rewind), or the publisher waits."""
        latest = self._latest()
        if self.dirty:  # a version failed midway: restore before generating
            return True
        if latest is None:
            return False
        if self._pg is not None or self._member_of(int(latest["gen"])):
            return int(latest["seq"]) > self.seq
        return self._catch_up_due(latest)

    def _catch_up_due(self, latest: dict[str, int]) -> bool:
        """Whether the newest catch-up file should load: always when the engine holds nothing
        or part of a version (dirty); else only when it is the published version (files are
        written every ``catchup_every`` versions, so an older one would take an engine back)."""
        if self.catchup is None:
            return False
        newest = self.catchup.latest_version()
        if newest == -1:
            return False
        if self.dirty or self.version == -1:
            return True
        return newest == int(latest["version"]) and newest != self.version

    def _member_of(self, generation: int) -> bool:
        record = get_json(self.store, f"gen/{generation}")
        return record is not None and [self.name, self.ticket] in record["members"]

    def receive(self, into: Into) -> int | None:
        """Take part in the pending broadcasts, loading each version bucket by bucket as it
        arrives; outside a group (or dirty after a version failed midway), load the newest
        catch-up file. Returns the version the engine now holds whole, or None."""
        latest = self._latest()
        if latest is None:
            return None
        loaded: int | None = None
        try:
            if self._pg is None:
                with on_group():
                    self._enter_generation(int(latest["gen"]))
            while self._pg is not None and self.seq < int(latest["seq"]):
                s = self.seq + 1
                record = get_json(self.store, f"seq/{s}")
                if record is None:  # so far behind its records are gone: start over
                    log.warning(
                        "weight sync: %s is too far behind (publish #%d is gone); re-joining",
                        self.name,
                        s,
                    )
                    self._join()
                    break
                if int(record["gen"]) != self.generation:
                    with on_group():
                        entered = self._enter_generation(int(record["gen"]))
                    if not entered:
                        break  # left out of the new generation: catch-up files, a re-join
                loaded = self._receive_one(s, into)
                self.seq = s
        except GroupLost as exc:  # the publisher or a peer died mid-transfer
            self._leave_group()
            log.warning(
                "weight sync: %s lost its group (%s); re-joining%s",
                self.name,
                exc,
                " (the engine holds part of a version: restoring from the catch-up files)"
                if self.dirty
                else "",
            )
            self._join()
        if loaded is not None and not self.dirty:
            return loaded
        if not self._catch_up_due(latest):
            return None
        return self._catch_up(into)

    def _enter_generation(self, generation: int) -> bool:
        """Build the group of ``generation`` if this engine is in it and continue just before its
        first publish; False (and no group) when it is not in it."""
        self._pg = None
        record = get_json(self.store, f"gen/{generation}")
        if record is None or [self.name, self.ticket] not in record["members"]:
            return False
        rank = record["members"].index([self.name, self.ticket]) + 1
        self._pg = new_group(
            self.store,
            generation,
            rank,
            len(record["members"]) + 1,
            record["backend"],
            self.timeout_s,
        )
        self.generation = generation
        self.seq = int(record["from_seq"]) - 1
        log.info("weight sync: %s is rank %d of generation %d", self.name, rank, generation)
        return True

    def _receive_one(self, seq: int, into: Into) -> int:
        """Receive publish ``seq`` and load it bucket by bucket; returns its version."""
        with on_group():
            header = recv_json(self._pg, self.device, self._abandoned)
        if int(header["seq"]) != seq:
            raise WeightSyncError(
                f"weight sync: expected publish #{seq}, the header says #{header['seq']}"
            )
        version = int(header["version"])
        self._load_version(into, version, self._buckets(header, version, seq))
        return version

    def _buffers(self, buckets: list[Bucket]) -> list[torch.Tensor]:
        """The two receive buffers, grown to the largest bucket (kept between versions)."""
        need = max((bucket_nbytes(b) for b in buckets), default=0)
        if not self._pool or self._pool[0].numel() < need:
            self._pool = []  # let the old ones go before the new ones are taken
            self._pool = [
                torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(2)
            ]
        return self._pool

    def _buckets(
        self, header: dict[str, Any], version: int, seq: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Each bucket of the publish, checked against its digest, as views into one of the
        two receive buffers (valid until the next bucket is asked for). Bucket ``i + 1``
        arrives while ``i`` is loaded; ``i + 2`` is posted into ``i``'s buffer once ``i``
        loaded. A bucket that fails its check is not handed out, nor any after it: the rest
        of the publish is drained (the publisher is not left waiting), then WeightSyncError."""
        buckets = [Bucket.from_json(b) for b in header["buckets"]]
        aliases = header.get("aliases", {})
        every, k = self.sample
        sampled = sampled_names({n for b in buckets for n, _, _ in b.tensors}, every)
        slots = self._buffers(buckets)
        digests = [torch.empty(32, dtype=torch.uint8, device=self.device) for _ in range(2)]
        where = f"broadcast #{seq} to {self.name}"

        def post(i: int) -> tuple[torch.Tensor, list[Any]]:
            flat = slot_view(slots[i % 2], buckets[i])
            with on_group():
                works = [
                    broadcast(self._pg, flat, wait=False),
                    broadcast(self._pg, digests[i % 2], wait=False),
                ]
            return flat, works

        parts: dict[str, bytes] = {}
        bad: str | None = None
        in_flight = deque(post(i) for i in range(min(2, len(buckets))))
        for i, bucket in enumerate(buckets):
            flat, works = in_flight.popleft()
            with on_group():
                for work in works:
                    wait_for(work, self._abandoned)
            if bad is None:
                self._on_bucket(version, i, flat)
                tensors = unflatten(flat, bucket)
                mine = {n: sample_part(n, t, k) for n, t in tensors.items() if n in sampled}
                if bucket_digest(mine) != bytes(digests[i % 2].cpu().numpy()):
                    bad = (
                        f"weights of version {version} arrived corrupted ({where}): bucket "
                        f"{i + 1} of {len(buckets)} ({bucket.tensors[0][0]} ...) does not match "
                        "its sampled checksum and was not loaded; the engine holds part of the "
                        "version and will not generate; stopping rather than generating with "
                        "weights the learner never had"
                    )
                else:
                    parts.update(mine)
                    yield bucket_aliases(tensors, aliases)
            if i + 2 < len(buckets):
                in_flight.append(post(i + 2))
        with on_group():
            trailer = recv_json(self._pg, self.device, self._abandoned)
        # The whole publish is consumed: past it, whatever its check says. A receiver left one
        # publish behind would wait for a broadcast already sent (until timeout_s) before it
        # restored itself, and read the next publish's header as a stream out of step.
        self.seq = seq
        if bad is not None:
            raise WeightSyncError(bad)
        got, sent = combine_sample_parts(parts), str(trailer["checksum"])
        if got != sent:
            raise WeightSyncError(
                f"weights of version {version} arrived corrupted ({where}): sampled checksum "
                f"{got.removeprefix(SAMPLE_PREFIX)[:12]} != published "
                f"{sent.removeprefix(SAMPLE_PREFIX)[:12]}"
            )

    def _on_bucket(self, version: int, index: int, flat: torch.Tensor) -> None:
        """Called with each bucket as it arrives (a test injects corruption here)."""

    def _catch_up(self, into: Into) -> int | None:
        """Not in a group yet, or dirty: load the newest catch-up file if it differs from what
        is loaded (dirty: whatever it is, so the engine holds one whole version again)."""
        if self.catchup is None:
            return None
        was_dirty = self.dirty
        self.catchup.version, self.catchup.dirty = self.version, self.dirty
        try:
            got = self.catchup.receive(into)
        finally:
            self.dirty = self.catchup.dirty
        if got is not None:
            self.version = got
            log.info(
                "weight sync: %s %s version %d from %s",
                self.name,
                "restored itself (a version had failed midway) to" if was_dirty else "caught up to",
                got,
                self.catchup.directory,
            )
        return got

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, dist.DistError):  # the publisher may be gone already
            self.store.set(f"leave/{self.ticket}", "1")
        self._pg = None


def _let_go(box: list[Any]) -> None:
    box.clear()  # the last reference: the group's teardown runs (and waits) here

"""The weight group's rendezvous and membership: the TCP store rank 0 serves, the process group
of each generation, the small messages and broadcasts on it, and rank 0's record of who is in.

Store keys (all under rank 0's store): ``epoch`` (changes when rank 0 restarts), ``joins`` (a
counter handing out tickets), ``join/{ticket}`` (the engine's name), ``hb/{ticket}`` (its
heartbeat counter), ``leave/{ticket}`` and ``dropped/{ticket}`` (it left, or was left out, and
why), ``gen/{g}`` (generation ``g``'s members, backend and first publish), ``seq/{s}`` (the
generation and version of publish ``s``) and ``latest`` (the newest publish).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from services.weightsync.checksum import WeightSyncError

log = logging.getLogger(__name__)

KEEP_SEQ_RECORDS = 256  # old seq records are deleted past this (a receiver that far behind rejoins)


class GroupLost(Exception):
    """A collective of the weight group failed (a peer died or timed out)."""


@contextlib.contextmanager
def on_group() -> Iterator[None]:
    """Collective calls inside raise :class:`GroupLost` when the group fails, so a failure of
    the engine's own loading is never mistaken for a lost peer."""
    try:
        yield
    except WeightSyncError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        raise GroupLost(str(exc)) from exc


Abandoned = Callable[[], str | None]
"""Asked while a receiver waits on a collective: why the publisher gave the broadcast up, or
None while it has not."""

ABANDON_POLL_S = 0.5


def broadcast(
    pg: Any, t: torch.Tensor, wait: bool = True, abandoned: Abandoned | None = None
) -> Any:
    """Broadcast from rank 0; ``wait=False`` returns the pending work, so the next bucket is
    packed (publisher) or posted (receiver) while this one is on the wire."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    work = pg.broadcast([t], opts)
    if wait:
        wait_for(work, abandoned)
    return work


def wait_for(work: Any, abandoned: Abandoned | None = None) -> None:
    """Wait for a pending collective. With ``abandoned``, wait :data:`ABANDON_POLL_S` seconds at
    a time and ask it in between, raising :class:`GroupLost` once it answers: when a peer dies
    mid-broadcast the publisher stops sending, and the other members would otherwise wait out
    the group's timeout (minutes) for data that never comes. (A timed wait that runs out leaves
    the work pending; a wait on a CUDA work only orders the stream and returns at once.)"""
    if abandoned is None:
        work.wait()
        return
    poll = datetime.timedelta(seconds=ABANDON_POLL_S)
    while True:
        try:
            work.wait(poll)
            return
        except (RuntimeError, dist.DistError):
            if work.is_completed():  # it failed, or finished as the wait ran out
                work.wait()
                return
        why = abandoned()
        if why is not None:
            raise GroupLost(f"the publisher gave the broadcast up ({why})")


def send_json(pg: Any, obj: Any, device: torch.device) -> None:
    """Broadcast a small JSON message from rank 0: its length, then its bytes."""
    data = json.dumps(obj).encode()
    broadcast(pg, torch.tensor([len(data)], dtype=torch.int64, device=device))
    broadcast(pg, torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device))


def recv_json(pg: Any, device: torch.device, abandoned: Abandoned | None = None) -> Any:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    broadcast(pg, size, abandoned=abandoned)
    raw = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    broadcast(pg, raw, abandoned=abandoned)
    return json.loads(bytes(raw.cpu().numpy()).decode())


def new_group(
    store: Any, generation: int, rank: int, size: int, backend: str, timeout_s: float
) -> Any:
    """A process group of ``size`` ranks under the store prefix of ``generation`` (blocks until
    every rank has constructed it; NCCL connects at the first collective)."""
    prefixed = dist.PrefixStore(f"g{generation}/", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, opts)
    return dist.ProcessGroupGloo(prefixed, rank, size, timeout)


def get_json(store: Any, key: str) -> Any | None:
    if not store.check([key]):
        return None
    return json.loads(store.get(key).decode())


def set_json(store: Any, key: str, value: Any) -> None:
    store.set(key, json.dumps(value))


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"weight_sync.rendezvous: expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


class Membership:
    """Rank 0's side of the group: the members (name -> ticket, in rank order: rank = position
    + 1), the generation and its process group (None until formed, or after a failure).

    Joins, leaves and silent members are folded in only at a publish (:meth:`announce`), which
    then forms a new generation: members start building its group when they see the publish
    that names it.
    """

    def __init__(self, store: Any, timeout_s: float, member_timeout_s: float) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.member_timeout_s = member_timeout_s
        self.members: dict[str, int] = {}
        self.generation = 0
        self.pg: Any = None
        self._joins_seen = 0
        self._beats: dict[int, tuple[int, float]] = {}  # ticket -> (counter, when it last moved)

    def announce(self, seq: int, version: int, backend: str) -> None:
        """Record publish ``seq`` of ``version`` for the receivers, on a new generation (whose
        group is then built here) if someone joined, left or fell silent."""
        regroup = self._changed()
        if regroup:
            self._new_generation(backend, seq)
        set_json(self.store, f"seq/{seq}", {"version": version, "gen": self.generation})
        self.store.set(
            "latest", json.dumps({"seq": seq, "version": version, "gen": self.generation})
        )
        if seq > KEEP_SEQ_RECORDS:
            self.store.delete_key(f"seq/{seq - KEEP_SEQ_RECORDS}")
        if regroup:
            self._build_group(backend)

    def drop_all(self, why: str) -> None:
        """Forget the group and tell every member it was left out (each re-joins)."""
        self.pg = None
        for name in list(self.members):
            self._drop(name, why)

    def _changed(self) -> bool:
        """Fold join requests, leaves and silent members into :attr:`members`; True if the
        group must be re-formed."""
        changed = self.pg is None and bool(self.members)
        count = self.store.add("joins", 0)
        for ticket in range(self._joins_seen + 1, count + 1):
            name = self.store.get(f"join/{ticket}").decode()
            old = self.members.pop(name, None)
            if old is not None:
                log.info("weight sync: %s re-joined (ticket %d replaces %d)", name, ticket, old)
            self.members[name] = ticket
            self._beats[ticket] = (-1, time.monotonic())
            changed = True
        self._joins_seen = count
        now = time.monotonic()
        for name, ticket in list(self.members.items()):
            beat = self.store.add(f"hb/{ticket}", 0)
            last, when = self._beats.get(ticket, (-1, now))
            if beat != last:
                self._beats[ticket] = (beat, now)
            elif now - when > self.member_timeout_s:
                log.warning(
                    "weight sync: %s silent for %.0fs; leaving it out of the group",
                    name,
                    now - when,
                )
                self._drop(name, "silent")
                changed = True
            elif self.store.check([f"leave/{ticket}"]):
                self.members.pop(name)
                changed = True
        return changed

    def _new_generation(self, backend: str, from_seq: int) -> None:
        """Announce a new generation (before anyone builds its group: members only start when
        they see the publish that names it)."""
        self.generation += 1
        self.pg = None
        record = {"members": list(self.members.items()), "backend": backend, "from_seq": from_seq}
        set_json(self.store, f"gen/{self.generation}", record)

    def _build_group(self, backend: str) -> None:
        if not self.members:
            return
        t0 = time.perf_counter()
        self.pg = new_group(
            self.store, self.generation, 0, len(self.members) + 1, backend, self.timeout_s
        )
        log.info(
            "weight sync: generation %d with %d engines (%s) formed in %.2fs",
            self.generation,
            len(self.members),
            backend,
            time.perf_counter() - t0,
        )

    def _drop(self, name: str, why: str) -> None:
        ticket = self.members.pop(name)
        self.store.set(f"dropped/{ticket}", why)

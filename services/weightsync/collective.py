"""Bucketed broadcast from learner rank 0 into every rollout engine over a process group of
their own (NCCL on GPU, gloo on CPU), separate from the learner's training group.

Per version the publisher sends a small header (version, sequence number, the bucket layout,
aliases), then one broadcast per *bucket*: many tensors of one wire dtype copied into one flat
buffer of about ``bucket_mb``, then a trailer with the sampled checksum (computed bucket by bucket,
so a ZeRO-3 learner can gather, pack and release one bucket at a time). Receivers unflatten the
buckets into views, check the checksum and copy into their model (or, inside a vLLM worker, load
them into vLLM's model). bf16 models travel as bf16 (``wire_dtype: auto``). The broadcast is sent
from the device the learner's tensors are on: no host copy on the way.

Rendezvous and membership go through a TCP store that rank 0 serves (``host:port``):

- An engine *joins* by name (``rollout-3``); a join with a name already in the group replaces the
  old member, which is how a restarted engine takes its own place back.
- Groups are re-formed only at a publish, as a new *generation* ``g`` (store prefix ``g{g}/``)
  when someone joined, left, or fell silent for ``member_timeout_s`` (engines bump a heartbeat
  counter each time they poll; rank 0 times it with its own clock, so no clocks need agree).
- Every publish gets a sequence number ``s`` and a record ``seq/{s}`` naming its generation;
  receivers walk the records in order, so one that is a few versions behind receives them all
  on the right group and loads the newest.

Late joiners (chosen design): an engine that starts late or restarts first loads the current
version from the *catch-up* files (``weight_sync.path``, written by rank 0 every
``catchup_every`` versions in a background thread, off the broadcast's critical path), so it can
generate at once; its join request makes the next publish form a new generation that includes it,
and from then on it receives by broadcast. With ``catchup_every: 0`` a late engine waits for the
next publish instead. A failed broadcast (a member died mid-transfer) drops the group: rank 0
writes that version to the catch-up files, every live engine re-joins, and the next publish forms
a group without the dead one; the run does not stop. Only a checksum mismatch stops it.

A publish blocks until every member of the group has called :meth:`receive` (a collective has no
other way): engines poll between generations, so the learner waits at most one generation.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.weightsync.base import (
    GatheredWeights,
    Into,
    NamedTensors,
    WeightPublisher,
    WeightReceiver,
    load_into,
    split_aliases,
    with_aliases,
)
from services.weightsync.checksum import (
    WeightSyncError,
    combine_sample_parts,
    sample_checksum,
    sample_part,
    sampled_names,
    verify_checksum,
)
from services.weightsync.files import FilesReceiver, write_version

log = logging.getLogger(__name__)

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
_KEEP_SEQ_RECORDS = (
    256  # old seq records are deleted past this (a receiver that far behind rejoins)
)


# ---- buckets --------------------------------------------------------------------------------


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class Bucket:
    """One flat buffer's layout: its wire dtype, total elements, and (name, shape, offset) of
    each tensor in it."""

    dtype: str
    numel: int
    tensors: tuple[tuple[str, tuple[int, ...], int], ...]

    def to_json(self) -> list[Any]:
        return [self.dtype, self.numel, [[n, list(s), o] for n, s, o in self.tensors]]

    @staticmethod
    def from_json(obj: list[Any]) -> Bucket:
        dtype, numel, tensors = obj
        return Bucket(dtype, int(numel), tuple((n, tuple(s), int(o)) for n, s, o in tensors))


def plan_buckets(named: dict[str, torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Group tensors (already in wire dtype) into buckets of one dtype and about
    ``bucket_bytes`` each, in the mapping's order; a tensor larger than a bucket gets one of its
    own; ``bucket_bytes == 0`` puts every tensor in its own bucket (one broadcast per tensor)."""
    return plan_layout({n: (tuple(t.shape), t.dtype) for n, t in named.items()}, bucket_bytes)


def plan_layout(
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]], bucket_bytes: int
) -> list[Bucket]:
    """:func:`plan_buckets` from shapes and (wire) dtypes alone, before any tensor exists."""
    buckets: list[Bucket] = []
    open_: dict[torch.dtype, tuple[list[tuple[str, tuple[int, ...], int]], int]] = {}

    def close(dtype: torch.dtype) -> None:
        entries, numel = open_.pop(dtype)
        buckets.append(Bucket(str(dtype).removeprefix("torch."), numel, tuple(entries)))

    for name, (shape, dtype) in layout.items():
        size = math.prod(shape)
        if dtype in open_:
            entries, numel = open_[dtype]
            if (numel + size) * _itemsize(dtype) > bucket_bytes:
                close(dtype)
        entries, numel = open_.setdefault(dtype, ([], 0))
        entries.append((name, tuple(shape), numel))
        open_[dtype] = (entries, numel + size)
    for dtype in list(open_):
        close(dtype)
    return buckets


def flatten(
    named: dict[str, torch.Tensor], bucket: Bucket, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The bucket's flat buffer ``[bucket.numel]``, reusing ``out`` when it fits."""
    first = named[bucket.tensors[0][0]]
    if (
        out is None
        or out.numel() != bucket.numel
        or out.dtype != first.dtype
        or out.device != first.device
    ):
        out = torch.empty(bucket.numel, dtype=first.dtype, device=first.device)
    for name, _shape, offset in bucket.tensors:
        n = named[name].numel()
        out[offset : offset + n].copy_(named[name].reshape(-1))
    return out


def unflatten(flat: torch.Tensor, bucket: Bucket) -> dict[str, torch.Tensor]:
    """Views into ``flat`` shaped as the bucket's tensors (no copy)."""
    out = {}
    for name, shape, offset in bucket.tensors:
        n = 1
        for d in shape:
            n *= d
        out[name] = flat[offset : offset + n].view(shape)
    return out


class _Held(GatheredWeights):
    """A plain mapping of whole tensors as a :class:`GatheredWeights` (nothing to gather)."""

    def __init__(self, named_tensors: NamedTensors) -> None:
        self.unique, self._aliases = split_aliases(named_tensors)

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (tuple(t.shape), t.dtype) for n, t in self.unique.items()}

    def aliases(self) -> dict[str, str]:
        return self._aliases

    def device(self) -> torch.device:
        return next(iter(self.unique.values())).device if self.unique else torch.device("cpu")

    @contextlib.contextmanager
    def gather(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        yield {n: self.unique[n] for n in names}


def _host_copy(
    source: GatheredWeights,
    buckets: list[Bucket],
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> dict[str, torch.Tensor]:
    """Every tensor of ``source`` on the host in its wire dtype, gathered bucket by bucket."""
    out: dict[str, torch.Tensor] = {}
    for bucket in buckets:
        names = [n for n, _, _ in bucket.tensors]
        with source.gather(names) as whole:
            for n in names:
                out[n] = whole[n].detach().to("cpu", layout[n][1], copy=True)
    return out


def _send_json(pg: Any, obj: Any, device: torch.device) -> None:
    """Broadcast a small JSON message from rank 0: its length, then its bytes."""
    data = json.dumps(obj).encode()
    _broadcast(pg, torch.tensor([len(data)], dtype=torch.int64, device=device))
    _broadcast(pg, torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device))


def _recv_json(pg: Any, device: torch.device) -> Any:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    _broadcast(pg, size)
    raw = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    _broadcast(pg, raw)
    return json.loads(bytes(raw.cpu().numpy()).decode())


# ---- the rendezvous store ---------------------------------------------------------------------


def _broadcast(pg: Any, t: torch.Tensor, wait: bool = True) -> Any:
    """Broadcast from rank 0; ``wait=False`` returns the pending work, so the next bucket is
    packed (publisher) or posted (receiver) while this one is on the wire."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    work = pg.broadcast([t], opts)
    if wait:
        work.wait()
    return work


def _new_group(
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


def _get_json(store: Any, key: str) -> Any | None:
    if not store.check([key]):
        return None
    return json.loads(store.get(key).decode())


def _set_json(store: Any, key: str, value: Any) -> None:
    store.set(key, json.dumps(value))


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"weight_sync.rendezvous: expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


# ---- the publisher ----------------------------------------------------------------------------


class CollectivePublisher(WeightPublisher):
    """Learner rank 0: serves the rendezvous store and broadcasts each version from the device
    the learner's tensors are on (NCCL from GPU memory, gloo from host memory).

    Args:
        host, port: where the rendezvous store listens (``port=0``: a free one, see
            :attr:`address`).
        bucket_bytes: bytes per bucket (0: one tensor per broadcast).
        wire: forced wire dtype for floating tensors, None keeps each tensor's own.
        catchup_dir, catchup_every, keep_last: the late joiners' files (None/0: none).
        timeout_s: rendezvous and broadcast timeout.
        member_timeout_s: a member whose heartbeat did not move for this long leaves at the next
            publish.
    """

    from_device = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        bucket_bytes: int = 64 << 20,
        wire: torch.dtype | None = None,
        catchup_dir: str | Path | None = None,
        catchup_every: int = 1,
        keep_last: int = 2,
        timeout_s: float = 300.0,
        member_timeout_s: float = 60.0,
        sample_every: int = 1,
        sample_elements: int = 1024,
    ) -> None:
        self.timeout_s = timeout_s
        self.store = dist.TCPStore(
            host, port, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self.address = f"{host}:{self.store.port}"
        self.bucket_bytes = bucket_bytes
        self.wire = wire
        self.catchup_dir = Path(catchup_dir) if catchup_dir is not None else None
        self.catchup_every = catchup_every if catchup_dir is not None else 0
        self.keep_last = keep_last
        self.member_timeout_s = member_timeout_s
        self.sample = (sample_every, sample_elements)
        self.epoch = uuid.uuid4().hex
        self.store.set("epoch", self.epoch)
        self.seq = 0
        self.generation = 0
        self.members: dict[str, int] = {}  # name -> ticket, in rank order (rank = position + 1)
        self._joins_seen = 0
        self._beats: dict[int, tuple[int, float]] = {}  # ticket -> (counter, when it last moved)
        self._pg: Any = None
        self._buffers: list[torch.Tensor] = []
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self.last_timing: dict[str, float] = {}

    # -- membership --

    def _membership_changed(self) -> bool:
        """Fold join requests, leaves and silent members into ``self.members``; True if the
        group must be re-formed."""
        changed = self._pg is None and bool(self.members)
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

    def _new_generation(self, backend: str) -> None:
        """Announce a new generation (before anyone builds its group: members only start when
        they see the publish that names it)."""
        self.generation += 1
        self._pg = None
        record = {"members": list(self.members.items()), "backend": backend, "from_seq": self.seq}
        _set_json(self.store, f"gen/{self.generation}", record)

    def _build_group(self, backend: str) -> None:
        if not self.members:
            return
        t0 = time.perf_counter()
        self._pg = _new_group(
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

    # -- publishing --

    def _pack(
        self, wire: dict[str, torch.Tensor], index: int, bucket: Bucket, transient: bool
    ) -> torch.Tensor:
        """The bucket's flat buffer: a one-tensor bucket of tensors that outlive the publish is
        the tensor itself (no copy); others are packed into a buffer kept from the previous
        publish (``transient``: the tensors are released right after packing)."""
        if len(bucket.tensors) == 1 and not transient:
            return wire[bucket.tensors[0][0]].reshape(-1)
        self._buffers[index] = flatten(wire, bucket, self._buffers[index])
        return self._buffers[index]

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.wire is None or not dtype.is_floating_point else self.wire

    def publish(
        self, version: int, named_tensors: NamedTensors | GatheredWeights, *, rewind: bool = False
    ) -> float:
        """Broadcast ``named_tensors`` as ``version``: a header (version, sequence number, the
        bucket layout, aliases), one broadcast per bucket, then a trailer with the sampled
        checksum. A :class:`GatheredWeights` source is gathered one bucket at a time, packed and
        let go while the previous bucket is on the wire, so the whole model is never held
        twice; the catch-up files alone take a host copy (every ``catchup_every`` versions)."""
        t0 = time.perf_counter()
        self._check_writer()
        source = (
            named_tensors if isinstance(named_tensors, GatheredWeights) else _Held(named_tensors)
        )
        transient = not isinstance(source, _Held)
        aliases = source.aliases()
        layout = {n: (shape, self._wire_dtype(dt)) for n, (shape, dt) in source.layout().items()}
        buckets = plan_layout(layout, self.bucket_bytes)
        if len(self._buffers) != len(buckets):
            self._buffers = [None] * len(buckets)  # type: ignore[list-item]
        sampled = sampled_names(set(layout), self.sample[0])
        device = source.device()
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.seq += 1
        catchup_due = bool(self.catchup_every) and (
            rewind or self.seq == 1 or self.seq % self.catchup_every == 0
        )
        host: dict[str, torch.Tensor] | None = {} if catchup_due else None
        parts: dict[str, bytes] = {}
        pack_s = 0.0
        t_group = t0
        try:
            regroup = self._membership_changed()
            if regroup:
                self._new_generation(backend)
            _set_json(self.store, f"seq/{self.seq}", {"version": version, "gen": self.generation})
            self.store.set(
                "latest", json.dumps({"seq": self.seq, "version": version, "gen": self.generation})
            )
            if self.seq > _KEEP_SEQ_RECORDS:
                self.store.delete_key(f"seq/{self.seq - _KEEP_SEQ_RECORDS}")
            if regroup:
                self._build_group(backend)
            t_group = time.perf_counter()
            pg = self._pg
            if pg is not None:
                header = {
                    "version": version,
                    "seq": self.seq,
                    "aliases": aliases,
                    "buckets": [b.to_json() for b in buckets],
                }
                _send_json(pg, header, device)
            pending = []
            for index, bucket in enumerate(buckets):
                t_pack = time.perf_counter()
                names = [n for n, _, _ in bucket.tensors]
                with source.gather(names) as whole:
                    wire = {n: whole[n].detach().to(layout[n][1]) for n in names}
                    flat = self._pack(wire, index, bucket, transient)
                for name in sampled.intersection(names):
                    parts[name] = sample_part(name, wire[name], self.sample[1])
                if host is not None:
                    host.update(unflatten(flat.to("cpu", copy=True), bucket))
                del wire
                pack_s += time.perf_counter() - t_pack
                if pg is not None:
                    pending.append(_broadcast(pg, flat, wait=False))
            for work in pending:
                work.wait()
            checksum = combine_sample_parts(parts)
            if pg is not None:
                _send_json(pg, {"checksum": checksum}, device)
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
            failed = False
        except (RuntimeError, dist.DistError) as exc:  # a member died or timed out mid-broadcast
            log.warning(
                "weight sync: broadcast of version %d on generation %d failed (%s); "
                "dropping the group, engines re-join at the next publish",
                version,
                self.generation,
                exc,
            )
            self._pg = None
            for name in list(self.members):
                self._drop(name, "broadcast failed")
            failed = True
        t_bcast = time.perf_counter()
        if self.catchup_every and (failed or catchup_due):
            if failed or host is None or len(host) != len(layout):
                host = _host_copy(source, buckets, layout)
            checksum = sample_checksum(host, *self.sample)
            self._write_catchup(version, host, checksum, rewind, aliases, wait=failed or rewind)
        self.last_timing = {
            "pack_s": pack_s,
            "group_s": t_group - t0,
            "broadcast_s": t_bcast - t_group - pack_s,
            "total_s": time.perf_counter() - t0,
            "buckets": float(len(buckets)),
        }
        return time.perf_counter() - t0

    def _write_catchup(
        self,
        version: int,
        views: dict[str, torch.Tensor],
        checksum: str,
        rewind: bool,
        aliases: dict[str, str],
        wait: bool,
    ) -> None:
        """Write the version for late joiners from host copies, in a background thread (off the
        broadcast's critical path); one write in flight at most."""
        self._join_writer()
        cpu = views  # host copies made for this write: the learner's next step cannot touch them
        assert self.catchup_dir is not None

        def write() -> None:
            try:
                write_version(
                    self.catchup_dir, version, cpu, checksum, self.keep_last, rewind, aliases
                )  # type: ignore[arg-type]
            except BaseException as exc:  # surfaced at the next publish
                self._writer_error = exc

        self._writer = threading.Thread(target=write, name="weightsync-catchup", daemon=True)
        self._writer.start()
        if wait:
            self._join_writer()

    def _join_writer(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self._check_writer()

    def _check_writer(self) -> None:
        if self._writer_error is not None:
            exc, self._writer_error = self._writer_error, None
            raise WeightSyncError(
                f"writing the catch-up weights under {self.catchup_dir} failed: {exc}"
            ) from exc

    def flush(self) -> None:
        """Wait for the catch-up write in flight (tests; before exit)."""
        self._join_writer()

    def close(self) -> None:
        self.flush()
        self._pg = None


# ---- the receiver -----------------------------------------------------------------------------


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
        self._buffers: list[torch.Tensor] = []
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
        if self.store.check([f"dropped/{self.ticket}"]):
            log.warning(
                "weight sync: %s was left out of the group (%s); joining again",
                self.name,
                self.store.get(f"dropped/{self.ticket}").decode(),
            )
            self._join()
        if epoch != self.epoch:
            # rank 0 restarted: a new store, new tickets and generations
            log.warning("weight sync: %s sees a restarted publisher; joining again", self.name)
            self.epoch = epoch
            self.seq, self.generation = 0, 0
            self._join()
        return _get_json(self.store, "latest")

    def latest_version(self) -> int:
        latest = self._latest()
        return -1 if latest is None else int(latest["version"])

    def has_update(self) -> bool:
        """True when :meth:`receive` has something to do (a broadcast to take part in, or
        catch-up files newer than what is loaded). Collective members must call receive then,
        even when the version number did not change (a rewind), or the publisher waits."""
        latest = self._latest()
        if latest is None:
            return False
        if self._pg is not None or self._member_of(int(latest["gen"])):
            return int(latest["seq"]) > self.seq
        return self.catchup is not None and self.catchup.latest_version() not in (-1, self.version)

    def _member_of(self, generation: int) -> bool:
        record = _get_json(self.store, f"gen/{generation}")
        return record is not None and [self.name, self.ticket] in record["members"]

    def receive(self, into: Into) -> int | None:
        latest = self._latest()
        if latest is None:
            return None
        got: tuple[int, dict[str, torch.Tensor]] | None = None
        try:
            if self._pg is None:
                self._enter_generation(int(latest["gen"]))
            while self._pg is not None and self.seq < int(latest["seq"]):
                s = self.seq + 1
                record = _get_json(self.store, f"seq/{s}")
                if record is None:  # so far behind its records are gone: start over
                    log.warning(
                        "weight sync: %s is too far behind (publish #%d is gone); re-joining",
                        self.name,
                        s,
                    )
                    self._join()
                    break
                if int(record["gen"]) != self.generation and not self._enter_generation(
                    int(record["gen"])
                ):
                    break  # left out of the new generation; the catch-up files and a re-join follow
                got = self._receive_one(s)
                self.seq = s
        except WeightSyncError:
            raise
        except (RuntimeError, dist.DistError) as exc:  # the publisher or a peer died mid-transfer
            log.warning("weight sync: %s lost its group (%s); re-joining", self.name, exc)
            self._join()
        if got is not None:
            version, tensors = got
            load_into(into, tensors, version)
            self.version = version
            return version
        return self._catch_up(into)

    def _enter_generation(self, generation: int) -> bool:
        """Build the group of ``generation`` if this engine is in it and continue just before its
        first publish; False (and no group) when it is not in it."""
        self._pg = None
        record = _get_json(self.store, f"gen/{generation}")
        if record is None or [self.name, self.ticket] not in record["members"]:
            return False
        rank = record["members"].index([self.name, self.ticket]) + 1
        self._pg = _new_group(
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

    def _receive_one(self, seq: int) -> tuple[int, dict[str, torch.Tensor]]:
        header = _recv_json(self._pg, self.device)
        if int(header["seq"]) != seq:
            raise WeightSyncError(
                f"weight sync: expected publish #{seq}, the header says #{header['seq']}"
            )
        buckets = [Bucket.from_json(b) for b in header["buckets"]]
        if len(self._buffers) != len(buckets):
            self._buffers = [None] * len(buckets)  # type: ignore[list-item]
        bufs = []
        for i, b in enumerate(buckets):
            buf, dtype = self._buffers[i], _DTYPES[b.dtype]
            if buf is None or buf.numel() != b.numel or buf.dtype != dtype:
                buf = self._buffers[i] = torch.empty(b.numel, dtype=dtype, device=self.device)
            bufs.append(buf)
        works = [_broadcast(self._pg, buf, wait=False) for buf in bufs]
        tensors: dict[str, torch.Tensor] = {}
        for i, (work, buf, b) in enumerate(zip(works, bufs, buckets, strict=True)):
            work.wait()
            self._on_bucket(int(header["version"]), i, buf)
            tensors.update(unflatten(buf, b))
        version = int(header["version"])
        trailer = _recv_json(self._pg, self.device)
        verify_checksum(
            trailer["checksum"], tensors, version, f"broadcast #{seq} to {self.name}", *self.sample
        )
        return version, with_aliases(tensors, header.get("aliases", {}))

    def _on_bucket(self, version: int, index: int, flat: torch.Tensor) -> None:
        """Called with each bucket as it arrives (a test injects corruption here)."""

    def _catch_up(self, into: Into) -> int | None:
        """Not in a group yet: load the newest catch-up file if it differs from what is loaded."""
        if self.catchup is None:
            return None
        self.catchup.version = self.version
        got = self.catchup.receive(into)
        if got is not None:
            self.version = got
            log.info(
                "weight sync: %s caught up to version %d from %s",
                self.name,
                got,
                self.catchup.directory,
            )
        return got

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, dist.DistError):  # the publisher may be gone already
            self.store.set(f"leave/{self.ticket}", "1")
        self._pg = None

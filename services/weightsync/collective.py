"""Bucketed broadcast from learner rank 0 into every rollout engine over a process group of
their own (NCCL on GPU, gloo on CPU), separate from the learner's training group.

Per version the publisher sends a small header (version, sequence number, the bucket layout,
aliases), then per *bucket* one broadcast of its flat buffer (many tensors of one wire dtype,
about ``bucket_mb``) and one of its 32-byte digest (the sampled checksum's part for the bucket's
tensors), then a trailer with the version's sampled checksum. bf16 models travel as bf16
(``wire_dtype: auto``). The broadcast is sent from the device the learner's tensors are on.

Neither side ever holds a second copy of the model. The publisher packs into a ring of two
bucket buffers (a ZeRO-3 learner gathers, packs and releases one bucket at a time; a one-tensor
bucket of a plain tensor is sent as is), with at most two buckets in flight. A receiver receives
into a pool of two bucket buffers (double-buffered: the next bucket arrives while this one
loads), checks each bucket against its digest and loads it into its model (or, inside a vLLM
worker, into vLLM's model) before the buffer is reused. The extra memory per side is therefore
about 2 x max(``bucket_mb``, the largest tensor), whatever the model's size. A version that fails
after its first bucket loaded leaves the engine *dirty* (:attr:`WeightReceiver.dirty`): it must
not generate until it restored itself from the catch-up files or loaded the next version whole.

Rendezvous and membership go through a TCP store that rank 0 serves (``host:port``):

- An engine *joins* by name (``rollout-3``); a join with a name already in the group replaces the
  old member, which is how a restarted engine takes its own place back.
- Groups are re-formed only at a publish, as a new *generation* ``g`` (store prefix ``g{g}/``)
  when someone joined, left, or fell silent for ``member_timeout_s`` (engines bump a heartbeat
  counter each time they poll; rank 0 times it with its own clock, so no clocks need agree).
- Every publish gets a sequence number ``s`` and a record ``seq/{s}`` naming its generation;
  receivers walk the records in order, so one that is a few versions behind receives them all
  on the right group and loads the newest.

Late joiners (chosen design): an engine that starts late or restarts first loads the newest
version from the *catch-up* files (``weight_sync.path``, written by rank 0 every
``catchup_every`` versions), so it can generate at once; its join request makes the next publish
form a new generation that includes it, and from then on it receives by broadcast. With
``catchup_every: 0`` a late engine waits for the next publish instead. The catch-up write is off
the broadcast's path: it starts once the trailer is sent (the engines already hold the version),
gathers the buckets again and copies each into one of two host staging buffers, which a
background thread streams into the file; ``publish`` returns once the last bucket is copied out
(the learner's next step may change its tensors), so the learner pays about the write's time
every ``catchup_every`` versions and never holds a host copy of the model.

A failed broadcast (a member died mid-transfer) drops the group: rank 0 writes that version to
the catch-up files, every live engine re-joins (an engine the failure left dirty restores itself
from those files), and the next publish forms a group without the dead one; the run does not
stop. Only a checksum mismatch stops it.

A publish blocks until every member of the group has called :meth:`receive` (a collective has no
other way): engines poll between generations, so the learner waits at most one generation.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
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
    bucket_aliases,
    split_aliases,
)
from services.weightsync.checksum import (
    SAMPLE_PREFIX,
    WeightSyncError,
    bucket_digest,
    combine_sample_parts,
    sample_part,
    sampled_names,
)
from services.weightsync.files import FilesReceiver, VersionWriter

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


def bucket_nbytes(bucket: Bucket) -> int:
    return bucket.numel * _itemsize(_DTYPES[bucket.dtype])


def _slot_view(slot: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """The bucket's flat buffer ``[bucket.numel]`` at the start of a byte buffer."""
    return slot[: bucket_nbytes(bucket)].view(_DTYPES[bucket.dtype])


def pack_into(flat: torch.Tensor, whole: dict[str, torch.Tensor], bucket: Bucket) -> None:
    """Copy the bucket's tensors into ``flat`` at their offsets (cast to its dtype)."""
    for name, _shape, offset in bucket.tensors:
        t = whole[name].detach()
        flat[offset : offset + t.numel()].copy_(t.reshape(-1), non_blocking=True)


def _digest_tensor(parts: dict[str, bytes], device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(bucket_digest(parts)), dtype=torch.uint8).to(device)


_ABANDON = ("abandon",)  # tells the catch-up writer the publisher stopped mid-version


class _GroupLost(Exception):
    """A collective of the weight group failed (a peer died or timed out)."""


@contextlib.contextmanager
def _on_group() -> Iterator[None]:
    """Collective calls inside raise :class:`_GroupLost` when the group fails, so a failure of
    the engine's own loading is never mistaken for a lost peer."""
    try:
        yield
    except WeightSyncError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        raise _GroupLost(str(exc)) from exc


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
        # Two byte buffers packed in turn (a bucket's is free again once its broadcast, two
        # buckets back, completed) and two host staging buffers for the catch-up writer.
        self._ring: list[torch.Tensor | None] = [None, None]
        self._staging: list[torch.Tensor | None] = [None, None]
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
        self,
        whole: dict[str, torch.Tensor],
        slot: int,
        bucket: Bucket,
        layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
        transient: bool,
    ) -> torch.Tensor:
        """The bucket's flat buffer: a one-tensor bucket of a tensor that outlives the publish,
        already in its wire dtype, is the tensor itself (no copy); others are copied (cast to
        the wire dtype) into ring buffer ``slot``, which grows to the largest bucket once.
        ``transient``: the tensors are released right after packing (a ZeRO-3 gather)."""
        if len(bucket.tensors) == 1 and not transient:
            name = bucket.tensors[0][0]
            t = whole[name].detach()
            if t.dtype == layout[name][1] and t.is_contiguous():
                return t.reshape(-1)
        device = next(iter(whole.values())).device
        buf = self._ring[slot]
        if buf is None or buf.numel() < bucket_nbytes(bucket) or buf.device != device:
            self._ring[slot] = buf = None  # let the old one go before the new one is taken
            buf = self._ring[slot] = torch.empty(
                bucket_nbytes(bucket), dtype=torch.uint8, device=device
            )
        flat = _slot_view(buf, bucket)
        pack_into(flat, whole, bucket)
        return flat

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.wire is None or not dtype.is_floating_point else self.wire

    def publish(
        self, version: int, named_tensors: NamedTensors | GatheredWeights, *, rewind: bool = False
    ) -> float:
        """Broadcast ``named_tensors`` as ``version``: a header (version, sequence number, the
        bucket layout, aliases), per bucket its buffer and its digest, then a trailer with the
        sampled checksum. Buckets are packed into a ring of two buffers, at most two in flight;
        a :class:`GatheredWeights` source is gathered one bucket at a time and let go once
        packed, so the learner holds about two buckets beyond its own weights. Every
        ``catchup_every`` versions the catch-up file is written after the broadcast."""
        t0 = time.perf_counter()
        self._check_writer()
        source = (
            named_tensors if isinstance(named_tensors, GatheredWeights) else _Held(named_tensors)
        )
        transient = not isinstance(source, _Held)
        aliases = source.aliases()
        layout = {n: (shape, self._wire_dtype(dt)) for n, (shape, dt) in source.layout().items()}
        buckets = plan_layout(layout, self.bucket_bytes)
        device = source.device()
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.seq += 1
        catchup_due = bool(self.catchup_every) and (
            rewind or self.seq == 1 or self.seq % self.catchup_every == 0
        )
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
                parts: dict[str, bytes] = {}
                pack_s = self._send_buckets(pg, source, buckets, layout, transient, parts)
                _send_json(pg, {"checksum": combine_sample_parts(parts)}, device)
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
            # engines a failure left dirty restore themselves from this file: wait for it
            self._write_catchup(
                version, source, buckets, layout, rewind, aliases, wait=failed or rewind
            )
        self.last_timing = {
            "pack_s": pack_s,
            "group_s": t_group - t0,
            "broadcast_s": t_bcast - t_group - pack_s,
            "catchup_s": time.perf_counter() - t_bcast,
            "total_s": time.perf_counter() - t0,
            "buckets": float(len(buckets)),
        }
        return time.perf_counter() - t0

    def _send_buckets(
        self,
        pg: Any,
        source: GatheredWeights,
        buckets: list[Bucket],
        layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
        transient: bool,
        parts: dict[str, bytes],
    ) -> float:
        """Gather, pack and broadcast each bucket, then its digest; bucket ``i`` is packed
        while ``i - 1`` is on the wire, into the ring buffer ``i - 2`` used (waited for first).
        Fills ``parts`` (the sampled checksum's per-tensor parts); returns the packing seconds."""
        sampled = sampled_names(set(layout), self.sample[0])
        in_flight: deque[tuple[list[Any], torch.Tensor, torch.Tensor]] = deque()
        pack_s = 0.0
        for index, bucket in enumerate(buckets):
            if len(in_flight) == 2:
                for work in in_flight.popleft()[0]:
                    work.wait()
            t_pack = time.perf_counter()
            names = [n for n, _, _ in bucket.tensors]
            with source.gather(names) as whole:
                flat = self._pack(whole, index % 2, bucket, layout, transient)
            views = unflatten(flat, bucket)
            mine = {n: sample_part(n, views[n], self.sample[1]) for n in names if n in sampled}
            parts.update(mine)
            digest = _digest_tensor(mine, flat.device)
            pack_s += time.perf_counter() - t_pack
            works = [_broadcast(pg, flat, wait=False), _broadcast(pg, digest, wait=False)]
            in_flight.append((works, flat, digest))  # the tensors live until their send ends
        for works, _, _ in in_flight:
            for work in works:
                work.wait()
        return pack_s

    def _write_catchup(
        self,
        version: int,
        source: GatheredWeights,
        buckets: list[Bucket],
        layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
        rewind: bool,
        aliases: dict[str, str],
        wait: bool,
    ) -> None:
        """Write the version for late joiners with bounded host memory: each bucket is
        gathered again and copied into one of two host staging buffers, which a background
        thread streams into the file (the next bucket is copied while the last is written).
        Returns once every bucket is copied out of the learner's tensors (its next step may
        change them); the file is finished in the background (``wait``: before returning).
        One write at a time."""
        self._join_writer()
        assert self.catchup_dir is not None
        order = [(n, shape, layout[n][1]) for b in buckets for n, shape, _ in b.tensors]
        writer = VersionWriter(self.catchup_dir, version, order, aliases)
        sampled = sampled_names(set(layout), self.sample[0])
        free: queue.Queue[int] = queue.Queue()
        for slot in (0, 1):
            free.put(slot)
        work: queue.Queue[Any] = queue.Queue()
        parts: dict[str, bytes] = {}

        def write() -> None:
            failed: BaseException | None = None
            while (item := work.get()) is not None:
                if item == _ABANDON:  # the publisher's own error is the one reported
                    writer.discard()
                    return
                slot, bucket = item
                try:
                    if failed is None:
                        views = unflatten(_slot_view(self._staging[slot], bucket), bucket)
                        for name, _shape, _offset in bucket.tensors:
                            writer.write(name, views[name])
                except BaseException as exc:  # keep draining: the publisher waits on slots
                    failed = exc
                free.put(slot)
            try:
                if failed is not None:
                    raise failed
                writer.commit(combine_sample_parts(parts), self.keep_last, rewind)
            except BaseException as exc:  # surfaced at the next publish
                writer.discard()
                self._writer_error = exc

        self._writer = threading.Thread(target=write, name="weightsync-catchup", daemon=True)
        self._writer.start()
        try:
            for bucket in buckets:
                slot = free.get()
                names = [n for n, _, _ in bucket.tensors]
                with source.gather(names) as whole:
                    flat = self._stage(slot, bucket, whole)
                views = unflatten(flat, bucket)
                parts.update(
                    {n: sample_part(n, views[n], self.sample[1]) for n in names if n in sampled}
                )
                work.put((slot, bucket))
        except BaseException:
            work.put(_ABANDON)
            raise
        finally:
            work.put(None)
        if wait:
            self._join_writer()

    def _stage(self, slot: int, bucket: Bucket, whole: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy the bucket's tensors (cast to the wire dtype) into host staging buffer
        ``slot`` (pinned when they are on a GPU); returns its flat view."""
        device = next(iter(whole.values())).device
        buf = self._staging[slot]
        if buf is None or buf.numel() < bucket_nbytes(bucket):
            self._staging[slot] = None
            buf = self._staging[slot] = torch.empty(
                bucket_nbytes(bucket), dtype=torch.uint8, pin_memory=device.type == "cuda"
            )
        flat = _slot_view(buf, bucket)
        pack_into(flat, whole, bucket)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the copies landed
        return flat

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
        record = _get_json(self.store, f"gen/{generation}")
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
                with _on_group():
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
                if int(record["gen"]) != self.generation:
                    with _on_group():
                        entered = self._enter_generation(int(record["gen"]))
                    if not entered:
                        break  # left out of the new generation: catch-up files, a re-join
                loaded = self._receive_one(s, into)
                self.seq = s
        except _GroupLost as exc:  # the publisher or a peer died mid-transfer
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

    def _receive_one(self, seq: int, into: Into) -> int:
        """Receive publish ``seq`` and load it bucket by bucket; returns its version."""
        with _on_group():
            header = _recv_json(self._pg, self.device)
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
            flat = _slot_view(slots[i % 2], buckets[i])
            with _on_group():
                works = [
                    _broadcast(self._pg, flat, wait=False),
                    _broadcast(self._pg, digests[i % 2], wait=False),
                ]
            return flat, works

        parts: dict[str, bytes] = {}
        bad: str | None = None
        in_flight = deque(post(i) for i in range(min(2, len(buckets))))
        for i, bucket in enumerate(buckets):
            flat, works = in_flight.popleft()
            with _on_group():
                for work in works:
                    work.wait()
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
        with _on_group():
            trailer = _recv_json(self._pg, self.device)
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

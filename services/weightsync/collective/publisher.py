"""Learner rank 0's end of the weight group: per version a header, each bucket's buffer and
digest, and a trailer, broadcast from the device the learner's tensors are on.

Buckets are packed into a ring of two buffers with at most two in flight, so the learner holds
about two buckets beyond its own weights; a ZeRO-3 learner gathers each bucket and lets it go
once packed.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.weightsync.base import GatheredWeights, NamedTensors, WeightPublisher
from services.weightsync.checksum import combine_sample_parts, sample_part, sampled_names
from services.weightsync.collective.buckets import (
    Bucket,
    Layout,
    Outgoing,
    bucket_nbytes,
    digest_tensor,
    pack_into,
    plan_outgoing,
    slot_view,
    unflatten,
)
from services.weightsync.collective.catchup import CatchupWriter
from services.weightsync.collective.group import Membership, broadcast, send_json

log = logging.getLogger(__name__)


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
        adapter_config: the versions are a LoRA adapter (PEFT's ``adapter_config.json`` as a
            dict): each catch-up version is also written as a PEFT adapter directory.
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
        adapter_config: dict[str, Any] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.store = dist.TCPStore(
            host, port, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self.address = f"{host}:{self.store.port}"
        self.bucket_bytes = bucket_bytes
        self.wire = wire
        self.sample = (sample_every, sample_elements)
        self.catchup = (
            CatchupWriter(Path(catchup_dir), keep_last, self.sample, adapter_config)
            if catchup_dir is not None
            else None
        )
        self.catchup_every = catchup_every if catchup_dir is not None else 0
        self.epoch = uuid.uuid4().hex
        self.store.set("epoch", self.epoch)
        self.seq = 0
        self.group = Membership(self.store, timeout_s, member_timeout_s)
        # Two byte buffers packed in turn: a bucket's is free again once its broadcast, two
        # buckets back, completed.
        self._ring: list[torch.Tensor | None] = [None, None]
        self.last_timing: dict[str, float] = {}

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
        if self.catchup is not None:
            self.catchup.check()
        out = plan_outgoing(named_tensors, self.wire, self.bucket_bytes)
        self.seq += 1
        catchup_due = bool(self.catchup_every) and (
            rewind or self.seq == 1 or self.seq % self.catchup_every == 0
        )
        failed, t_group, pack_s = self._send_version(version, out, t0)
        t_bcast = time.perf_counter()
        if self.catchup is not None and self.catchup_every and (failed or catchup_due):
            # engines a failure left dirty restore themselves from this file: wait for it
            self.catchup.write(version, out, rewind, wait=failed or rewind)
        self.last_timing = {
            "pack_s": pack_s,
            "group_s": t_group - t0,
            "broadcast_s": t_bcast - t_group - pack_s,
            "catchup_s": time.perf_counter() - t_bcast,
            "total_s": time.perf_counter() - t0,
            "buckets": float(len(out.buckets)),
        }
        return time.perf_counter() - t0

    def _send_version(self, version: int, out: Outgoing, t0: float) -> tuple[bool, float, float]:
        """Announce publish :attr:`seq` (re-forming the group if its membership changed) and
        broadcast it to the group. Returns whether the broadcast failed, when the group was
        ready (``t0`` if it never was) and the seconds spent packing. A member that died or
        timed out mid-broadcast fails it: the group is dropped and every engine re-joins at
        the next publish."""
        backend = "nccl" if out.device.type == "cuda" else "gloo"
        t_group, pack_s = t0, 0.0
        try:
            self.group.announce(self.seq, version, backend)
            t_group = time.perf_counter()
            if self.group.pg is not None:
                pack_s = self._broadcast(self.group.pg, version, out)
            return False, t_group, pack_s
        except (RuntimeError, dist.DistError) as exc:
            log.warning(
                "weight sync: broadcast of version %d on generation %d failed (%s); "
                "dropping the group, engines re-join at the next publish",
                version,
                self.group.generation,
                exc,
            )
            self.group.drop_all("broadcast failed")
            return True, t_group, pack_s

    def _broadcast(self, pg: Any, version: int, out: Outgoing) -> float:
        """The header, the buckets, then the trailer with the sampled checksum; returns the
        packing seconds."""
        header = {
            "version": version,
            "seq": self.seq,
            "aliases": out.aliases,
            "buckets": [b.to_json() for b in out.buckets],
        }
        send_json(pg, header, out.device)
        parts: dict[str, bytes] = {}
        pack_s = self._send_buckets(pg, out, parts)
        send_json(pg, {"checksum": combine_sample_parts(parts)}, out.device)
        if out.device.type == "cuda":
            torch.cuda.current_stream(out.device).synchronize()
        return pack_s

    def _send_buckets(self, pg: Any, out: Outgoing, parts: dict[str, bytes]) -> float:
        """Gather, pack and broadcast each bucket, then its digest; bucket ``i`` is packed
        while ``i - 1`` is on the wire, into the ring buffer ``i - 2`` used (waited for first).
        Fills ``parts`` (the sampled checksum's per-tensor parts); returns the packing seconds."""
        sampled = sampled_names(set(out.layout), self.sample[0])
        in_flight: deque[tuple[list[Any], torch.Tensor, torch.Tensor]] = deque()
        pack_s = 0.0
        for index, bucket in enumerate(out.buckets):
            if len(in_flight) == 2:
                for work in in_flight.popleft()[0]:
                    work.wait()
            t_pack = time.perf_counter()
            names = [n for n, _, _ in bucket.tensors]
            with out.source.gather(names) as whole:
                flat = self._pack(whole, index % 2, bucket, out.layout, out.transient)
            views = unflatten(flat, bucket)
            mine = {n: sample_part(n, views[n], self.sample[1]) for n in names if n in sampled}
            parts.update(mine)
            digest = digest_tensor(mine, flat.device)
            pack_s += time.perf_counter() - t_pack
            works = [broadcast(pg, flat, wait=False), broadcast(pg, digest, wait=False)]
            in_flight.append((works, flat, digest))  # the tensors live until their send ends
        for works, _, _ in in_flight:
            for work in works:
                work.wait()
        return pack_s

    def _pack(
        self,
        whole: dict[str, torch.Tensor],
        slot: int,
        bucket: Bucket,
        layout: Layout,
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
        flat = slot_view(buf, bucket)
        pack_into(flat, whole, bucket)
        return flat

    def flush(self) -> None:
        """Wait for the catch-up write in flight (tests; before exit)."""
        if self.catchup is not None:
            self.catchup.join()

    def close(self) -> None:
        self.flush()
        self.group.pg = None

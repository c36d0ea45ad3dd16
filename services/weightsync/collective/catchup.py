"""Rank 0's catch-up files: the versions a late or restarted engine loads before it is in a group
(and an engine a failed broadcast left dirty restores itself from), in the files transport's
format under ``weight_sync.path``.

The write is off the broadcast's path and holds no host copy of the model: each bucket is
gathered again and copied into one of two host staging buffers, which a background thread
streams into the file while the next bucket is copied.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import torch

from services.weightsync.checksum import (
    WeightSyncError,
    combine_sample_parts,
    sample_part,
    sampled_names,
)
from services.weightsync.collective.buckets import (
    Bucket,
    Outgoing,
    bucket_nbytes,
    pack_into,
    slot_view,
    unflatten,
)
from services.weightsync.files import VersionWriter

_ABANDON = ("abandon",)  # tells the writer thread the publisher stopped mid-version


class CatchupWriter:
    """Writes versions into ``directory`` (keeping the newest ``keep_last``), one at a time; a
    failed write is raised as :class:`WeightSyncError` by the next :meth:`check` or
    :meth:`join`. ``sample``: (every, elements) of the sampled checksum. ``adapter_config``:
    the versions are a LoRA adapter, each written as a PEFT directory too."""

    def __init__(
        self,
        directory: Path,
        keep_last: int,
        sample: tuple[int, int],
        adapter_config: dict[str, Any] | None = None,
    ) -> None:
        self.directory = directory
        self.keep_last = keep_last
        self.sample = sample
        self.adapter_config = adapter_config
        self._staging: list[torch.Tensor | None] = [None, None]
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, version: int, out: Outgoing, rewind: bool, wait: bool) -> None:
        """Write ``out`` as ``version``. Returns once every bucket is copied out of the
        learner's tensors (its next step may change them); the file is finished in the
        background (``wait``: before returning)."""
        self.join()
        order = [(n, shape, out.layout[n][1]) for b in out.buckets for n, shape, _ in b.tensors]
        writer = VersionWriter(self.directory, version, order, out.aliases, self.adapter_config)
        free: queue.Queue[int] = queue.Queue()
        for slot in (0, 1):
            free.put(slot)
        work: queue.Queue[Any] = queue.Queue()
        parts: dict[str, bytes] = {}
        self._thread = threading.Thread(
            target=self._stream,
            args=(writer, work, free, parts, rewind),
            name="weightsync-catchup",
            daemon=True,
        )
        self._thread.start()
        try:
            self._copy_out(out, work, free, parts)
        except BaseException:
            work.put(_ABANDON)
            raise
        finally:
            work.put(None)
        if wait:
            self.join()

    def _copy_out(
        self, out: Outgoing, work: queue.Queue[Any], free: queue.Queue[int], parts: dict[str, bytes]
    ) -> None:
        """Gather each bucket into a free staging buffer and hand it to the writer thread;
        fills ``parts`` (the sampled checksum's per-tensor parts)."""
        sampled = sampled_names(set(out.layout), self.sample[0])
        for bucket in out.buckets:
            slot = free.get()
            names = [n for n, _, _ in bucket.tensors]
            with out.source.gather(names) as whole:
                flat = self._stage(slot, bucket, whole)
            views = unflatten(flat, bucket)
            parts.update(
                {n: sample_part(n, views[n], self.sample[1]) for n in names if n in sampled}
            )
            work.put((slot, bucket))

    def _stream(
        self,
        writer: VersionWriter,
        work: queue.Queue[Any],
        free: queue.Queue[int],
        parts: dict[str, bytes],
        rewind: bool,
    ) -> None:
        """The writer thread: write each staged bucket into the file and free its buffer;
        commit the file at the end (``parts`` is complete by then)."""
        failed: BaseException | None = None
        while (item := work.get()) is not None:
            if item == _ABANDON:  # the publisher's own error is the one reported
                writer.discard()
                return
            slot, bucket = item
            try:
                if failed is None:
                    views = unflatten(slot_view(self._staging[slot], bucket), bucket)
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
            self._error = exc

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
        flat = slot_view(buf, bucket)
        pack_into(flat, whole, bucket)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the copies landed
        return flat

    def join(self) -> None:
        """Wait for the write in flight; raise if it (or an earlier one) failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """Raise if a finished write failed."""
        if self._error is not None:
            exc, self._error = self._error, None
            raise WeightSyncError(
                f"writing the catch-up weights under {self.directory} failed: {exc}"
            ) from exc

"""Weight sync through safetensors files on a path every engine can read (NFS, a shared volume).

The fallback where no collective group can be formed, and the place a late-joining engine of
the collective transport loads the current version from. One file per version,
``weights-v{version:010d}.safetensors``, written to a temporary name in the same directory and
renamed into place (a reader never sees half a file); the version, sampled checksum and wire
dtype are in the safetensors metadata. The last ``keep_last`` versions stay on disk: a reader
that listed the directory just before a prune still finds its file most of the time, and
retries the listing when it does not.

With a LoRA adapter (the publisher given ``adapter_config``, PEFT's ``adapter_config.json`` as a
dict) each version also gets a directory ``adapter-v{version:010d}/`` holding that config and
``adapter_model.safetensors``, a hard link to the version's file (the same bytes; its keys are
PEFT's saved names): a loadable PEFT (or vLLM) adapter. It is in place before the version's file
is, and pruned with it.

Neither side holds a version whole: :class:`VersionWriter` writes a file tensor by tensor (the
collective publisher streams its catch-up files through it from a bounded staging area), and
:class:`FilesReceiver` checks the sampled checksum reading one tensor at a time, then loads the
version in chunks of about ``chunk_bytes``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from services.weightsync.base import (
    Into,
    NamedTensors,
    WeightPublisher,
    WeightReceiver,
    bucket_aliases,
    chunked,
    split_aliases,
    to_wire,
)
from services.weightsync.checksum import (
    SAMPLE_PREFIX,
    WeightSyncError,
    combine_sample_parts,
    sample_checksum,
    sample_part,
    sampled_names,
    state_checksum,
)

_NAME = re.compile(r"^weights-v(\d{10})\.safetensors$")
_ADAPTER_NAME = re.compile(r"^adapter-v(\d{10})$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def version_file(directory: Path, version: int) -> Path:
    return directory / f"weights-v{version:010d}.safetensors"


def adapter_dir(directory: Path, version: int) -> Path:
    """A LoRA version as a PEFT adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``)."""
    return directory / f"adapter-v{version:010d}"


def list_versions(directory: Path) -> list[int]:
    """Versions on disk, ascending (temporary files are ignored)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _NAME.match(n)))


def write_version(
    directory: Path,
    version: int,
    wire_tensors: dict[str, torch.Tensor],
    checksum: str,
    keep_last: int,
    rewind: bool = False,
    aliases: dict[str, str] | None = None,
    adapter_config: dict[str, Any] | None = None,
) -> Path:
    """Atomically write one version (tensors already in their wire dtype, any device) and
    prune all but the newest ``keep_last``. ``rewind`` first deletes versions newer than
    ``version``, so readers fall back to it. ``adapter_config``: the version is a LoRA adapter;
    its PEFT directory is written too."""
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {n: t.detach().to("cpu").contiguous() for n, t in wire_tensors.items()}
    meta = {"version": str(version), "checksum": checksum, "aliases": json.dumps(aliases or {})}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-weights-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(cpu, tmp, metadata=meta)
        return _place(directory, Path(tmp), version, keep_last, rewind, adapter_config)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _place(
    directory: Path,
    tmp: Path,
    version: int,
    keep_last: int,
    rewind: bool,
    adapter_config: dict[str, Any] | None,
) -> Path:
    """Rename the finished temporary file ``tmp`` into place as ``version``: ``rewind`` first
    deletes the versions newer than it; a LoRA version's adapter directory goes in before its
    file (a reader that sees the version finds its directory); then all but the newest
    ``keep_last`` versions are pruned, files and directories."""
    if rewind:
        for v in _on_disk(directory):
            if v > version:
                _remove(directory, v)
    if adapter_config is not None:
        _write_adapter_dir(directory, version, tmp, adapter_config)
    os.replace(tmp, version_file(directory, version))
    kept = set(list_versions(directory)[-keep_last:])
    for v in _on_disk(directory):
        if v not in kept:
            _remove(directory, v)
    return version_file(directory, version)


def _on_disk(directory: Path) -> list[int]:
    """Versions with a file or an adapter directory."""
    dirs = {int(m.group(1)) for n in os.listdir(directory) if (m := _ADAPTER_NAME.match(n))}
    return sorted(dirs | set(list_versions(directory)))


def _remove(directory: Path, version: int) -> None:
    version_file(directory, version).unlink(missing_ok=True)
    shutil.rmtree(adapter_dir(directory, version), ignore_errors=True)


def _write_adapter_dir(
    directory: Path, version: int, weights: Path, adapter_config: dict[str, Any]
) -> None:
    """``adapter-v{version}/``: the config and a hard link to ``weights`` (a copy where the
    filesystem has no hard links), assembled under a temporary name and renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=directory))
    try:
        try:
            os.link(weights, tmp / ADAPTER_WEIGHTS)
        except OSError:
            shutil.copyfile(weights, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        final = adapter_dir(directory, version)
        shutil.rmtree(final, ignore_errors=True)  # the same version republished (a resume)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CHECKSUM_ROOM = 96  # header bytes kept for the checksum, written once the data is


class VersionWriter:
    """One version file written tensor by tensor in safetensors' layout (header, then each
    tensor's bytes in the order given), to a temporary name; :meth:`commit` writes the
    checksum into the header and renames the file into place.

    Args:
        order: every tensor's (name, shape, dtype), in the order :meth:`write` will get them.
        adapter_config: the version is a LoRA adapter: its PEFT directory is written too.
    """

    def __init__(
        self,
        directory: Path,
        version: int,
        order: list[tuple[str, tuple[int, ...], torch.dtype]],
        aliases: dict[str, str] | None = None,
        adapter_config: dict[str, Any] | None = None,
    ) -> None:
        self.directory, self.version = Path(directory), version
        self.adapter_config = adapter_config
        self.directory.mkdir(parents=True, exist_ok=True)
        self.meta = {"version": str(version), "aliases": json.dumps(aliases or {})}
        self.entries: dict[str, object] = {}
        self.expect: list[tuple[str, int]] = []
        offset = 0
        for name, shape, dtype in order:
            if dtype not in _ST_DTYPES:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            self.entries[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.expect.append((name, nbytes))
            offset += nbytes
        header = self._header("")
        self.header_len = -(-(len(header) + _CHECKSUM_ROOM) // 8) * 8
        fd, self.tmp = tempfile.mkstemp(
            prefix=".tmp-weights-", suffix=".safetensors", dir=self.directory
        )
        self.file = os.fdopen(fd, "wb")
        self.file.write(struct.pack("<Q", self.header_len) + b" " * self.header_len)
        self.written = 0

    def _header(self, checksum: str) -> bytes:
        meta = {**self.meta, "checksum": checksum}
        return json.dumps({"__metadata__": meta, **self.entries}).encode()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor's bytes (on the host, in its file dtype)."""
        want, nbytes = self.expect[self.written]
        got = tensor.numel() * tensor.element_size()
        if name != want or got != nbytes:
            raise ValueError(f"catch-up file: expected {want} ({nbytes} B), got {name} ({got} B)")
        if nbytes:
            self.file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.written += 1

    def commit(self, checksum: str, keep_last: int, rewind: bool = False) -> Path:
        """Finish the file (every tensor written) under its version's name; prune all but the
        newest ``keep_last``. ``rewind`` first deletes versions newer than this one."""
        if self.written != len(self.expect):
            raise ValueError(f"catch-up file: {self.written} of {len(self.expect)} tensors written")
        header = self._header(checksum)
        if len(header) > self.header_len:
            raise ValueError(f"catch-up file: checksum {checksum[:20]}... does not fit the header")
        self.file.seek(8)
        self.file.write(header + b" " * (self.header_len - len(header)))
        self.file.close()
        return _place(
            self.directory, Path(self.tmp), self.version, keep_last, rewind, self.adapter_config
        )

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _unreadable(path: Path, version: int, exc: BaseException) -> WeightSyncError:
    return WeightSyncError(f"weights file {path} of version {version} is unreadable: {exc}")


def _open_version(directory: Path, version: int) -> tuple[object, str, dict[str, str]]:
    """(safe_open handle, checksum, aliases) of one version file; the caller closes it."""
    path = version_file(directory, version)
    try:
        handle = safe_open(str(path), framework="pt")
        meta = handle.metadata() or {}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, version, exc) from exc
    if meta.get("version") != str(version) or "checksum" not in meta:
        raise WeightSyncError(
            f"weights file {path}: metadata {meta} does not name version {version} and a checksum"
        )
    return handle, meta["checksum"], json.loads(meta.get("aliases", "{}"))


def read_version(
    directory: Path, version: int
) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """(tensors, checksum, aliases) of one version file, whole (tests and tools; receivers
    stream it); WeightSyncError if it is unreadable."""
    handle, checksum, aliases = _open_version(directory, version)
    try:
        names = list(handle.keys())  # type: ignore[attr-defined]
        tensors = {n: handle.get_tensor(n) for n in names}  # type: ignore[attr-defined]
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(version_file(directory, version), version, exc) from exc
    return tensors, checksum, aliases


class FilesPublisher(WeightPublisher):
    """Writes each version as one safetensors file under ``directory``; ``adapter_config``
    (PEFT's ``adapter_config.json`` as a dict): each version is a LoRA adapter and also gets its
    PEFT directory."""

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 2,
        wire: torch.dtype | None = None,
        sample_every: int = 1,
        sample_elements: int = 1024,
        adapter_config: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.wire = wire
        self.sample = (sample_every, sample_elements)
        self.adapter_config = adapter_config

    def publish(self, version: int, named_tensors: NamedTensors, *, rewind: bool = False) -> float:
        t0 = time.perf_counter()
        unique, aliases = split_aliases(named_tensors)
        wire = to_wire(unique, self.wire)
        checksum = sample_checksum(wire, *self.sample)
        write_version(
            self.directory,
            version,
            wire,
            checksum,
            self.keep_last,
            rewind,
            aliases,
            self.adapter_config,
        )
        return time.perf_counter() - t0


class FilesReceiver(WeightReceiver):
    """Loads the newest version file under ``directory``, in chunks of about ``chunk_bytes``."""

    def __init__(
        self,
        directory: str | Path,
        timeout_s: float = 300.0,
        sample_every: int = 1,
        sample_elements: int = 1024,
        chunk_bytes: int = 64 << 20,
    ) -> None:
        self.directory = Path(directory)
        self.timeout_s = timeout_s
        self.sample = (sample_every, sample_elements)
        self.chunk_bytes = chunk_bytes
        self.version = -1

    def latest_version(self) -> int:
        versions = list_versions(self.directory)
        return versions[-1] if versions else -1

    def has_update(self) -> bool:
        return self.dirty or super().has_update()

    def receive(self, into: Into, *, force: bool = False) -> int | None:
        """Load the newest version if it differs from the loaded one (``force``, or a
        :attr:`dirty` engine: whatever it is); the checksum is checked before anything loads."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            version = self.latest_version()
            if version < 0 or (version == self.version and not (force or self.dirty)):
                return None
            try:
                handle, checksum, aliases = _open_version(self.directory, version)
                break
            except FileNotFoundError:
                # pruned between the listing and the open: a newer one exists, list again
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"weights files under {self.directory} kept vanishing for {self.timeout_s:.0f}s"
                    ) from None
        where = f"file {version_file(self.directory, version)}"
        with handle:  # type: ignore[attr-defined]
            names = list(handle.keys())  # type: ignore[attr-defined]
            self._verify(handle, names, checksum, version, where)
            tensors = ((n, handle.get_tensor(n)) for n in names)  # type: ignore[attr-defined]
            chunks = (bucket_aliases(c, aliases) for c in chunked(tensors, self.chunk_bytes))
            self._load_version(into, version, chunks)
        return version

    def _verify(self, handle: object, names: list[str], checksum: str, version: int, where: str):
        """The file's checksum against its tensors, read one at a time."""
        get = handle.get_tensor  # type: ignore[attr-defined]
        if checksum.startswith(SAMPLE_PREFIX):
            every, k = self.sample
            parts = {n: sample_part(n, get(n), k) for n in sorted(sampled_names(names, every))}
            got = combine_sample_parts(parts)
        else:  # a full digest (older publishers) needs every tensor at once
            got = state_checksum({n: get(n) for n in names})
        if got != checksum:
            raise WeightSyncError(
                f"weights of version {version} arrived corrupted ({where}): sampled checksum "
                f"{got.removeprefix(SAMPLE_PREFIX)[:12]} != published "
                f"{checksum.removeprefix(SAMPLE_PREFIX)[:12]}; stopping rather than generating "
                "with weights the learner never had"
            )

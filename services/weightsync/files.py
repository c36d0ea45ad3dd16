"""Weight sync through safetensors files on a path every engine can read (NFS, a shared volume).

The fallback where no collective group can be formed, and the place a late-joining engine of
the collective transport loads the current version from. One file per version,
``weights-v{version:010d}.safetensors``, written to a temporary name in the same directory and
renamed into place (a reader never sees half a file); the version, sampled checksum and wire
dtype are in the safetensors metadata. The last ``keep_last`` versions stay on disk: a reader
that listed the directory just before a prune still finds its file most of the time, and
retries the listing when it does not.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from services.weightsync.base import (
    Into,
    NamedTensors,
    WeightPublisher,
    WeightReceiver,
    load_into,
    split_aliases,
    to_wire,
    with_aliases,
)
from services.weightsync.checksum import WeightSyncError, sample_checksum, verify_checksum

_NAME = re.compile(r"^weights-v(\d{10})\.safetensors$")


def version_file(directory: Path, version: int) -> Path:
    return directory / f"weights-v{version:010d}.safetensors"


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
) -> Path:
    """Atomically write one version (tensors already in their wire dtype, any device) and
    prune all but the newest ``keep_last``. ``rewind`` first deletes versions newer than
    ``version``, so readers fall back to it."""
    directory.mkdir(parents=True, exist_ok=True)
    if rewind:
        for v in list_versions(directory):
            if v > version:
                version_file(directory, v).unlink(missing_ok=True)
    cpu = {n: t.detach().to("cpu").contiguous() for n, t in wire_tensors.items()}
    meta = {"version": str(version), "checksum": checksum, "aliases": json.dumps(aliases or {})}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-weights-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(cpu, tmp, metadata=meta)
        os.replace(tmp, version_file(directory, version))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for v in list_versions(directory)[:-keep_last]:
        version_file(directory, v).unlink(missing_ok=True)
    return version_file(directory, version)


def read_version(
    directory: Path, version: int
) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """(tensors, checksum, aliases) of one version file; WeightSyncError if it is unreadable."""
    path = version_file(directory, version)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightSyncError(
            f"weights file {path} of version {version} is unreadable: {exc}"
        ) from exc
    if meta.get("version") != str(version) or "checksum" not in meta:
        raise WeightSyncError(
            f"weights file {path}: metadata {meta} does not name version {version} and a checksum"
        )
    return tensors, meta["checksum"], json.loads(meta.get("aliases", "{}"))


class FilesPublisher(WeightPublisher):
    """Writes each version as one safetensors file under ``directory``."""

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 2,
        wire: torch.dtype | None = None,
        sample_every: int = 1,
        sample_elements: int = 1024,
    ) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.wire = wire
        self.sample = (sample_every, sample_elements)

    def publish(self, version: int, named_tensors: NamedTensors, *, rewind: bool = False) -> float:
        t0 = time.perf_counter()
        unique, aliases = split_aliases(named_tensors)
        wire = to_wire(unique, self.wire)
        checksum = sample_checksum(wire, *self.sample)
        write_version(self.directory, version, wire, checksum, self.keep_last, rewind, aliases)
        return time.perf_counter() - t0


class FilesReceiver(WeightReceiver):
    """Loads the newest version file under ``directory``."""

    def __init__(
        self,
        directory: str | Path,
        timeout_s: float = 300.0,
        sample_every: int = 1,
        sample_elements: int = 1024,
    ) -> None:
        self.directory = Path(directory)
        self.timeout_s = timeout_s
        self.sample = (sample_every, sample_elements)
        self.version = -1

    def latest_version(self) -> int:
        versions = list_versions(self.directory)
        return versions[-1] if versions else -1

    def receive(self, into: Into) -> int | None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            version = self.latest_version()
            if version < 0 or version == self.version:
                return None
            try:
                tensors, checksum, aliases = read_version(self.directory, version)
                break
            except FileNotFoundError:
                # pruned between the listing and the open: a newer one exists, list again
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"weights files under {self.directory} kept vanishing for {self.timeout_s:.0f}s"
                    ) from None
        verify_checksum(
            checksum,
            tensors,
            version,
            f"file {version_file(self.directory, version)}",
            *self.sample,
        )
        load_into(into, with_aliases(tensors, aliases), version)
        self.version = version
        return version

"""Warm starts shipped with the package, so every machine begins RL from the same weights.

A warm start is 3,000 float32 optimiser steps; two CPUs with different kernels (AVX2 against
AVX-512/AMX, or another thread count) round differently, and the trajectories part. The policy
that comes out differs in what matters to RL (how often the right answer is sampled), so a run
that learns on one machine could stall on another. Training is therefore done once, by the
maintainers, and the result ships in ``services/policy/starts/<cache key>/``: the Hugging Face
checkpoint, its ``warmstart.json`` (spec, measured accuracy, entropy) and ``SHA256SUMS`` (the
``sha256sum`` format, so ``sha256sum -c`` checks it too). A start is used only if every listed
file matches; a mismatch is an error, never a silent retrain.

Rebuild (maintainers): ``d3s warmstart CONFIG --rebuild --ship``, then commit the directory.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

STARTS_DIR = Path(__file__).resolve().parent / "starts"
CHECKSUMS_FILE = "SHA256SUMS"
REQUIRED_FILES = ("config.json", "model.safetensors", "warmstart.json")


class ShippedStartError(RuntimeError):
    """A shipped warm start whose files do not match their recorded checksums."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(directory: Path) -> dict[str, str]:
    """``{file name: sha256 hex}`` from ``directory/SHA256SUMS``."""
    sums: dict[str, str] = {}
    for number, line in enumerate((directory / CHECKSUMS_FILE).read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise ShippedStartError(
                f"{directory / CHECKSUMS_FILE}:{number}: not '<sha256>  <file>'"
            )
        sums[name] = digest
    return sums


def verify(directory: Path) -> None:
    """Raise ShippedStartError unless every file in SHA256SUMS (which must list the weights,
    the config and the metadata) has its recorded sha256."""
    if not (directory / CHECKSUMS_FILE).is_file():
        raise ShippedStartError(f"shipped warm start {directory} has no {CHECKSUMS_FILE}")
    sums = read_checksums(directory)
    missing = [name for name in REQUIRED_FILES if name not in sums]
    if missing:
        raise ShippedStartError(f"{directory / CHECKSUMS_FILE} does not list {', '.join(missing)}")
    for name, want in sorted(sums.items()):
        path = directory / name
        if not path.is_file():
            raise ShippedStartError(f"shipped warm start {directory}: {name} is missing")
        got = file_sha256(path)
        if got != want:
            raise ShippedStartError(
                f"shipped warm start {directory}: {name} has sha256 {got}, expected {want}; "
                "reinstall the package, or rebuild it with `d3s warmstart CONFIG --rebuild --ship`"
            )


def find(key: str, starts_dir: Path | None = None) -> Path | None:
    """The verified shipped start for cache key ``key`` (in ``starts_dir``, by default the
    package's), or None when none ships for it."""
    directory = (starts_dir or STARTS_DIR) / key
    if not directory.is_dir():
        return None
    verify(directory)
    return directory


def ship(checkpoint: Path, key: str, starts_dir: Path | None = None) -> Path:
    """Copy a finished warm-start checkpoint to ``starts_dir/key`` with its SHA256SUMS,
    replacing any start shipped under that key. Returns the new directory."""
    files = sorted(p for p in checkpoint.iterdir() if p.is_file())
    names = {p.name for p in files}
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        raise ShippedStartError(
            f"{checkpoint} is not a finished warm start: no {', '.join(missing)}"
        )
    starts_dir = starts_dir or STARTS_DIR
    starts_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=starts_dir))
    try:
        lines = []
        for src in files:
            shutil.copyfile(src, tmp / src.name)
            (tmp / src.name).chmod(0o644)
            lines.append(f"{file_sha256(tmp / src.name)}  {src.name}")
        (tmp / CHECKSUMS_FILE).write_text("\n".join(lines) + "\n")
        verify(tmp)
        final = starts_dir / key
        if final.exists():
            shutil.rmtree(final)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide an installed start from other users
        tmp.rename(final)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

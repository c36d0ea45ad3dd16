"""The ``weight_sync`` section of a run config: how the learner's weights reach the rollout engines."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

Transport = Literal["object_store", "collective", "files"]
WireDtype = Literal["auto", "float32", "bfloat16", "float16"]

_WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightSyncConfig(BaseModel):
    """Weight sync from learner rank 0 into every rollout engine."""

    model_config = ConfigDict(extra="forbid")

    transport: Transport = Field(
        "object_store",
        description="object_store: the Ray object store (one machine or a Ray cluster); "
        "collective: a bucketed torch.distributed broadcast (NCCL on GPU, gloo on CPU) from "
        "learner rank 0 into every engine; files: safetensors files on a shared path, for "
        "when no collective group can be formed",
    )
    bucket_mb: float = Field(
        64.0,
        ge=0.0,
        le=16384.0,
        description="collective: MiB of tensors flattened into one buffer per broadcast call; "
        "0 sends one tensor per call (the unbucketed baseline)",
    )
    wire_dtype: WireDtype = Field(
        "auto",
        description="dtype of floating tensors on the wire; auto keeps each tensor's own dtype "
        "(bf16 on the wire when the model is bf16, float32 when it is float32); bfloat16 halves "
        "the bytes of a float32 model at the cost of rounding the engines' weights",
    )
    path: Path | None = Field(
        None,
        description="files: the shared directory the learner writes and the engines read; "
        "collective: where late joiners find the current version (see catchup_every)",
    )
    keep_last: int = Field(
        2, ge=1, le=1000, description="files: versions kept on disk (older ones are deleted)"
    )
    timeout_s: float = Field(
        300.0,
        gt=0.0,
        le=86400.0,
        description="longest wait for a rendezvous, a broadcast, or a version to appear; past it "
        "the sync fails with an error instead of hanging",
    )
    rendezvous: str | None = Field(
        None,
        description="collective: host:port of the rendezvous TCP store that learner rank 0 "
        "serves; None binds a free port on rank 0's node and announces it in the run's Redis",
    )
    catchup_every: int = Field(
        10,
        ge=0,
        le=1_000_000,
        description="collective: also write every N-th version to `path` (after the broadcast, "
        "through two host staging buffers of a bucket each) so an engine that starts late or "
        "restarts loads recent weights at once and joins the broadcast group at the next "
        "publish, and an engine a failed broadcast left half-loaded restores itself; a failed "
        "broadcast always writes its version. The learner pays about one file write (a 7B bf16 "
        "model: ~15 GB) per N versions, hence 10 by default; 0 disables (a late or half-loaded "
        "engine then waits for the next publish)",
    )
    member_timeout_s: float = Field(
        60.0,
        gt=0.0,
        le=86400.0,
        description="collective: an engine silent for this long is left out of the next group "
        "(engines refresh a heartbeat whenever they poll for a version)",
    )
    sample_every: int = Field(
        1, ge=1, le=1_000_000, description="checksum: sample every N-th tensor in name order"
    )
    sample_elements: int = Field(
        1024,
        ge=1,
        le=1 << 24,
        description="checksum: elements read (strided) from each sampled tensor",
    )
    engine_digest: bool = Field(
        False,
        description="collective with rollout.engine vllm: after each load every engine hashes "
        "its live parameters and records `version -> sha256` in the run's Redis, so a run can "
        "be audited against the learner's weights (one pass over the weights per sync)",
    )

    @model_validator(mode="after")
    def _needs_path(self) -> WeightSyncConfig:
        if self.transport == "files" and self.path is None:
            raise ValueError(
                "weight_sync.path: required when transport is 'files' (a directory every engine can read)"
            )
        if self.transport == "collective" and self.catchup_every > 0 and self.path is None:
            raise ValueError(
                "weight_sync.path: required for transport 'collective' with catchup_every > 0 "
                "(where late-joining engines load the current version); or set catchup_every: 0"
            )
        return self

    def wire(self) -> torch.dtype | None:
        """The forced wire dtype, or None for ``auto`` (each tensor keeps its own)."""
        return None if self.wire_dtype == "auto" else _WIRE_DTYPES[self.wire_dtype]

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * (1 << 20))

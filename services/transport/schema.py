"""Versioned, validated wire records for the Redis streams.

A record is one stream entry: a mapping of ``bytes`` field names to ``bytes`` values.

* Field ``meta`` holds UTF-8 JSON: ``schema`` (int, :data:`SCHEMA_VERSION`), ``kind``
  (``"group"`` or ``"batch"``), the scalar fields, and ``arrays``: for each array its ``dtype``
  and ``shape``.
* One field per array, named like the attribute, holds its raw little-endian bytes
  (``ndarray.tobytes()`` of a C-contiguous array).

Nothing read from the wire is executed: no pickle, no ``eval``; JSON is parsed strictly (no NaN,
no Infinity) and every array is rebuilt with :func:`numpy.frombuffer` from an allow-listed dtype
after its byte length is checked against its declared shape. Any violation raises
:class:`SchemaError` with a precise reason, which the transport records in the dead-letter stream.

The same validation runs when a record is constructed in Python, so a producer cannot publish
what a consumer would reject.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

__all__ = [
    "ALLOWED_DTYPES",
    "SCHEMA_VERSION",
    "CuratedBatch",
    "SchemaError",
    "ScoredGroup",
    "decode",
]

SCHEMA_VERSION = 1

# Wire dtypes a reader accepts. Integer arrays are held as int32 in memory; int64 on the wire is
# accepted (and range-checked) because numpy's default integer is int64 and producers forget.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float32": np.dtype("<f4"),
}
_INT32 = np.iinfo(np.int32)
META_FIELD = b"meta"


class SchemaError(ValueError):
    """A record violates the wire schema. ``reason`` says exactly how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Array and scalar coercion shared by construction and decoding
# --------------------------------------------------------------------------------------------


def _as_int_array(name: str, value: Any, ndim: int) -> np.ndarray:
    """Coerce to a C-contiguous native int32 array of ``ndim`` dims, refusing lossy casts."""
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise SchemaError(f"array '{name}' must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.dtype.kind == "b" or (arr.dtype.kind not in "iu" and arr.size > 0):
        raise SchemaError(f"array '{name}' must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
        raise SchemaError(f"array '{name}' has values outside the int32 range")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _as_float_array(name: str, value: Any, ndim: int) -> np.ndarray:
    """Coerce to a C-contiguous native float32 array of ``ndim`` dims with only finite values."""
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise SchemaError(f"array '{name}' must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu" and arr.size > 0:
        raise SchemaError(f"array '{name}' must hold numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # float64 overflow to inf is caught just below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if out.size and not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out.ravel()))[0])
        raise SchemaError(f"array '{name}' has a non-finite value (NaN or inf) at flat index {bad}")
    return out


def _check_str(name: str, value: Any, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"field '{name}' must be a string, got {type(value).__name__}")
    if nonempty and not value:
        raise SchemaError(f"field '{name}' must not be empty")
    return value


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    # bool is an int subclass, and a float like 3.0 would hide a producer bug.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SchemaError(f"field '{name}' must be an integer, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise SchemaError(f"field '{name}' must be >= {minimum}, got {value}")
    return value


def _check_float(
    name: str, value: Any, *, low: float | None = None, high: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SchemaError(f"field '{name}' must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise SchemaError(f"field '{name}' must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SchemaError(f"field '{name}' must lie in [{low}, {high}], got {value}")
    return value


def _check_lengths(
    name: str, lengths: np.ndarray, width: int, low: np.ndarray | None = None, low_name: str = ""
) -> None:
    """Require ``0 <= low <= lengths <= width`` elementwise; ``width`` is the padded width."""
    if lengths.size == 0:
        return
    if (lengths < 0).any():
        raise SchemaError(f"'{name}' has a negative length: {int(lengths.min())}")
    if low is not None and (lengths < low).any():
        i = int(np.flatnonzero(lengths < low)[0])
        raise SchemaError(
            f"'{name}'[{i}] = {int(lengths[i])} is below '{low_name}'[{i}] = {int(low[i])}"
        )
    if (lengths > width).any():
        raise SchemaError(
            f"'{name}' has a length {int(lengths.max())} over the padded width {width}"
        )


def _check_zero_outside(name: str, values: np.ndarray, start: np.ndarray, end: np.ndarray) -> None:
    """Require ``values[i, t] == 0`` for every t outside ``[start[i], end[i])``; values: [N, L]."""
    pos = np.arange(values.shape[1])[None, :]
    outside = (pos < start[:, None]) | (pos >= end[:, None])
    if (values[outside] != 0).any():
        i, t = (int(x[0]) for x in np.nonzero(outside & (values != 0)))
        raise SchemaError(
            f"'{name}'[{i}, {t}] = {float(values[i, t])} must be 0 outside the response"
        )


# --------------------------------------------------------------------------------------------
# Encoding and the generic half of decoding
# --------------------------------------------------------------------------------------------


def _encode(
    kind: str, scalars: dict[str, Any], arrays: dict[str, np.ndarray]
) -> dict[bytes, bytes]:
    meta: dict[str, Any] = {"schema": SCHEMA_VERSION, "kind": kind, **scalars}
    meta["arrays"] = {}
    fields: dict[bytes, bytes] = {}
    for name, arr in arrays.items():
        wire = ALLOWED_DTYPES[arr.dtype.name]
        meta["arrays"][name] = {"dtype": arr.dtype.name, "shape": list(arr.shape)}
        fields[name.encode()] = np.ascontiguousarray(arr, dtype=wire).tobytes()
    # allow_nan=False: a NaN that slipped past validation must fail here, not on the reader.
    fields[META_FIELD] = json.dumps(meta, allow_nan=False, separators=(",", ":")).encode()
    return fields


def _reject_constant(token: str) -> Any:
    raise SchemaError(f"meta JSON contains the non-standard constant {token}")


def _as_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    # A str here means the client was built with decode_responses=True, which corrupts arrays.
    raise SchemaError(
        f"field '{name}' is {type(value).__name__}, not bytes "
        "(is the Redis client using decode_responses=True?)"
    )


def _normalise_fields(fields: Mapping[Any, Any]) -> dict[bytes, Any]:
    if not isinstance(fields, Mapping):
        raise SchemaError(f"a record must be a mapping of fields, got {type(fields).__name__}")
    out: dict[bytes, Any] = {}
    for key, value in fields.items():
        if isinstance(key, str):
            key = key.encode()
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise SchemaError(f"field name {key!r} is not bytes")
        out[bytes(key)] = value
    return out


def _field_label(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


def _parse_meta(fields: dict[bytes, Any]) -> dict[str, Any]:
    if META_FIELD not in fields:
        raise SchemaError("missing field 'meta'")
    raw = _as_bytes("meta", fields[META_FIELD])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SchemaError(f"meta is not valid UTF-8 (byte {exc.start})") from None
    try:
        meta = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"meta is not valid JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(meta, dict):
        raise SchemaError(f"meta must be a JSON object, got {type(meta).__name__}")
    if "schema" not in meta:
        raise SchemaError("meta has no schema version")
    version = meta["schema"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise SchemaError(f"schema version must be an integer, got {version!r}")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"unsupported schema version {version} (this reader understands {SCHEMA_VERSION})"
        )
    if "kind" not in meta:
        raise SchemaError("meta has no kind")
    return meta


def _decode_body(
    fields: Mapping[Any, Any],
    kind: str,
    scalar_names: tuple[str, ...],
    array_specs: dict[str, tuple[str, int]],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse and check the generic layout; the record's own __post_init__ checks semantics.

    ``array_specs`` maps array name -> (element kind "i" or "f", ndim).
    """
    norm = _normalise_fields(fields)
    meta = _parse_meta(norm)
    if meta["kind"] != kind:
        raise SchemaError(f"wrong kind: expected {kind!r}, got {meta['kind']!r}")

    expected_meta = {"schema", "kind", "arrays", *scalar_names}
    for name in scalar_names:
        if name not in meta:
            raise SchemaError(f"missing field '{name}'")
    unknown = sorted(set(meta) - expected_meta)
    if unknown:
        raise SchemaError(f"unexpected meta key(s): {', '.join(unknown)}")
    if not isinstance(meta.get("arrays"), dict):
        raise SchemaError("meta 'arrays' must be an object of dtype/shape descriptions")

    extra = sorted(
        _field_label(k) for k in norm if k != META_FIELD and k.decode("latin-1") not in array_specs
    )
    if extra:
        raise SchemaError(f"unexpected field(s): {', '.join(extra)}")

    arrays: dict[str, np.ndarray] = {}
    for name, (elem_kind, ndim) in array_specs.items():
        desc = meta["arrays"].get(name)
        if name.encode() not in norm:
            raise SchemaError(f"missing field '{name}'")
        if not isinstance(desc, dict) or set(desc) != {"dtype", "shape"}:
            raise SchemaError(f"meta has no valid dtype/shape for array '{name}'")
        dtype_name, shape = desc["dtype"], desc["shape"]
        if dtype_name not in ALLOWED_DTYPES:
            raise SchemaError(
                f"array '{name}' has dtype {dtype_name!r}, not one of {sorted(ALLOWED_DTYPES)}"
            )
        wire = ALLOWED_DTYPES[dtype_name]
        if (elem_kind == "f") != (wire.kind == "f"):
            want = "float32" if elem_kind == "f" else "int32 or int64"
            raise SchemaError(f"array '{name}' has dtype {dtype_name}, expected {want}")
        if (
            not isinstance(shape, list)
            or len(shape) != ndim
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise SchemaError(
                f"array '{name}' needs a shape of {ndim} non-negative ints, got {shape!r}"
            )
        buf = _as_bytes(name, norm[name.encode()])
        expected = math.prod(shape) * wire.itemsize
        if len(buf) != expected:
            raise SchemaError(
                f"array '{name}' has {len(buf)} bytes, but shape {shape} of {dtype_name} "
                f"needs {expected}"
            )
        # A copy, so decoded arrays are writable and do not alias the wire buffer
        # (torch.from_numpy warns on read-only arrays); __post_init__ casts to int32/float32.
        arrays[name] = np.frombuffer(buf, dtype=wire).reshape(shape).copy()
    extra_arrays = sorted(set(meta["arrays"]) - set(array_specs))
    if extra_arrays:
        raise SchemaError(f"meta describes unknown array(s): {', '.join(extra_arrays)}")

    scalars = {name: meta[name] for name in scalar_names}
    return scalars, arrays


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


_R = TypeVar("_R", bound="_WireRecord")


class _WireRecord:
    """Encoding shared by the record kinds: ``meta`` JSON plus one raw-bytes field per array."""

    KIND: ClassVar[str]
    _SCALARS: ClassVar[tuple[str, ...]]
    _ARRAYS: ClassVar[dict[str, tuple[str, int]]]

    def to_fields(self) -> dict[bytes, bytes]:
        """Encode as a stream entry (``meta`` plus one raw-bytes field per array)."""
        return _encode(
            self.KIND,
            {name: getattr(self, name) for name in self._SCALARS},
            {name: getattr(self, name) for name in self._ARRAYS},
        )

    @classmethod
    def from_fields(cls: type[_R], fields: Mapping[Any, Any]) -> _R:
        """Decode and validate a stream entry; raises :class:`SchemaError`."""
        scalars, arrays = _decode_body(fields, cls.KIND, cls._SCALARS, cls._ARRAYS)
        return cls(**scalars, **arrays)


@dataclass(frozen=True, eq=False, repr=False)
class ScoredGroup(_WireRecord):
    """G scored rollouts of one prompt, as a rollout actor publishes them.

    Shapes: ``prompt`` int32[P] (P >= 1); ``responses`` int32[G, T] right-padded (G >= 1);
    ``response_lengths`` int32[G] in [0, T]; ``behav_logp`` float32[G, T], the rollout policy's
    log-prob of each response token, 0 at padding; ``rewards`` float32[G]. All floats finite.
    """

    KIND: ClassVar[str] = "group"
    _SCALARS: ClassVar[tuple[str, ...]] = (
        "group_id", "prompt_id", "policy_version", "created_at", "actor", "task",
    )  # fmt: skip
    _ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {
        "prompt": ("i", 1),
        "responses": ("i", 2),
        "response_lengths": ("i", 1),
        "behav_logp": ("f", 2),
        "rewards": ("f", 1),
    }

    group_id: str
    prompt_id: str
    policy_version: int
    prompt: np.ndarray
    responses: np.ndarray
    response_lengths: np.ndarray
    behav_logp: np.ndarray
    rewards: np.ndarray
    created_at: float
    actor: str
    task: str

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are stored once, here
        put(self, "group_id", _check_str("group_id", self.group_id, nonempty=True))
        put(self, "prompt_id", _check_str("prompt_id", self.prompt_id))
        put(self, "policy_version", _check_int("policy_version", self.policy_version, minimum=0))
        put(self, "created_at", _check_float("created_at", self.created_at, low=0.0))
        put(self, "actor", _check_str("actor", self.actor))
        put(self, "task", _check_str("task", self.task))
        for name, (elem_kind, ndim) in self._ARRAYS.items():
            conv = _as_float_array if elem_kind == "f" else _as_int_array
            put(self, name, conv(name, getattr(self, name), ndim))

        if self.prompt.shape[0] < 1:
            raise SchemaError("'prompt' must hold at least one token")
        if (self.prompt < 0).any():
            raise SchemaError("'prompt' has a negative token id")
        g, t = self.responses.shape
        if g < 1:
            raise SchemaError("'responses' must hold at least one rollout (G >= 1)")
        for name in ("response_lengths", "rewards"):
            if getattr(self, name).shape != (g,):
                raise SchemaError(
                    f"inconsistent shapes: '{name}' is {getattr(self, name).shape}, "
                    f"'responses' is {(g, t)}"
                )
        if self.behav_logp.shape != (g, t):
            raise SchemaError(
                f"inconsistent shapes: 'behav_logp' is {self.behav_logp.shape}, "
                f"'responses' is {(g, t)}"
            )
        _check_lengths("response_lengths", self.response_lengths, t)
        valid = np.arange(t)[None, :] < self.response_lengths[:, None]
        if (self.responses[valid] < 0).any():
            raise SchemaError("'responses' has a negative token id inside a response")
        _check_zero_outside(
            "behav_logp", self.behav_logp, np.zeros(g, dtype=np.int32), self.response_lengths
        )

    def __repr__(self) -> str:  # arrays by shape: a full dump would flood the logs
        g, t = self.responses.shape
        return (
            f"ScoredGroup(group_id={self.group_id!r}, prompt_id={self.prompt_id!r}, "
            f"policy_version={self.policy_version}, G={g}, T={t}, P={self.prompt.shape[0]}, "
            f"task={self.task!r}, actor={self.actor!r})"
        )

    @property
    def group_size(self) -> int:
        """G, the number of rollouts."""
        return int(self.responses.shape[0])



@dataclass(frozen=True, eq=False, repr=False)
class CuratedBatch(_WireRecord):
    """One learner step's samples after sample-level selection, as the selector publishes them.

    Shapes (N >= 1 samples, L the padded width): ``input_ids`` int32[N, L], prompt then response,
    right-padded; ``prompt_lengths`` and ``seq_lengths`` int32[N] with
    0 <= prompt_len <= seq_len <= L, the response occupying positions [prompt_len, seq_len);
    ``behav_logp`` float32[N, L], the behaviour log-prob of the token at position t, 0 outside
    the response; ``advantages``, ``rewards`` float32[N]; ``policy_versions`` int32[N] >= 0.
    ``group_ids`` lists each source group once; ``stats`` are finite numbers.
    """

    KIND: ClassVar[str] = "batch"
    _SCALARS: ClassVar[tuple[str, ...]] = (
        "batch_id", "step", "total_steps", "progress", "sample_ratio", "token_ratio", "preset",
        "group_ids", "stats",
    )  # fmt: skip
    _ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {
        "input_ids": ("i", 2),
        "prompt_lengths": ("i", 1),
        "seq_lengths": ("i", 1),
        "behav_logp": ("f", 2),
        "advantages": ("f", 1),
        "rewards": ("f", 1),
        "policy_versions": ("i", 1),
    }

    batch_id: str
    step: int
    total_steps: int
    progress: float
    sample_ratio: float
    token_ratio: float
    preset: str
    input_ids: np.ndarray
    prompt_lengths: np.ndarray
    seq_lengths: np.ndarray
    behav_logp: np.ndarray
    advantages: np.ndarray
    rewards: np.ndarray
    policy_versions: np.ndarray
    group_ids: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "batch_id", _check_str("batch_id", self.batch_id, nonempty=True))
        put(self, "step", _check_int("step", self.step, minimum=0))
        put(self, "total_steps", _check_int("total_steps", self.total_steps, minimum=1))
        put(self, "progress", _check_float("progress", self.progress, low=0.0, high=1.0))
        put(
            self, "sample_ratio", _check_float("sample_ratio", self.sample_ratio, low=0.0, high=1.0)
        )
        put(self, "token_ratio", _check_float("token_ratio", self.token_ratio, low=0.0, high=1.0))
        put(self, "preset", _check_str("preset", self.preset, nonempty=True))
        for name, (elem_kind, ndim) in self._ARRAYS.items():
            conv = _as_float_array if elem_kind == "f" else _as_int_array
            put(self, name, conv(name, getattr(self, name), ndim))

        if not isinstance(self.group_ids, (list, tuple)):
            raise SchemaError(f"'group_ids' must be a list, got {type(self.group_ids).__name__}")
        ids = [_check_str("group_ids[]", g, nonempty=True) for g in self.group_ids]
        if not ids:
            raise SchemaError("'group_ids' must name at least one source group")
        if len(set(ids)) != len(ids):
            raise SchemaError("'group_ids' lists a group more than once")
        put(self, "group_ids", ids)
        if not isinstance(self.stats, Mapping):
            raise SchemaError(f"'stats' must be a mapping, got {type(self.stats).__name__}")
        put(
            self,
            "stats",
            {
                _check_str("stats key", k): _check_float(f"stats[{k}]", v)
                for k, v in self.stats.items()
            },
        )

        n, width = self.input_ids.shape
        if n < 1:
            raise SchemaError("a batch must hold at least one sample (N >= 1)")
        if width < 1:
            raise SchemaError("'input_ids' must have a padded width L >= 1")
        for name in ("prompt_lengths", "seq_lengths", "advantages", "rewards", "policy_versions"):
            if getattr(self, name).shape != (n,):
                raise SchemaError(
                    f"inconsistent shapes: '{name}' is {getattr(self, name).shape}, "
                    f"'input_ids' is {(n, width)}"
                )
        if self.behav_logp.shape != (n, width):
            raise SchemaError(
                f"inconsistent shapes: 'behav_logp' is {self.behav_logp.shape}, "
                f"'input_ids' is {(n, width)}"
            )
        _check_lengths("prompt_lengths", self.prompt_lengths, width)
        _check_lengths(
            "seq_lengths", self.seq_lengths, width, self.prompt_lengths, "prompt_lengths"
        )
        if (self.policy_versions < 0).any():
            raise SchemaError("'policy_versions' has a negative version")
        valid = np.arange(width)[None, :] < self.seq_lengths[:, None]
        if (self.input_ids[valid] < 0).any():
            raise SchemaError("'input_ids' has a negative token id inside a sequence")
        _check_zero_outside("behav_logp", self.behav_logp, self.prompt_lengths, self.seq_lengths)

    def __repr__(self) -> str:  # arrays by shape: a full dump would flood the logs
        n, width = self.input_ids.shape
        return (
            f"CuratedBatch(batch_id={self.batch_id!r}, step={self.step}/{self.total_steps}, "
            f"preset={self.preset!r}, N={n}, L={width}, groups={len(self.group_ids)})"
        )

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return int(self.input_ids.shape[0])



_KINDS: dict[str, type[ScoredGroup] | type[CuratedBatch]] = {
    ScoredGroup.KIND: ScoredGroup,
    CuratedBatch.KIND: CuratedBatch,
}


def decode(fields: Mapping[Any, Any]) -> ScoredGroup | CuratedBatch:
    """Decode any record, dispatching on its ``kind``; raises :class:`SchemaError`."""
    meta = _parse_meta(_normalise_fields(fields))
    kind = meta["kind"]
    if not isinstance(kind, str) or kind not in _KINDS:
        raise SchemaError(f"unknown kind {kind!r} (expected one of {sorted(_KINDS)})")
    return _KINDS[kind].from_fields(fields)

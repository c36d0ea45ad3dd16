"""The wire codec of the Redis streams: how a record becomes stream fields and back.

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
from typing import Any, ClassVar, TypeVar

import numpy as np

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


def as_int_array(name: str, value: Any, ndim: int) -> np.ndarray:
    """Coerce to a C-contiguous native int32 array of ``ndim`` dims, refusing lossy casts."""
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise SchemaError(f"array '{name}' must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.dtype.kind == "b" or (arr.dtype.kind not in "iu" and arr.size > 0):
        raise SchemaError(f"array '{name}' must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
        raise SchemaError(f"array '{name}' has values outside the int32 range")
    return np.ascontiguousarray(arr, dtype=np.int32)


def as_float_array(name: str, value: Any, ndim: int) -> np.ndarray:
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


def check_str(name: str, value: Any, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"field '{name}' must be a string, got {type(value).__name__}")
    if nonempty and not value:
        raise SchemaError(f"field '{name}' must not be empty")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    # bool is an int subclass, and a float like 3.0 would hide a producer bug.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SchemaError(f"field '{name}' must be an integer, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise SchemaError(f"field '{name}' must be >= {minimum}, got {value}")
    return value


def check_float(
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


def check_lengths(
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


def check_zero_outside(name: str, values: np.ndarray, start: np.ndarray, end: np.ndarray) -> None:
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


def normalise_fields(fields: Mapping[Any, Any]) -> dict[bytes, Any]:
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


def parse_meta(fields: dict[bytes, Any]) -> dict[str, Any]:
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
    optional: frozenset[str] = frozenset(),
    optional_scalars: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse and check the generic layout; the record's own __post_init__ checks semantics.

    ``array_specs`` maps array name -> (element kind "i" or "f", ndim); arrays named in
    ``optional`` may be absent (field and description both), and are then left out, as are
    scalars named in ``optional_scalars`` that ``meta`` does not hold (their defaults apply).
    """
    norm = normalise_fields(fields)
    meta = parse_meta(norm)
    if meta["kind"] != kind:
        raise SchemaError(f"wrong kind: expected {kind!r}, got {meta['kind']!r}")

    expected_meta = {"schema", "kind", "arrays", *scalar_names}
    for name in scalar_names:
        if name not in meta and name not in optional_scalars:
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
        if name in optional and desc is None and name.encode() not in norm:
            continue
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

    scalars = {name: meta[name] for name in scalar_names if name in meta}
    return scalars, arrays


# --------------------------------------------------------------------------------------------
# The encoding every record kind shares
# --------------------------------------------------------------------------------------------


_R = TypeVar("_R", bound="WireRecord")


class WireRecord:
    """Encoding shared by the record kinds: ``meta`` JSON plus one raw-bytes field per array."""

    KIND: ClassVar[str]
    _SCALARS: ClassVar[tuple[str, ...]]
    _ARRAYS: ClassVar[dict[str, tuple[str, int]]]
    # Arrays a record may leave out (None in Python, absent on the wire): later additions, so
    # records written before them still decode.
    _OPTIONAL_ARRAYS: ClassVar[frozenset[str]] = frozenset()
    # Scalars likewise, by name, with the default that leaves them off the wire.
    _OPTIONAL_SCALARS: ClassVar[Mapping[str, Any]] = {}

    def to_fields(self) -> dict[bytes, bytes]:
        """Encode as a stream entry (``meta`` plus one raw-bytes field per array)."""
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        scalars = {name: getattr(self, name) for name in self._SCALARS}
        return _encode(
            self.KIND,
            {
                k: v
                for k, v in scalars.items()
                if k not in self._OPTIONAL_SCALARS or v != self._OPTIONAL_SCALARS[k]
            },
            {k: v for k, v in arrays.items() if v is not None or k not in self._OPTIONAL_ARRAYS},
        )

    @classmethod
    def from_fields(cls: type[_R], fields: Mapping[Any, Any]) -> _R:
        """Decode and validate a stream entry; raises :class:`SchemaError`."""
        scalars, arrays = _decode_body(
            fields,
            cls.KIND,
            cls._SCALARS,
            cls._ARRAYS,
            cls._OPTIONAL_ARRAYS,
            frozenset(cls._OPTIONAL_SCALARS),
        )
        return cls(**scalars, **arrays)

"""The records of the Redis streams: a scored group (rollout -> selector) and a curated batch
(selector -> learner), validated on construction and on decoding (see :mod:`codec`).

Arrays are declared once, on their dataclass field (``field(metadata=wire_array(kind, ndim))``);
encoding, decoding and the dtype checks iterate those declarations. The per-row fields of a
learner step are :class:`CuratedRows`, the one definition that the selector packs, the wire
record carries (:class:`CuratedBatch` is the rows plus the step's scalars) and the learner
turns into tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import numpy as np

from services.transport.codec import (
    SchemaError,
    WireRecord,
    as_float_array,
    as_int_array,
    check_float,
    check_int,
    check_lengths,
    check_str,
    check_zero_outside,
    normalise_fields,
    parse_meta,
)

_ARRAY = "wire_array"  # field metadata key: (element kind "i" int32 or "f" float32, ndim)
_OPTIONAL = "wire_optional"


def wire_array(kind: str, ndim: int, *, optional: bool = False) -> dict[str, Any]:
    """Metadata declaring a dataclass field a wire array, ``field(metadata=wire_array(...))``:
    ``kind`` "i" (int32) or "f" (float32, finite), ``ndim`` dimensions. An ``optional`` array
    (give it ``default=None``) is left off the wire when None, so a field added later still
    decodes the records written before it (the replay log's)."""
    if kind not in ("i", "f"):
        raise ValueError(f"kind: expected 'i' or 'f', got {kind!r}")
    return {_ARRAY: (kind, ndim), _OPTIONAL: optional}


def wire_optional() -> dict[str, Any]:
    """Metadata declaring a scalar field optional on the wire, ``field(default=...,
    metadata=wire_optional())``: left off the wire while it holds its default, so a field added
    later still decodes the records written before it, and a record that does not use it
    encodes to the same bytes as before."""
    return {_OPTIONAL: True}


_C = TypeVar("_C", bound=type)


def _declared(cls: _C) -> _C:
    """Derive the class's wire layout from its fields: the arrays (declared with
    :func:`wire_array`) and the scalars (every other field), both in declaration order, which is
    their order in ``meta``."""
    fs = fields(cls)
    cls._ARRAYS = {f.name: f.metadata[_ARRAY] for f in fs if _ARRAY in f.metadata}
    cls._OPTIONAL_ARRAYS = frozenset(f.name for f in fs if f.metadata.get(_OPTIONAL))
    cls._SCALARS = tuple(f.name for f in fs if _ARRAY not in f.metadata)
    cls._OPTIONAL_SCALARS = {
        f.name: f.default for f in fs if _ARRAY not in f.metadata and f.metadata.get(_OPTIONAL)
    }
    return cls


def _coerce_arrays(record: Any) -> None:
    """Cast each declared array of ``record`` to its wire dtype (SchemaError naming the field)."""
    for name, (elem_kind, ndim) in record._ARRAYS.items():
        value = getattr(record, name)
        if value is None and name in record._OPTIONAL_ARRAYS:
            continue
        conv = as_float_array if elem_kind == "f" else as_int_array
        object.__setattr__(record, name, conv(name, value, ndim))  # frozen: stored once, here


@_declared
@dataclass(frozen=True, eq=False, repr=False)
class ScoredGroup(WireRecord):
    """G scored rollouts of one prompt, as a rollout actor publishes them.

    Shapes: ``prompt`` int32[P] (P >= 1); ``responses`` int32[G, T] right-padded (G >= 1);
    ``response_lengths`` int32[G] in [0, T]; ``behav_logp`` float32[G, T], the rollout policy's
    log-prob of each response token, 0 at padding; ``rewards`` float32[G]. All floats finite.
    ``token_versions`` int32[G, T] (optional): the weight version that sampled each response
    token, 0 at padding, each in [policy_version, max_version]; left out when every token came
    from ``policy_version`` (no in-flight update during the group). ``source`` (optional, ""
    when left out): the prompt's source, for per-source metrics.
    """

    KIND: ClassVar[str] = "group"

    group_id: str
    prompt_id: str
    policy_version: int
    prompt: np.ndarray = field(metadata=wire_array("i", 1))
    responses: np.ndarray = field(metadata=wire_array("i", 2))
    response_lengths: np.ndarray = field(metadata=wire_array("i", 1))
    behav_logp: np.ndarray = field(metadata=wire_array("f", 2))
    rewards: np.ndarray = field(metadata=wire_array("f", 1))
    created_at: float
    actor: str
    task: str
    token_versions: np.ndarray | None = field(
        default=None, metadata=wire_array("i", 2, optional=True)
    )
    # Where the prompt came from (``Prompt.source``: a reasoning-gym dataset, a data file, a
    # plug-in's tag), for per-source training metrics; ``task`` names the verifier, which is
    # the source only for reasoning-gym. Empty for the built-in tasks, and then off the wire.
    source: str = field(default="", metadata=wire_optional())

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are stored once, here
        put(self, "group_id", check_str("group_id", self.group_id, nonempty=True))
        put(self, "prompt_id", check_str("prompt_id", self.prompt_id))
        put(self, "policy_version", check_int("policy_version", self.policy_version, minimum=0))
        put(self, "created_at", check_float("created_at", self.created_at, low=0.0))
        put(self, "actor", check_str("actor", self.actor))
        put(self, "task", check_str("task", self.task))
        put(self, "source", check_str("source", self.source))
        _coerce_arrays(self)

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
        check_lengths("response_lengths", self.response_lengths, t)
        valid = self.response_mask()
        if (self.responses[valid] < 0).any():
            raise SchemaError("'responses' has a negative token id inside a response")
        check_zero_outside(
            "behav_logp", self.behav_logp, np.zeros(g, dtype=np.int32), self.response_lengths
        )
        if self.token_versions is not None:
            self._check_token_versions(valid)

    def _check_token_versions(self, valid: np.ndarray) -> None:
        tv = self.token_versions
        if tv.shape != self.responses.shape:
            raise SchemaError(
                f"inconsistent shapes: 'token_versions' is {tv.shape}, "
                f"'responses' is {self.responses.shape}"
            )
        check_zero_outside(
            "token_versions", tv, np.zeros(tv.shape[0], dtype=np.int32), self.response_lengths
        )
        inside = tv[valid]
        if inside.size and int(inside.min()) != self.policy_version:
            raise SchemaError(
                f"'token_versions' starts at version {int(inside.min())}, but policy_version "
                f"is {self.policy_version} (the version of the group's oldest token)"
            )
        rows_back = np.diff(np.where(valid, tv, np.iinfo(np.int32).max), axis=1)
        if ((rows_back < 0) & valid[:, 1:]).any():
            raise SchemaError("'token_versions' goes back to an older version within a response")

    def response_mask(self) -> np.ndarray:
        """bool [G, T]: True on each rollout's response tokens, False at padding."""
        return np.arange(self.responses.shape[1])[None, :] < self.response_lengths[:, None]

    @property
    def max_version(self) -> int:
        """The newest weight version among the group's tokens."""
        if self.token_versions is None or not self.token_versions.size:
            return self.policy_version
        return max(self.policy_version, int(self.token_versions.max()))

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


@_declared
@dataclass(frozen=True, eq=False, repr=False)
class CuratedRows:
    """The row schema: the N kept samples of a learner step, one row each (N >= 1), prompt then
    response right-padded to width L >= 1; every array is [N] or, per token, [N, L].

    The selector packs these (:func:`selector.curate.curate`), :class:`CuratedBatch` carries
    them on the wire, and the learner takes the ones it trains on as tensors
    (``learner.batch.LearnerBatch.from_rows``). To add a per-row field: declare it here, as
    ``name: np.ndarray = field(metadata=wire_array(kind, ndim))`` (with ``default=None`` and
    ``optional=True`` older records, the replay log's, still decode), and fill it where the
    selector packs rows; encoding, decoding, dtype and shape checks follow from the declaration.
    """

    # int32 [N, L]: prompt then response, right-padded.
    input_ids: np.ndarray = field(metadata=wire_array("i", 2))
    # int32 [N]: 0 <= prompt_len <= seq_len <= L; the response is [prompt_len, seq_len).
    prompt_lengths: np.ndarray = field(metadata=wire_array("i", 1))
    seq_lengths: np.ndarray = field(metadata=wire_array("i", 1))
    # float32 [N, L]: the rollout policy's log-prob of the token at each position, 0 outside
    # the response.
    behav_logp: np.ndarray = field(metadata=wire_array("f", 2))
    # float32 [N]: each row's advantage and reward.
    advantages: np.ndarray = field(metadata=wire_array("f", 1))
    rewards: np.ndarray = field(metadata=wire_array("f", 1))
    # int32 [N] >= 0: the weights version that generated each row.
    policy_versions: np.ndarray = field(metadata=wire_array("i", 1))

    _ARRAYS: ClassVar[dict[str, tuple[str, int]]]
    _OPTIONAL_ARRAYS: ClassVar[frozenset[str]]

    def __post_init__(self) -> None:
        _coerce_arrays(self)
        n, width = self.input_ids.shape
        if n < 1:
            raise SchemaError("a batch must hold at least one sample (N >= 1)")
        if width < 1:
            raise SchemaError("'input_ids' must have a padded width L >= 1")
        for name, (_, ndim) in CuratedRows._ARRAYS.items():
            value = getattr(self, name)
            want = (n, width) if ndim == 2 else (n,)
            if value is not None and value.shape != want:
                raise SchemaError(
                    f"inconsistent shapes: '{name}' is {value.shape}, 'input_ids' is {(n, width)}"
                )
        check_lengths("prompt_lengths", self.prompt_lengths, width)
        check_lengths("seq_lengths", self.seq_lengths, width, self.prompt_lengths, "prompt_lengths")
        if (self.policy_versions < 0).any():
            raise SchemaError("'policy_versions' has a negative version")
        valid = np.arange(width)[None, :] < self.seq_lengths[:, None]
        if (self.input_ids[valid] < 0).any():
            raise SchemaError("'input_ids' has a negative token id inside a sequence")
        check_zero_outside("behav_logp", self.behav_logp, self.prompt_lengths, self.seq_lengths)

    def columns(self) -> dict[str, np.ndarray | None]:
        """The per-row arrays by name (what a :class:`CuratedBatch` is built from)."""
        return {name: getattr(self, name) for name in CuratedRows._ARRAYS}

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return int(self.input_ids.shape[0])

    def __repr__(self) -> str:  # arrays by shape: a full dump would flood the logs
        n, width = self.input_ids.shape
        return f"{type(self).__name__}(N={n}, L={width})"


@_declared
@dataclass(frozen=True, eq=False, repr=False)
class CuratedBatch(CuratedRows, WireRecord):
    """One learner step's samples after sample-level selection, as the selector publishes them:
    the rows (:class:`CuratedRows`, the per-row arrays) and the step's scalars.

    ``group_ids`` lists each source group once; ``stats`` are finite numbers.
    """

    KIND: ClassVar[str] = "batch"

    batch_id: str
    step: int
    total_steps: int
    progress: float
    sample_ratio: float
    token_ratio: float
    preset: str
    group_ids: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "batch_id", check_str("batch_id", self.batch_id, nonempty=True))
        put(self, "step", check_int("step", self.step, minimum=0))
        put(self, "total_steps", check_int("total_steps", self.total_steps, minimum=1))
        put(self, "progress", check_float("progress", self.progress, low=0.0, high=1.0))
        put(self, "sample_ratio", check_float("sample_ratio", self.sample_ratio, low=0.0, high=1.0))
        put(self, "token_ratio", check_float("token_ratio", self.token_ratio, low=0.0, high=1.0))
        put(self, "preset", check_str("preset", self.preset, nonempty=True))
        super().__post_init__()

        if not isinstance(self.group_ids, (list, tuple)):
            raise SchemaError(f"'group_ids' must be a list, got {type(self.group_ids).__name__}")
        ids = [check_str("group_ids[]", g, nonempty=True) for g in self.group_ids]
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
                check_str("stats key", k): check_float(f"stats[{k}]", v)
                for k, v in self.stats.items()
            },
        )

    def __repr__(self) -> str:  # arrays by shape: a full dump would flood the logs
        n, width = self.input_ids.shape
        return (
            f"CuratedBatch(batch_id={self.batch_id!r}, step={self.step}/{self.total_steps}, "
            f"preset={self.preset!r}, N={n}, L={width}, groups={len(self.group_ids)})"
        )


_KINDS: dict[str, type[ScoredGroup] | type[CuratedBatch]] = {
    ScoredGroup.KIND: ScoredGroup,
    CuratedBatch.KIND: CuratedBatch,
}


def decode(fields: Mapping[Any, Any]) -> ScoredGroup | CuratedBatch:
    """Decode any record, dispatching on its ``kind``; raises :class:`SchemaError`."""
    meta = parse_meta(normalise_fields(fields))
    kind = meta["kind"]
    if not isinstance(kind, str) or kind not in _KINDS:
        raise SchemaError(f"unknown kind {kind!r} (expected one of {sorted(_KINDS)})")
    return _KINDS[kind].from_fields(fields)

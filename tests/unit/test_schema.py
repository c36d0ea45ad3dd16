"""Wire schema: round trips and every way a record can be malformed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from services.transport.codec import SCHEMA_VERSION, SchemaError
from services.transport.records import CuratedBatch, CuratedRows, ScoredGroup, decode


def make_group(rng: np.random.Generator, g: int = 4, t: int = 6, p: int = 5) -> ScoredGroup:
    lengths = rng.integers(0, t + 1, size=g)
    logp = -rng.random((g, t)).astype(np.float32)
    logp[np.arange(t)[None, :] >= lengths[:, None]] = 0.0
    return ScoredGroup(
        group_id=f"grp-{rng.integers(1 << 30)}",
        prompt_id="p-7",
        policy_version=3,
        prompt=rng.integers(0, 15, size=p),
        responses=rng.integers(0, 15, size=(g, t)),
        response_lengths=lengths,
        behav_logp=logp,
        rewards=rng.random(g).astype(np.float32),
        created_at=1_700_000_000.5,
        actor="actor-0",
        task="arith",
    )


def make_batch(rng: np.random.Generator, n: int = 5, width: int = 12) -> CuratedBatch:
    prompt_len = rng.integers(1, 5, size=n)
    seq_len = prompt_len + rng.integers(0, width - 4, size=n)
    pos = np.arange(width)[None, :]
    logp = -rng.random((n, width)).astype(np.float32)
    logp[(pos < prompt_len[:, None]) | (pos >= seq_len[:, None])] = 0.0
    return CuratedBatch(
        batch_id="step-000012",
        step=12,
        total_steps=200,
        progress=0.06,
        sample_ratio=0.25,
        token_ratio=0.2,
        preset="d3s",
        input_ids=rng.integers(0, 15, size=(n, width)),
        prompt_lengths=prompt_len,
        seq_lengths=seq_len,
        behav_logp=logp,
        advantages=rng.standard_normal(n).astype(np.float32),
        rewards=rng.random(n).astype(np.float32),
        policy_versions=rng.integers(0, 4, size=n),
        group_ids=["grp-1", "grp-2"],
        stats={"var_before": 0.5, "var_after": 1.25},
    )


def with_meta(fields: dict[bytes, bytes], **changes: object) -> dict[bytes, bytes]:
    meta = json.loads(fields[b"meta"])
    meta.update(changes)
    return {**fields, b"meta": json.dumps(meta).encode()}


def with_array_desc(fields: dict[bytes, bytes], name: str, **desc: object) -> dict[bytes, bytes]:
    meta = json.loads(fields[b"meta"])
    meta["arrays"][name].update(desc)
    return {**fields, b"meta": json.dumps(meta).encode()}


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_group_round_trip_preserves_every_field(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = make_group(rng, g=int(rng.integers(1, 9)), t=int(rng.integers(1, 20)))
    back = decode(g.to_fields())
    assert isinstance(back, ScoredGroup)
    for name in ("group_id", "prompt_id", "policy_version", "created_at", "actor", "task"):
        assert getattr(back, name) == getattr(g, name)
    for name in ("prompt", "responses", "response_lengths", "behav_logp", "rewards"):
        got, want = getattr(back, name), getattr(g, name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    # Decoded arrays must be writable copies (torch.from_numpy warns on read-only memory).
    assert back.responses.flags.writeable


@pytest.mark.parametrize("seed", range(5))
def test_batch_round_trip_preserves_every_field(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    b = make_batch(rng, n=int(rng.integers(1, 10)))
    back = CuratedBatch.from_fields(b.to_fields())
    for name in ("batch_id", "step", "total_steps", "progress", "sample_ratio", "token_ratio"):
        assert getattr(back, name) == getattr(b, name)
    assert back.preset == "d3s"
    assert back.group_ids == ["grp-1", "grp-2"]
    assert back.stats == {"var_before": 0.5, "var_after": 1.25}
    for name in CuratedBatch._ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(b, name))
        assert getattr(back, name).dtype == getattr(b, name).dtype


def test_encoding_is_packed_little_endian_bytes_with_declared_dtype() -> None:
    g = make_group(np.random.default_rng(0), g=2, t=3, p=4)
    fields = g.to_fields()
    meta = json.loads(fields[b"meta"])
    assert meta["schema"] == SCHEMA_VERSION and meta["kind"] == "group"
    assert meta["arrays"]["responses"] == {"dtype": "int32", "shape": [2, 3]}
    assert fields[b"responses"] == g.responses.astype("<i4").tobytes()
    assert len(fields[b"behav_logp"]) == 2 * 3 * 4


def test_int64_on_the_wire_is_accepted_and_held_as_int32() -> None:
    g = make_group(np.random.default_rng(1))
    fields = dict(g.to_fields())
    fields[b"prompt"] = g.prompt.astype("<i8").tobytes()
    back = ScoredGroup.from_fields(with_array_desc(fields, "prompt", dtype="int64"))
    assert back.prompt.dtype == np.int32
    np.testing.assert_array_equal(back.prompt, g.prompt)


def test_str_field_names_are_accepted() -> None:
    g = make_group(np.random.default_rng(2))
    back = decode({k.decode(): v for k, v in g.to_fields().items()})
    assert back.group_id == g.group_id


# ---- malformed records ------------------------------------------------------------------------


@pytest.fixture
def group_fields() -> dict[bytes, bytes]:
    return make_group(np.random.default_rng(7), g=4, t=6).to_fields()


@pytest.fixture
def batch_fields() -> dict[bytes, bytes]:
    return make_batch(np.random.default_rng(8)).to_fields()


def test_wrong_schema_version(group_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="unsupported schema version 2") as info:
        decode(with_meta(group_fields, schema=2))
    assert "understands 1" in info.value.reason


def test_missing_schema_version(group_fields: dict[bytes, bytes]) -> None:
    meta = json.loads(group_fields[b"meta"])
    del meta["schema"]
    with pytest.raises(SchemaError, match="no schema version"):
        decode({**group_fields, b"meta": json.dumps(meta).encode()})


def test_non_integer_schema_version(group_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="schema version must be an integer"):
        decode(with_meta(group_fields, schema="1"))


def test_wrong_kind_for_the_record_type(batch_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="wrong kind: expected 'group', got 'batch'"):
        ScoredGroup.from_fields(batch_fields)


def test_unknown_kind(group_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="unknown kind 'weights'"):
        decode(with_meta(group_fields, kind="weights"))


@pytest.mark.parametrize("name", ["rewards", "behav_logp", "meta"])
def test_missing_field(group_fields: dict[bytes, bytes], name: str) -> None:
    fields = {k: v for k, v in group_fields.items() if k != name.encode()}
    with pytest.raises(SchemaError, match=f"missing field '{name}'"):
        decode(fields)


def test_missing_scalar(group_fields: dict[bytes, bytes]) -> None:
    meta = json.loads(group_fields[b"meta"])
    del meta["policy_version"]
    with pytest.raises(SchemaError, match="missing field 'policy_version'"):
        decode({**group_fields, b"meta": json.dumps(meta).encode()})


def test_unexpected_field(group_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="unexpected field"):
        decode({**group_fields, b"payload": b"\x00"})


def test_truncated_array(group_fields: dict[bytes, bytes]) -> None:
    fields = {**group_fields, b"responses": group_fields[b"responses"][:-3]}
    with pytest.raises(SchemaError, match=r"array 'responses' has 93 bytes.*needs 96"):
        decode(fields)


def test_disallowed_dtype(group_fields: dict[bytes, bytes]) -> None:
    fields = with_array_desc(group_fields, "rewards", dtype="float64")
    with pytest.raises(SchemaError, match="dtype 'float64', not one of"):
        decode(fields)


def test_object_dtype_is_refused(group_fields: dict[bytes, bytes]) -> None:
    # A pickle-capable dtype must never reach np.frombuffer.
    with pytest.raises(SchemaError, match="dtype 'object', not one of"):
        decode(with_array_desc(group_fields, "prompt", dtype="object"))


def test_integer_dtype_for_a_float_array(group_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="'rewards' has dtype int32, expected float32"):
        decode(with_array_desc(group_fields, "rewards", dtype="int32"))


def test_bad_shape_description(group_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="'responses' needs a shape of 2 non-negative ints"):
        decode(with_array_desc(group_fields, "responses", shape=[24]))
    with pytest.raises(SchemaError, match="'responses' needs a shape of 2 non-negative ints"):
        decode(with_array_desc(group_fields, "responses", shape=[-4, -6]))


def test_nan_reward(group_fields: dict[bytes, bytes]) -> None:
    rewards = np.frombuffer(group_fields[b"rewards"], dtype="<f4").copy()
    rewards[2] = np.nan
    with pytest.raises(SchemaError, match="'rewards' has a non-finite value .* index 2"):
        decode({**group_fields, b"rewards": rewards.tobytes()})


def test_inf_logprob(group_fields: dict[bytes, bytes]) -> None:
    logp = np.frombuffer(group_fields[b"behav_logp"], dtype="<f4").copy()
    logp[0] = -np.inf
    with pytest.raises(SchemaError, match="'behav_logp' has a non-finite value"):
        decode({**group_fields, b"behav_logp": logp.tobytes()})


def test_nan_in_meta_json_is_refused(batch_fields: dict[bytes, bytes]) -> None:
    text = batch_fields[b"meta"].decode().replace('"progress":0.06', '"progress":NaN')
    with pytest.raises(SchemaError, match="non-standard constant NaN"):
        decode({**batch_fields, b"meta": text.encode()})


def test_inconsistent_shapes(group_fields: dict[bytes, bytes]) -> None:
    # 5 rewards for 4 rollouts: byte length agrees with the declared shape, shapes disagree.
    fields = with_array_desc(group_fields, "rewards", shape=[5])
    fields[b"rewards"] = np.zeros(5, dtype="<f4").tobytes()
    with pytest.raises(SchemaError, match=r"inconsistent shapes: 'rewards' is \(5,\)"):
        decode(fields)


def test_response_length_over_padded_width(group_fields: dict[bytes, bytes]) -> None:
    lengths = np.array([1, 7, 2, 0], dtype="<i4")  # T = 6
    with pytest.raises(SchemaError, match="length 7 over the padded width 6"):
        decode({**group_fields, b"response_lengths": lengths.tobytes()})


def test_negative_length(group_fields: dict[bytes, bytes]) -> None:
    lengths = np.array([1, -1, 2, 0], dtype="<i4")
    with pytest.raises(SchemaError, match="'response_lengths' has a negative length: -1"):
        decode({**group_fields, b"response_lengths": lengths.tobytes()})


def test_seq_length_shorter_than_prompt(batch_fields: dict[bytes, bytes]) -> None:
    b = CuratedBatch.from_fields(batch_fields)
    seq = b.seq_lengths.copy()
    seq[1] = b.prompt_lengths[1] - 1
    with pytest.raises(
        SchemaError, match=r"'seq_lengths'\[1\] = .* is below 'prompt_lengths'\[1\]"
    ):
        decode({**batch_fields, b"seq_lengths": seq.astype("<i4").tobytes()})


def test_nonzero_logprob_at_padding(group_fields: dict[bytes, bytes]) -> None:
    lengths = np.zeros(4, dtype="<i4")  # every position is now padding
    logp = np.full((4, 6), -0.5, dtype="<f4")
    fields = {**group_fields, b"response_lengths": lengths.tobytes(), b"behav_logp": logp.tobytes()}
    with pytest.raises(SchemaError, match=r"'behav_logp'\[0, 0\] = -0.5 must be 0 outside"):
        decode(fields)


def test_negative_policy_version(group_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="'policy_version' must be >= 0"):
        decode(with_meta(group_fields, policy_version=-1))


def test_float_where_int_is_required(group_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="'policy_version' must be an integer"):
        decode(with_meta(group_fields, policy_version=1.0))


def test_duplicate_group_ids_in_batch(batch_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="lists a group more than once"):
        decode(with_meta(batch_fields, group_ids=["a", "a"]))


def test_unexpected_meta_key(group_fields: dict[bytes, bytes]) -> None:
    with pytest.raises(SchemaError, match="unexpected meta key.*code"):
        decode(with_meta(group_fields, code="__import__('os')"))


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        (b"\xff\xfe\x00garbage", "meta is not valid UTF-8"),
        (b"{not json", "meta is not valid JSON"),
        (b"[1, 2, 3]", "meta must be a JSON object"),
        (b"", "meta is not valid JSON"),
    ],
)
def test_garbage_meta(group_fields: dict[bytes, bytes], meta: bytes, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        decode({**group_fields, b"meta": meta})


def test_garbage_entry() -> None:
    rng = np.random.default_rng(3)
    garbage = {rng.bytes(5): rng.bytes(40) for _ in range(3)}
    with pytest.raises(SchemaError, match="missing field 'meta'"):
        decode(garbage)
    with pytest.raises(SchemaError, match="must be a mapping"):
        decode(b"\x80\x04pickle")  # type: ignore[arg-type]


def test_str_values_are_refused(group_fields: dict[bytes, bytes]) -> None:
    fields = {**group_fields, b"meta": group_fields[b"meta"].decode()}
    with pytest.raises(SchemaError, match="decode_responses=True"):
        decode(fields)


# ---- construction validates too -----------------------------------------------------------------


def test_constructing_an_invalid_record_fails() -> None:
    rng = np.random.default_rng(4)
    g = make_group(rng)
    with pytest.raises(SchemaError, match="'rewards' has a non-finite value"):
        ScoredGroup(**{**g.__dict__, "rewards": np.array([1.0, np.nan, 0.0, 0.0])})
    with pytest.raises(SchemaError, match="at least one rollout"):
        ScoredGroup(
            **{
                **g.__dict__,
                "responses": np.zeros((0, 6), np.int32),
                "response_lengths": np.zeros(0, np.int32),
                "behav_logp": np.zeros((0, 6), np.float32),
                "rewards": np.zeros(0, np.float32),
            }
        )
    b = make_batch(rng)
    with pytest.raises(SchemaError, match=r"'stats\[var\]' must be finite"):
        CuratedBatch(**{**b.__dict__, "stats": {"var": float("inf")}})
    with pytest.raises(SchemaError, match="'progress' must lie in"):
        CuratedBatch(**{**b.__dict__, "progress": 1.5})


def test_int_values_out_of_int32_range_are_refused() -> None:
    g = make_group(np.random.default_rng(5))
    with pytest.raises(SchemaError, match="outside the int32 range"):
        ScoredGroup(**{**g.__dict__, "prompt": np.array([1, 2**40], dtype=np.int64)})


# ---- the row schema and records written before ---------------------------------------------------


def test_the_batch_record_carries_exactly_the_row_schema() -> None:
    b = make_batch(np.random.default_rng(6))
    row_fields = [f.name for f in dataclasses.fields(CuratedRows)]
    assert list(CuratedBatch._ARRAYS) == row_fields  # every per-row field goes on the wire
    rows = CuratedRows(**{name: getattr(b, name) for name in row_fields})
    again = CuratedBatch(**{**b.__dict__, **rows.columns()})
    assert again.to_fields() == b.to_fields()
    with pytest.raises(SchemaError, match=r"inconsistent shapes: 'rewards' is \(4,\)"):
        CuratedRows(**{**rows.columns(), "rewards": np.zeros(4, np.float32)})
    with pytest.raises(SchemaError, match=r"inconsistent shapes: 'behav_logp' is \(5, 11\)"):
        CuratedRows(**{**rows.columns(), "behav_logp": np.zeros((5, 11), np.float32)})


# Encoded by the code before the row schema was declared once (issue 27); the wire format must
# not change, or a restarted learner could not read its replay log.
STORED_BATCH = {
    "meta": '{"schema":1,"kind":"batch","batch_id":"step-0000003","step":3,"total_steps":10,'
    '"progress":0.3,"sample_ratio":0.5,"token_ratio":0.25,"preset":"d3s","group_ids":["g-1",'
    '"g-2"],"stats":{"reward_mean":0.5},"arrays":{"input_ids":{"dtype":"int32","shape":[2,4]},'
    '"prompt_lengths":{"dtype":"int32","shape":[2]},"seq_lengths":{"dtype":"int32","shape":[2]},'
    '"behav_logp":{"dtype":"float32","shape":[2,4]},"advantages":{"dtype":"float32","shape":[2]},'
    '"rewards":{"dtype":"float32","shape":[2]},"policy_versions":{"dtype":"int32","shape":[2]}}}',
    "input_ids": "050000000600000007000000000000000500000008000000090000000a000000",
    "prompt_lengths": "0100000001000000",
    "seq_lengths": "0300000004000000",
    "behav_logp": "00000000000000bf000080be0000000000000000000080bf000000be000000c0",
    "advantages": "0000803f000080bf",
    "rewards": "0000803f00000000",
    "policy_versions": "0200000003000000",
}
STORED_GROUP = {
    "meta": '{"schema":1,"kind":"group","group_id":"g-1","prompt_id":"p-1","policy_version":2,'
    '"created_at":1.5,"actor":"a","task":"t","arrays":{"prompt":{"dtype":"int32","shape":[1]},'
    '"responses":{"dtype":"int32","shape":[2,2]},"response_lengths":{"dtype":"int32","shape":'
    '[2]},"behav_logp":{"dtype":"float32","shape":[2,2]},"rewards":{"dtype":"float32","shape":'
    '[2]},"token_versions":{"dtype":"int32","shape":[2,2]}}}',
    "prompt": "05000000",
    "responses": "06000000070000000800000000000000",
    "response_lengths": "0200000001000000",
    "behav_logp": "000000bf000080be000080bf00000000",
    "rewards": "0000803f00000000",
    "token_versions": "02000000030000000200000000000000",
}


def _stored(record: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() if k == "meta" else bytes.fromhex(v) for k, v in record.items()}


def test_records_written_before_decode_and_encode_to_the_same_bytes() -> None:
    batch, group = decode(_stored(STORED_BATCH)), decode(_stored(STORED_GROUP))
    assert isinstance(batch, CuratedBatch) and isinstance(group, ScoredGroup)
    np.testing.assert_array_equal(batch.input_ids, [[5, 6, 7, 0], [5, 8, 9, 10]])
    np.testing.assert_array_equal(batch.behav_logp[1], [0.0, -1.0, -0.125, -2.0])
    assert batch.seq_lengths.tolist() == [3, 4] and batch.policy_versions.tolist() == [2, 3]
    assert (batch.step, batch.group_ids, batch.stats) == (3, ["g-1", "g-2"], {"reward_mean": 0.5})
    assert group.token_versions.tolist() == [[2, 3], [2, 0]] and group.max_version == 3
    assert batch.to_fields() == _stored(STORED_BATCH)
    assert group.to_fields() == _stored(STORED_GROUP)


def test_source_is_optional_on_the_wire() -> None:
    """``source`` came later: a group written before it decodes with source "", a group without
    one encodes as before (no meta key), and one with a source carries it across."""
    old = decode(_stored(STORED_GROUP))
    assert isinstance(old, ScoredGroup) and old.source == ""
    assert b"source" not in old.to_fields()[b"meta"]
    tagged = dataclasses.replace(old, source="chain_sum")
    again = ScoredGroup.from_fields(tagged.to_fields())
    assert again.source == "chain_sum" and again.task == "t"
    assert json.loads(tagged.to_fields()[b"meta"])["source"] == "chain_sum"
    with pytest.raises(SchemaError, match="field 'source' must be a string"):
        ScoredGroup.from_fields(with_meta(tagged.to_fields(), source=3))

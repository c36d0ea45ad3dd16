"""Transport against a real Redis: delivery, atomic commit, dead letters, reclaim, backpressure."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import redis

from services.transport.schema import CuratedBatch, ScoredGroup
from services.transport.streams import Transport

pytestmark = pytest.mark.integration

GROUP = "selector"


def make_group(i: int, g: int = 4, t: int = 5) -> ScoredGroup:
    rng = np.random.default_rng(i)
    lengths = rng.integers(1, t + 1, size=g)
    logp = -rng.random((g, t)).astype(np.float32)
    logp[np.arange(t)[None, :] >= lengths[:, None]] = 0.0
    return ScoredGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        policy_version=i % 3,
        prompt=rng.integers(0, 15, size=6),
        responses=rng.integers(0, 15, size=(g, t)),
        response_lengths=lengths,
        behav_logp=logp,
        rewards=rng.integers(0, 2, size=g).astype(np.float32),
        created_at=time.time(),
        actor="a0",
        task="arith",
    )


def make_batch(step: int, group_ids: list[str]) -> CuratedBatch:
    n, width = 3, 8
    ids = np.arange(n * width, dtype=np.int32).reshape(n, width) % 15
    logp = np.zeros((n, width), dtype=np.float32)
    logp[:, 3:6] = -0.25
    return CuratedBatch(
        batch_id=f"step-{step:06d}",
        step=step,
        total_steps=100,
        progress=step / 100,
        sample_ratio=0.25,
        token_ratio=0.2,
        preset="d3s",
        input_ids=ids,
        prompt_lengths=np.full(n, 3),
        seq_lengths=np.full(n, 6),
        behav_logp=logp,
        advantages=np.array([1.0, -1.0, 0.5], dtype=np.float32),
        rewards=np.array([1.0, 0.0, 1.0], dtype=np.float32),
        policy_versions=np.zeros(n, dtype=np.int32),
        group_ids=group_ids,
        stats={"var_before": 0.25, "var_after": 1.0},
    )


def pending_ids(client: redis.Redis, stream: str, consumer: str | None = None) -> list[str]:
    rows = client.xpending_range(stream, GROUP, "-", "+", 100, consumername=consumer)
    return [row["message_id"].decode() for row in rows]


def test_publish_read_commit_round_trip(transport: Transport) -> None:
    t, client = transport, transport.client
    t.ensure_consumer_group(t.groups_stream, GROUP)
    sent = [make_group(i) for i in range(3)]
    ids = [t.publish(t.groups_stream, g, incr={"groups_published": 1}) for g in sent]

    got = t.read(t.groups_stream, GROUP, "sel-0", count=10, block_ms=100)
    assert [d.entry_id for d in got] == ids
    assert [d.record.group_id for d in got] == ["g0", "g1", "g2"]
    np.testing.assert_array_equal(got[1].record.behav_logp, sent[1].behav_logp)
    assert t.backlog(t.groups_stream) == 3  # delivered but not committed: still backlog

    batch = make_batch(1, ["g0", "g1", "g2"])
    result = t.commit(
        t.groups_stream,
        GROUP,
        ids,
        outputs=[(t.batches_stream, batch.batch_id, batch)],
        incr={"batches": 1},
        hset={t.schedule_key: {"step": 1, "progress": 0.01, "preset": "d3s"}},
        consumer="sel-0",
    )
    assert result.committed and result.acked == 3
    assert list(result.written) == ["step-000001"]
    assert t.backlog(t.groups_stream) == 0
    assert pending_ids(client, t.groups_stream) == []
    assert t.stats() == {"groups_published": 3, "batches": 1}
    assert t.read_hash(t.schedule_key) == {"step": "1", "progress": "0.01", "preset": "d3s"}

    t.ensure_consumer_group(t.batches_stream, "learner")
    (delivered,) = t.read(t.batches_stream, "learner", "rank0", count=5)
    assert delivered.entry_id == result.written["step-000001"]
    assert isinstance(delivered.record, CuratedBatch)
    assert delivered.record.group_ids == ["g0", "g1", "g2"]
    np.testing.assert_array_equal(delivered.record.input_ids, batch.input_ids)


def test_group_created_after_publish_still_sees_earlier_records(transport: Transport) -> None:
    t = transport
    t.publish(t.groups_stream, make_group(0))
    t.ensure_consumer_group(t.groups_stream, GROUP)
    t.ensure_consumer_group(t.groups_stream, GROUP)  # BUSYGROUP is ignored
    assert len(t.read(t.groups_stream, GROUP, "c", count=5)) == 1


def test_malformed_records_are_dead_lettered_and_reading_goes_on(transport: Transport) -> None:
    t, client = transport, transport.client
    t.ensure_consumer_group(t.groups_stream, GROUP)
    good_fields = make_group(1).to_fields()
    meta = json.loads(good_fields[b"meta"])
    meta["schema"] = 99
    t.publish(t.groups_stream, make_group(0))
    bad_version = client.xadd(t.groups_stream, {**good_fields, b"meta": json.dumps(meta)})
    garbage = client.xadd(t.groups_stream, {b"\xff\x00": b"\x80\x04\x95junk", b"reason": b"x"})
    t.publish(t.groups_stream, make_group(2))

    got = t.read(t.groups_stream, GROUP, "sel-0", count=10)
    assert [d.record.group_id for d in got] == ["g0", "g2"]
    # Malformed entries are acknowledged and deleted; only the good ones stay pending.
    assert t.backlog(t.groups_stream) == 2
    assert pending_ids(client, t.groups_stream) == [d.entry_id for d in got]
    assert t.stats()["dead"] == 2

    dead = client.xrange(t.dead_stream)
    assert len(dead) == 2
    by_id = {fields[b"entry_id"]: fields for _, fields in dead}
    first = by_id[bad_version]
    assert first[b"source"] == t.groups_stream.encode()
    assert b"unsupported schema version 99" in first[b"reason"]
    assert first[b"orig:rewards"] == good_fields[b"rewards"]  # the original is kept, intact
    second = by_id[garbage]
    assert second[b"reason"] == b"missing field 'meta'"
    assert second[b"orig:reason"] == b"x"  # an original field cannot overwrite ours
    assert second[b"orig:\xff\x00"] == b"\x80\x04\x95junk"

    # Reading goes on: a record published after the bad ones arrives normally.
    t.publish(t.groups_stream, make_group(3))
    assert [d.record.group_id for d in t.read(t.groups_stream, GROUP, "sel-0", 10)] == ["g3"]


def test_committing_the_same_output_key_twice_writes_one_record(transport: Transport) -> None:
    t = transport
    t.ensure_consumer_group(t.groups_stream, GROUP)
    for i in range(2):
        t.publish(t.groups_stream, make_group(i))
    first, second = t.read(t.groups_stream, GROUP, "sel-0", count=2)
    batch = make_batch(7, ["g0"])
    out = [(t.batches_stream, batch.batch_id, batch)]

    r1 = t.commit(
        t.groups_stream, GROUP, [first.entry_id], out, incr={"batches": 1}, consumer="sel-0"
    )
    r2 = t.commit(
        t.groups_stream, GROUP, [second.entry_id], out, incr={"batches": 1}, consumer="sel-0"
    )
    assert r1.committed and r2.committed
    assert r2.written == {} and r2.duplicates == r1.written
    assert t.client.xlen(t.batches_stream) == 1
    assert t.stats()["batches"] == 1  # counters belong to the product, applied once
    assert t.backlog(t.groups_stream) == 0  # but both inputs were consumed


def test_a_retried_commit_changes_nothing(transport: Transport) -> None:
    t = transport
    t.ensure_consumer_group(t.groups_stream, GROUP)
    t.publish(t.groups_stream, make_group(0))
    (d,) = t.read(t.groups_stream, GROUP, "sel-0", count=1)
    batch = make_batch(1, ["g0"])
    args = (t.groups_stream, GROUP, [d.entry_id], [(t.batches_stream, batch.batch_id, batch)])
    kwargs = {"incr": {"batches": 1}, "hset": {t.schedule_key: {"step": 1}}, "consumer": "sel-0"}
    assert t.commit(*args, **kwargs).committed
    t.client.hset(t.schedule_key, "step", 2)  # later progress a replay must not undo

    again = t.commit(*args, **kwargs)
    assert not again.committed and again.not_pending == [d.entry_id]
    assert t.client.xlen(t.batches_stream) == 1
    assert t.stats() == {"batches": 1}
    assert t.read_hash(t.schedule_key)["step"] == "2"


def test_idempotent_publish(transport: Transport) -> None:
    t = transport
    g = make_group(0)
    first = t.publish(t.groups_stream, g, incr={"published": 1}, key=g.group_id)
    again = t.publish(t.groups_stream, g, incr={"published": 1}, key=g.group_id)
    assert first == again
    assert t.backlog(t.groups_stream) == 1
    assert t.stats() == {"published": 1}


def test_dead_consumers_entries_are_reclaimed_by_another(transport: Transport) -> None:
    t, client = transport, transport.client
    t.ensure_consumer_group(t.groups_stream, GROUP)
    for i in range(3):
        t.publish(t.groups_stream, make_group(i))
    taken = t.read(t.groups_stream, GROUP, "crashed", count=3)  # ... and it never commits
    assert len(taken) == 3
    assert t.read(t.groups_stream, GROUP, "alive", count=3) == []  # nothing new for others

    assert t.reclaim(t.groups_stream, GROUP, "alive", min_idle_ms=60_000, count=10) == []
    time.sleep(0.06)
    got = t.reclaim(t.groups_stream, GROUP, "alive", min_idle_ms=50, count=10)
    assert [d.entry_id for d in got] == [d.entry_id for d in taken]
    assert [d.record.group_id for d in got] == ["g0", "g1", "g2"]
    assert pending_ids(client, t.groups_stream, "alive") == [d.entry_id for d in taken]
    assert pending_ids(client, t.groups_stream, "crashed") == []

    # The crashed consumer comes back: its commit is fenced off, so nothing is duplicated.
    stale = t.commit(
        t.groups_stream,
        GROUP,
        [d.entry_id for d in taken],
        [(t.batches_stream, "step-000001", make_batch(1, ["g0", "g1", "g2"]))],
        consumer="crashed",
    )
    assert not stale.committed and len(stale.not_pending) == 3
    assert t.client.xlen(t.batches_stream) == 0

    done = t.commit(
        t.groups_stream,
        GROUP,
        [d.entry_id for d in got],
        [(t.batches_stream, "step-000001", make_batch(1, ["g0", "g1", "g2"]))],
        consumer="alive",
    )
    assert done.committed and t.backlog(t.groups_stream) == 0
    assert t.client.xlen(t.batches_stream) == 1


def test_reclaim_dead_letters_malformed_pending_entries(transport: Transport) -> None:
    t, client = transport, transport.client
    t.ensure_consumer_group(t.groups_stream, GROUP)
    client.xadd(t.groups_stream, {b"meta": b"{}"})
    t.publish(t.groups_stream, make_group(5))
    # A consumer took both raw and died before it could decode anything.
    client.xreadgroup(GROUP, "crashed", {t.groups_stream: ">"}, count=2)

    got = t.reclaim(t.groups_stream, GROUP, "alive", min_idle_ms=0, count=10)
    assert [d.record.group_id for d in got] == ["g5"]
    assert t.stats()["dead"] == 1
    ((_, dead),) = client.xrange(t.dead_stream)
    assert dead[b"reason"] == b"meta has no schema version"
    assert t.backlog(t.groups_stream) == 1


def test_restarted_consumer_rereads_its_own_pending_entries(transport: Transport) -> None:
    t = transport
    t.ensure_consumer_group(t.groups_stream, GROUP)
    t.publish(t.groups_stream, make_group(0))
    (d,) = t.read(t.groups_stream, GROUP, "sel-0", count=5)
    assert t.read(t.groups_stream, GROUP, "sel-0", count=5) == []
    again = t.read(t.groups_stream, GROUP, "sel-0", count=5, pending=True)
    assert [x.entry_id for x in again] == [d.entry_id]


def test_backlog_counts_unacknowledged_records(transport: Transport) -> None:
    t = transport
    assert t.backlog(t.groups_stream) == 0  # no stream yet
    t.ensure_consumer_group(t.groups_stream, GROUP)
    for i in range(5):
        t.publish(t.groups_stream, make_group(i))
    assert t.backlog(t.groups_stream) == 5
    got = t.read(t.groups_stream, GROUP, "c", count=2)
    assert t.backlog(t.groups_stream) == 5
    t.commit(t.groups_stream, GROUP, [d.entry_id for d in got], consumer="c")
    assert t.backlog(t.groups_stream) == 3


def test_wait_for_capacity(transport: Transport) -> None:
    t = transport
    t.ensure_consumer_group(t.groups_stream, GROUP)
    for i in range(3):
        t.publish(t.groups_stream, make_group(i))
    assert t.wait_for_capacity(t.groups_stream, bound=4, timeout_s=0.1) == 3

    start = time.monotonic()
    with pytest.raises(
        TimeoutError, match=rf"backlog of {t.groups_stream} stayed at 3 \(bound 3\)"
    ):
        t.wait_for_capacity(t.groups_stream, bound=3, timeout_s=0.2, poll_s=0.02)
    assert 0.2 <= time.monotonic() - start < 2.0

    # A consumer draining the stream releases the waiter.
    got = t.read(t.groups_stream, GROUP, "c", count=1)
    timer = threading.Timer(
        0.1, t.commit, args=(t.groups_stream, GROUP, [got[0].entry_id]), kwargs={"consumer": "c"}
    )
    timer.start()
    try:
        assert t.wait_for_capacity(t.groups_stream, bound=3, timeout_s=5.0, poll_s=0.02) == 2
    finally:
        timer.join()


def test_pause_flag(transport: Transport) -> None:
    t = transport
    assert not t.paused()
    t.set_paused(True)
    assert t.paused() and t.client.hget(t.control_key, "paused") == b"1"
    t.set_paused(False)
    assert not t.paused()


def test_blocking_read_is_bounded(transport: Transport) -> None:
    t = transport
    t.ensure_consumer_group(t.groups_stream, GROUP)
    start = time.monotonic()
    assert t.read(t.groups_stream, GROUP, "c", count=1, block_ms=150) == []
    assert 0.1 <= time.monotonic() - start < 2.0
    with pytest.raises(ValueError, match="socket timeout"):
        t.read(t.groups_stream, GROUP, "c", count=1, block_ms=60_000)


def test_decoding_client_is_refused(redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses=False"):
        Transport(client)


def test_reclaim_clears_pending_entries_whose_record_was_deleted(transport: Transport) -> None:
    # Redis 6.2's XAUTOCLAIM reports such an entry as nil, without its id.
    t, client = transport, transport.client
    t.ensure_consumer_group(t.groups_stream, GROUP)
    gone = t.publish(t.groups_stream, make_group(0))
    t.publish(t.groups_stream, make_group(1))
    client.xreadgroup(GROUP, "crashed", {t.groups_stream: ">"}, count=2)
    client.xdel(t.groups_stream, gone)

    got = t.reclaim(t.groups_stream, GROUP, "alive", min_idle_ms=0, count=10)
    assert [d.record.group_id for d in got] == ["g1"]
    assert pending_ids(client, t.groups_stream) == [got[0].entry_id]


def test_commit_of_more_entries_than_lua_can_unpack(transport: Transport) -> None:
    # Lua's unpack() stops near 8000 values; commit must chunk its XACK/XDEL.
    t, client = transport, transport.client
    t.ensure_consumer_group(t.groups_stream, GROUP)
    pipe = client.pipeline(transaction=False)
    for _ in range(8200):
        pipe.xadd(t.groups_stream, {b"x": b"1"})
    pipe.execute()
    reply = client.xreadgroup(GROUP, "c", {t.groups_stream: ">"}, count=9000)
    ids = [entry_id.decode() for entry_id, _ in reply[0][1]]
    result = t.commit(t.groups_stream, GROUP, ids, consumer="c")
    assert result.committed and result.acked == 8200
    assert t.backlog(t.groups_stream) == 0

"""Transport against a real Redis: delivery, atomic commit, dead letters, reclaim, backpressure."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis

from services.transport.bundle import Transport
from services.transport.records import CuratedBatch, ScoredGroup

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
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    sent = [make_group(i) for i in range(3)]
    ids = [t.queue.publish(t.keys.groups, g, incr={"groups_published": 1}) for g in sent]

    got = t.queue.read(t.keys.groups, GROUP, "sel-0", count=10, block_ms=100)
    assert [d.entry_id for d in got] == ids
    assert [d.record.group_id for d in got] == ["g0", "g1", "g2"]
    np.testing.assert_array_equal(got[1].record.behav_logp, sent[1].behav_logp)
    assert t.queue.backlog(t.keys.groups) == 3  # delivered but not committed: still backlog

    batch = make_batch(1, ["g0", "g1", "g2"])
    result = t.queue.commit(
        t.keys.groups,
        GROUP,
        ids,
        outputs=[(t.keys.batches, batch.batch_id, batch)],
        incr={"batches": 1},
        hset={t.keys.schedule: {"step": 1, "progress": 0.01, "preset": "d3s"}},
        consumer="sel-0",
    )
    assert result.committed and result.acked == 3
    assert list(result.written) == ["step-000001"]
    assert t.queue.backlog(t.keys.groups) == 0
    assert pending_ids(client, t.keys.groups) == []
    assert t.state.stats() == {"groups_published": 3, "batches": 1}
    assert t.state.schedule() == {"step": "1", "progress": "0.01", "preset": "d3s"}

    t.queue.ensure_consumer_group(t.keys.batches, "learner")
    (delivered,) = t.queue.read(t.keys.batches, "learner", "rank0", count=5)
    assert delivered.entry_id == result.written["step-000001"]
    assert isinstance(delivered.record, CuratedBatch)
    assert delivered.record.group_ids == ["g0", "g1", "g2"]
    np.testing.assert_array_equal(delivered.record.input_ids, batch.input_ids)


def test_group_created_after_publish_still_sees_earlier_records(transport: Transport) -> None:
    t = transport
    t.queue.publish(t.keys.groups, make_group(0))
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)  # BUSYGROUP is ignored
    assert len(t.queue.read(t.keys.groups, GROUP, "c", count=5)) == 1


def test_malformed_records_are_dead_lettered_and_reading_goes_on(transport: Transport) -> None:
    t, client = transport, transport.client
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    good_fields = make_group(1).to_fields()
    meta = json.loads(good_fields[b"meta"])
    meta["schema"] = 99
    t.queue.publish(t.keys.groups, make_group(0))
    bad_version = client.xadd(t.keys.groups, {**good_fields, b"meta": json.dumps(meta)})
    garbage = client.xadd(t.keys.groups, {b"\xff\x00": b"\x80\x04\x95junk", b"reason": b"x"})
    t.queue.publish(t.keys.groups, make_group(2))

    got = t.queue.read(t.keys.groups, GROUP, "sel-0", count=10)
    assert [d.record.group_id for d in got] == ["g0", "g2"]
    # Malformed entries are acknowledged and deleted; only the good ones stay pending.
    assert t.queue.backlog(t.keys.groups) == 2
    assert pending_ids(client, t.keys.groups) == [d.entry_id for d in got]
    assert t.state.stats()["dead"] == 2

    dead = client.xrange(t.keys.dead)
    assert len(dead) == 2
    by_id = {fields[b"entry_id"]: fields for _, fields in dead}
    first = by_id[bad_version]
    assert first[b"source"] == t.keys.groups.encode()
    assert b"unsupported schema version 99" in first[b"reason"]
    # A bounded summary of the payload, never the payload: sizes, a hash, a prefix of meta.
    payload = {**good_fields, b"meta": json.dumps(meta).encode()}
    assert int(first[b"fields"]) == len(payload)
    assert int(first[b"bytes"]) == sum(len(v) for v in payload.values())
    assert len(first[b"sha256"]) == 64 and first[b"prefix"] == json.dumps(meta).encode()[:256]
    assert not any(k.startswith(b"orig:") for k in first)
    second = by_id[garbage]
    assert (
        second[b"reason"] == b"missing field 'meta'"
    )  # a field named "reason" cannot overwrite ours
    assert int(second[b"fields"]) == 2

    # Reading goes on: a record published after the bad ones arrives normally.
    t.queue.publish(t.keys.groups, make_group(3))
    assert [d.record.group_id for d in t.queue.read(t.keys.groups, GROUP, "sel-0", 10)] == ["g3"]


def test_dead_letters_of_huge_and_wide_records_stay_small(transport: Transport) -> None:
    t, client = transport, transport.client
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    client.xadd(t.keys.groups, {f"f{i}".encode(): b"x" for i in range(5000)})  # 5,000 fields
    client.xadd(t.keys.groups, {b"meta": b"{" + b"9" * (4 << 20)})  # 4 MB of broken meta
    assert t.queue.read(t.keys.groups, GROUP, "sel-0", count=10) == []
    dead = client.xrange(t.keys.dead)
    assert len(dead) == 2 and t.state.stats()["dead"] == 2
    assert int(dead[0][1][b"fields"]) == 5000
    assert int(dead[1][1][b"bytes"]) == (4 << 20) + 1
    assert client.memory_usage(t.keys.dead) < 64_000  # not a copy of 4 MB
    assert [r["reason"] for r in t.state.dead_letters()][::-1] == [
        dead[0][1][b"reason"].decode(),
        dead[1][1][b"reason"].decode(),
    ]


def test_an_entry_delivered_too_often_is_dead_lettered(transport: Transport) -> None:
    # A consumer that crashes on a record before committing it re-reads it after every restart;
    # past max_deliveries the record goes to the dead stream instead of crashing it again.
    t, client = transport, transport.client
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    t.queue.publish(t.keys.groups, make_group(0))
    assert len(t.queue.read(t.keys.groups, GROUP, "sel-0", count=10)) == 1  # delivery 1
    for _ in range(t.queue.max_deliveries - 1):  # deliveries 2..max: still handed out
        assert len(t.queue.read(t.keys.groups, GROUP, "sel-0", count=10, pending=True)) == 1
    assert t.queue.read(t.keys.groups, GROUP, "sel-0", count=10, pending=True) == []
    (entry,) = client.xrange(t.keys.dead)
    assert b"delivered 6 times without being committed" in entry[1][b"reason"]
    assert t.queue.backlog(t.keys.groups) == 0 and pending_ids(client, t.keys.groups) == []
    # Reclaiming counts too.
    t.queue.publish(t.keys.groups, make_group(1))
    t.queue.read(t.keys.groups, GROUP, "dead-consumer", count=10)
    for _ in range(t.queue.max_deliveries - 1):
        assert len(t.queue.reclaim(t.keys.groups, GROUP, "other", min_idle_ms=0, count=10)) == 1
    assert t.queue.reclaim(t.keys.groups, GROUP, "other", min_idle_ms=0, count=10) == []
    assert t.state.stats()["dead"] == 2


def test_committing_the_same_output_key_twice_writes_one_record(transport: Transport) -> None:
    t = transport
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    for i in range(2):
        t.queue.publish(t.keys.groups, make_group(i))
    first, second = t.queue.read(t.keys.groups, GROUP, "sel-0", count=2)
    batch = make_batch(7, ["g0"])
    out = [(t.keys.batches, batch.batch_id, batch)]

    r1 = t.queue.commit(
        t.keys.groups, GROUP, [first.entry_id], out, incr={"batches": 1}, consumer="sel-0"
    )
    r2 = t.queue.commit(
        t.keys.groups, GROUP, [second.entry_id], out, incr={"batches": 1}, consumer="sel-0"
    )
    assert r1.committed and r2.committed
    assert r2.written == {} and r2.duplicates == r1.written
    assert t.client.xlen(t.keys.batches) == 1
    assert t.state.stats()["batches"] == 1  # counters belong to the product, applied once
    assert t.queue.backlog(t.keys.groups) == 0  # but both inputs were consumed


def test_a_retried_commit_changes_nothing(transport: Transport) -> None:
    t = transport
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    t.queue.publish(t.keys.groups, make_group(0))
    (d,) = t.queue.read(t.keys.groups, GROUP, "sel-0", count=1)
    batch = make_batch(1, ["g0"])
    args = (t.keys.groups, GROUP, [d.entry_id], [(t.keys.batches, batch.batch_id, batch)])
    kwargs = {"incr": {"batches": 1}, "hset": {t.keys.schedule: {"step": 1}}, "consumer": "sel-0"}
    assert t.queue.commit(*args, **kwargs).committed
    t.client.hset(t.keys.schedule, "step", 2)  # later progress a replay must not undo

    again = t.queue.commit(*args, **kwargs)
    assert not again.committed and again.not_pending == [d.entry_id]
    assert t.client.xlen(t.keys.batches) == 1
    assert t.state.stats() == {"batches": 1}
    assert t.state.schedule()["step"] == "2"


def test_idempotent_publish(transport: Transport) -> None:
    t = transport
    g = make_group(0)
    first = t.queue.publish(t.keys.groups, g, incr={"published": 1}, key=g.group_id)
    again = t.queue.publish(t.keys.groups, g, incr={"published": 1}, key=g.group_id)
    assert first == again
    assert t.queue.backlog(t.keys.groups) == 1
    assert t.state.stats() == {"published": 1}


def test_dead_consumers_entries_are_reclaimed_by_another(transport: Transport) -> None:
    t, client = transport, transport.client
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    for i in range(3):
        t.queue.publish(t.keys.groups, make_group(i))
    taken = t.queue.read(t.keys.groups, GROUP, "crashed", count=3)  # ... and it never commits
    assert len(taken) == 3
    assert t.queue.read(t.keys.groups, GROUP, "alive", count=3) == []  # nothing new for others

    assert t.queue.reclaim(t.keys.groups, GROUP, "alive", min_idle_ms=60_000, count=10) == []
    time.sleep(0.06)
    got = t.queue.reclaim(t.keys.groups, GROUP, "alive", min_idle_ms=50, count=10)
    assert [d.entry_id for d in got] == [d.entry_id for d in taken]
    assert [d.record.group_id for d in got] == ["g0", "g1", "g2"]
    assert pending_ids(client, t.keys.groups, "alive") == [d.entry_id for d in taken]
    assert pending_ids(client, t.keys.groups, "crashed") == []

    # The crashed consumer comes back: its commit is fenced off, so nothing is duplicated.
    stale = t.queue.commit(
        t.keys.groups,
        GROUP,
        [d.entry_id for d in taken],
        [(t.keys.batches, "step-000001", make_batch(1, ["g0", "g1", "g2"]))],
        consumer="crashed",
    )
    assert not stale.committed and len(stale.not_pending) == 3
    assert t.client.xlen(t.keys.batches) == 0

    done = t.queue.commit(
        t.keys.groups,
        GROUP,
        [d.entry_id for d in got],
        [(t.keys.batches, "step-000001", make_batch(1, ["g0", "g1", "g2"]))],
        consumer="alive",
    )
    assert done.committed and t.queue.backlog(t.keys.groups) == 0
    assert t.client.xlen(t.keys.batches) == 1


def test_reclaim_dead_letters_malformed_pending_entries(transport: Transport) -> None:
    t, client = transport, transport.client
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    client.xadd(t.keys.groups, {b"meta": b"{}"})
    t.queue.publish(t.keys.groups, make_group(5))
    # A consumer took both raw and died before it could decode anything.
    client.xreadgroup(GROUP, "crashed", {t.keys.groups: ">"}, count=2)

    got = t.queue.reclaim(t.keys.groups, GROUP, "alive", min_idle_ms=0, count=10)
    assert [d.record.group_id for d in got] == ["g5"]
    assert t.state.stats()["dead"] == 1
    ((_, dead),) = client.xrange(t.keys.dead)
    assert dead[b"reason"] == b"meta has no schema version"
    assert t.queue.backlog(t.keys.groups) == 1


def test_restarted_consumer_rereads_its_own_pending_entries(transport: Transport) -> None:
    t = transport
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    t.queue.publish(t.keys.groups, make_group(0))
    (d,) = t.queue.read(t.keys.groups, GROUP, "sel-0", count=5)
    assert t.queue.read(t.keys.groups, GROUP, "sel-0", count=5) == []
    again = t.queue.read(t.keys.groups, GROUP, "sel-0", count=5, pending=True)
    assert [x.entry_id for x in again] == [d.entry_id]


def test_backlog_counts_unacknowledged_records(transport: Transport) -> None:
    t = transport
    assert t.queue.backlog(t.keys.groups) == 0  # no stream yet
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    for i in range(5):
        t.queue.publish(t.keys.groups, make_group(i))
    assert t.queue.backlog(t.keys.groups) == 5
    got = t.queue.read(t.keys.groups, GROUP, "c", count=2)
    assert t.queue.backlog(t.keys.groups) == 5
    t.queue.commit(t.keys.groups, GROUP, [d.entry_id for d in got], consumer="c")
    assert t.queue.backlog(t.keys.groups) == 3


def test_pause_flag(transport: Transport) -> None:
    t = transport
    assert not t.control.paused()
    t.control.set_paused(True)
    assert t.control.paused() and t.client.hget(t.keys.control, "paused") == b"1"
    t.control.set_paused(False)
    assert not t.control.paused()


def test_blocking_read_is_bounded(transport: Transport) -> None:
    t = transport
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    start = time.monotonic()
    assert t.queue.read(t.keys.groups, GROUP, "c", count=1, block_ms=150) == []
    assert 0.1 <= time.monotonic() - start < 2.0
    with pytest.raises(ValueError, match="socket timeout"):
        t.queue.read(t.keys.groups, GROUP, "c", count=1, block_ms=60_000)


def test_decoding_client_is_refused(redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses=False"):
        Transport.open(client, "ns")


def test_reclaim_clears_pending_entries_whose_record_was_deleted(transport: Transport) -> None:
    # Redis 6.2's XAUTOCLAIM reports such an entry as nil, without its id.
    t, client = transport, transport.client
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    gone = t.queue.publish(t.keys.groups, make_group(0))
    t.queue.publish(t.keys.groups, make_group(1))
    client.xreadgroup(GROUP, "crashed", {t.keys.groups: ">"}, count=2)
    client.xdel(t.keys.groups, gone)

    got = t.queue.reclaim(t.keys.groups, GROUP, "alive", min_idle_ms=0, count=10)
    assert [d.record.group_id for d in got] == ["g1"]
    assert pending_ids(client, t.keys.groups) == [got[0].entry_id]


def test_commit_of_more_entries_than_lua_can_unpack(transport: Transport) -> None:
    # Lua's unpack() stops near 8000 values; commit must chunk its XACK/XDEL.
    t, client = transport, transport.client
    t.queue.ensure_consumer_group(t.keys.groups, GROUP)
    pipe = client.pipeline(transaction=False)
    for _ in range(8200):
        pipe.xadd(t.keys.groups, {b"x": b"1"})
    pipe.execute()
    reply = client.xreadgroup(GROUP, "c", {t.keys.groups: ">"}, count=9000)
    ids = [entry_id.decode() for entry_id, _ in reply[0][1]]
    result = t.queue.commit(t.keys.groups, GROUP, ids, consumer="c")
    assert result.committed and result.acked == 8200
    assert t.queue.backlog(t.keys.groups) == 0

"""The books of a finished run, audited the same way by every end-to-end test.

Imported as ``from books import audit`` (pytest puts ``tests/e2e`` on ``sys.path``).
"""

from __future__ import annotations

from collections import Counter

import redis

from selector.curate import batch_id_for
from services.run.config import RunConfig
from services.transport.bundle import Transport
from services.transport.records import ScoredGroup, decode


def audit(client: redis.Redis, cfg: RunConfig) -> dict:
    """Check that the books of a finished run balance; returns the counts by category."""
    t = Transport.open(client, cfg.service.namespace)
    stats = t.state.stats()
    prefix = f"{t.keys.groups}|"
    written = {
        k.decode()[len(prefix) :]
        for k in client.hkeys(t.keys.produced)
        if k.decode().startswith(prefix)
    }
    assert len(written) == stats["groups_written"] > 0

    ledger = t.state.ledger()
    used = {g: v.removeprefix("used:") for g, v in ledger.items() if v.startswith("used:")}
    stale = {g for g, v in ledger.items() if v == "stale"}
    skipped = {g for g, v in ledger.items() if v.startswith("skipped:")}
    assert len(used) + len(stale) + len(skipped) == len(ledger), f"unknown ledger states {ledger}"
    queued = set()
    for _, fields in client.xrange(t.keys.groups, "-", "+"):
        rec = decode(fields)
        assert isinstance(rec, ScoredGroup)
        queued.add(rec.group_id)
    dead = client.xlen(t.keys.dead)
    assert dead == stats.get("dead", 0) == 0  # rollout actors write only valid records

    # Every written group is in exactly one category, and nothing else is anywhere.
    categories = [set(used), stale, skipped, queued]
    assert sum(len(c) for c in categories) == len(written)
    assert set().union(*categories) == written
    assert stats.get("groups_used", 0) == len(used)
    assert stats.get("groups_stale", 0) == len(stale)
    assert stats.get("groups_skipped", 0) == len(skipped)

    # Each used group is in exactly one batch, the one its ledger entry names.
    batch_groups = t.state.batch_groups()
    assert sorted(batch_groups) == [batch_id_for(s) for s in range(cfg.train.total_steps)]
    membership = Counter(g for ids in batch_groups.values() for g in ids)
    assert set(membership) == set(used) and set(membership.values()) == {1}
    for batch_id, ids in batch_groups.items():
        assert len(ids) == cfg.rollout.prompts_per_step
        assert all(used[g] == batch_id for g in ids)

    # Each batch was trained by exactly one learner step, in order, and none is left queued.
    trained = t.state.trained()
    assert trained == {batch_id_for(s): s for s in range(cfg.train.total_steps)}
    assert stats["batches_written"] == stats["batches_consumed"] == cfg.train.total_steps
    assert stats.get("batches_duplicate", 0) == 0
    assert stats["groups_trained"] == len(used)
    assert client.xlen(t.keys.batches) == 0

    # Weight versions rose by one per step, and reached every rollout actor in order.
    versions = t.state.published_versions()
    assert versions == list(range(cfg.train.total_steps + 1))
    loaded = {}
    for i in range(cfg.rollout.num_actors):
        name = f"rollout-{i}"
        seen = t.state.loaded_versions(name)
        # An actor may start after version 0 is gone; what it loads only ever moves forward.
        assert seen and seen == sorted(set(seen)), (name, seen)
        assert set(seen) <= set(versions)
        loaded[name] = seen
    assert 0 in set().union(*loaded.values())
    assert t.control.is_done()
    return {
        "used": len(used),
        "stale": len(stale),
        "skipped": len(skipped),
        "queued": len(queued),
        "loaded": loaded,
    }

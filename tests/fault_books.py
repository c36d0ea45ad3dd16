"""The books of a finished run, audited from its Redis by every end-to-end test: strictly for a
run without faults, and with ``faults=True`` for one that lost components on the way.

``audit`` checks that every group a rollout actor wrote is in exactly one place (used in exactly
one batch, dropped as stale, skipped, dropped by dynamic sampling, dead-lettered or still queued), that every batch was trained
by exactly one learner step, and that weight versions are consistent. With ``faults=True`` it
accepts what a run that lost components on the way legitimately shows: a batch delivered again
after a learner restart (acknowledged as a duplicate, never trained twice), a learner that
republished the versions after its checkpoint, a rollout actor that reloaded a version, and a
group dead-lettered after too many deliveries; the rest is as strict.

Imported as ``from fault_books import audit`` (``tests/`` is on ``sys.path`` through its
conftest).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import redis

from selector.curate import batch_id_for
from services.run.config import RunConfig
from services.transport.bundle import Transport
from services.transport.records import ScoredGroup, decode


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def dead_lettered_groups(client: redis.Redis, t: Transport, produced: dict[str, str]) -> set[str]:
    """Group ids of the dead letters whose source entry a rollout actor wrote
    (``produced``: entry id -> group id)."""
    found = set()
    for _, fields in client.xrange(t.keys.dead, "-", "+"):
        f = {_text(k): _text(v) for k, v in fields.items() if k in (b"source", b"entry_id")}
        if f.get("source") == t.keys.groups and f.get("entry_id") in produced:
            found.add(produced[f["entry_id"]])
    return found


def check_versions(versions: list[int], total: int, checkpointed: set[int], faults: bool) -> None:
    """Published weight versions: 0..total in order; after a learner restart the sequence may
    step back to a checkpointed step (or 0) and climb again by one, never skipping one."""
    if not faults:
        assert versions == list(range(total + 1)), versions
        return
    assert versions and versions[0] == 0 and versions[-1] == total, versions
    for i in range(1, len(versions)):
        prev, cur = versions[i - 1], versions[i]
        if cur != prev + 1:
            assert cur <= prev and cur in checkpointed | {0}, (prev, cur, versions)
    assert set(versions) == set(range(total + 1)), versions


def audit(client: redis.Redis, cfg: RunConfig, *, faults: bool = False, hostile: int = 0) -> dict:
    """Check that the books of a finished run balance; returns the counts by category.

    ``hostile``: records written straight to the groups stream by a test (not by a rollout
    actor), all of which must have been dead-lettered.
    """
    t = Transport.open(client, cfg.service.namespace)
    stats = t.state.stats()
    prefix = f"{t.keys.groups}|"
    produced = {
        _text(v): _text(k)[len(prefix) :]
        for k, v in client.hgetall(t.keys.produced).items()
        if _text(k).startswith(prefix)
    }
    written = set(produced.values())
    assert len(written) == stats["groups_written"] > 0

    ledger = t.state.ledger()
    used = {g: v.removeprefix("used:") for g, v in ledger.items() if v.startswith("used:")}
    stale = {g for g, v in ledger.items() if v == "stale"}
    skipped = {g for g, v in ledger.items() if v.startswith("skipped:")}
    # Zero-variance groups dynamic sampling dropped while filling the batch the state names.
    filtered = {
        g: v.removeprefix("filtered:") for g, v in ledger.items() if v.startswith("filtered:")
    }
    assert len(used) + len(stale) + len(skipped) + len(filtered) == len(ledger), (
        f"unknown ledger states {ledger}"
    )
    queued = set()
    for _, fields in client.xrange(t.keys.groups, "-", "+"):
        rec = decode(fields)
        assert isinstance(rec, ScoredGroup)
        queued.add(rec.group_id)
    dead_total = client.xlen(t.keys.dead)
    assert dead_total == stats.get("dead", 0)
    dead = dead_lettered_groups(client, t, produced)
    if not faults:
        assert not dead, f"groups of rollout actors dead-lettered: {dead}"
    # Every dead letter is a hostile record or a written group: nothing else is dead.
    assert dead_total == len(dead) + hostile, (dead_total, len(dead), hostile)

    # Every written group is in exactly one category, and nothing else is anywhere.
    categories = [set(used), stale, skipped, set(filtered), queued & written, dead]
    assert sum(len(c) for c in categories) == len(written), [len(c) for c in categories]
    assert set().union(*categories) == written
    assert queued <= written, "a record nobody wrote is still queued"
    assert stats.get("groups_used", 0) == len(used)
    assert stats.get("groups_stale", 0) == len(stale)
    assert stats.get("groups_skipped", 0) == len(skipped)
    assert stats.get("groups_filtered", 0) == len(filtered)
    assert set(filtered.values()) <= {batch_id_for(s) for s in range(cfg.train.total_steps)}
    if not cfg.algorithm.dynamic_sampling.enabled:
        assert not filtered, "groups dropped as zero-variance without dynamic sampling"

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
    assert stats["batches_written"] == cfg.train.total_steps
    assert stats["batches_consumed"] == cfg.train.total_steps
    duplicates = stats.get("batches_duplicate", 0)
    if not faults:
        assert duplicates == 0
        assert stats["groups_trained"] == len(used)
    assert client.xlen(t.keys.batches) == 0

    # Weight versions rose by one per step, and reached every rollout actor in order.
    versions = t.state.published_versions()
    checkpointed = {int(c["step"]) for c in t.state.checkpoints() if "step" in c}
    # A checkpoint written to disk whose record died with Redis (killed between the two) is
    # still one a restarted learner resumes from and republishes.
    on_disk = Path(cfg.train.run_dir) / "checkpoints"
    checkpointed |= {int(p.name[len("step") :]) for p in on_disk.glob("step[0-9]*") if p.is_dir()}
    check_versions(versions, cfg.train.total_steps, checkpointed, faults)
    loaded = {}
    for i in range(cfg.rollout.num_actors):
        name = f"rollout-{i}"
        seen = t.state.loaded_versions(name)
        assert seen and set(seen) <= set(versions), (name, seen)
        if not faults:
            # An actor may start after version 0 is gone; what it loads only ever moves forward.
            assert seen == sorted(set(seen)), (name, seen)
        loaded[name] = seen
    assert 0 in set().union(*loaded.values())
    assert t.control.is_done()
    return {
        "used": len(used),
        "stale": len(stale),
        "skipped": len(skipped),
        "filtered": len(filtered),
        "queued": len(queued & written),
        "dead": len(dead),
        "written": len(written),
        "batches_duplicate": duplicates,
        "loaded": loaded,
    }


def balance(client: redis.Redis, cfg: RunConfig) -> dict[str, int]:
    """The headline figures of a run's books, counted without asserting (for a report):
    groups written, groups in no category (lost), groups in more than one place or batch
    (duplicated), batches trained more than once or never (as ``trained_twice`` / ``skipped``).
    """
    t = Transport.open(client, cfg.service.namespace)
    prefix = f"{t.keys.groups}|"
    produced = {
        _text(v): _text(k)[len(prefix) :]
        for k, v in client.hgetall(t.keys.produced).items()
        if _text(k).startswith(prefix)
    }
    written = set(produced.values())
    places: Counter[str] = Counter()
    for ids in t.state.batch_groups().values():
        places.update(ids)
    places.update(g for g, v in t.state.ledger().items() if not v.startswith("used:"))
    queued = set()
    for _, fields in client.xrange(t.keys.groups, "-", "+"):
        rec = decode(fields)
        if isinstance(rec, ScoredGroup):
            queued.add(rec.group_id)
    places.update(queued)
    places.update(dead_lettered_groups(client, t, produced))
    trained = t.state.trained()
    expected = {batch_id_for(s): s for s in range(cfg.train.total_steps)}
    return {
        "written": len(written),
        "lost": len(written - set(places)),
        "duplicated": sum(1 for g, n in places.items() if n > 1),
        "stale": int(t.state.counter("groups_stale")),
        "batches_trained_twice": len(trained) - len(set(trained)),  # hash keys: 0 by construction
        "batches_skipped": len(set(expected) - set(trained)),
        "batches_wrong_step": sum(1 for b, s in trained.items() if expected.get(b) != s),
    }

"""The run's state in Redis outside the streams: schedule, counters, metrics, ledgers, versions.

Components read and write run state only through :class:`RunState`, so every key access is
here and in :mod:`services.transport.queue` (whose atomic commit writes state together with
stream entries).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis

from services.transport.keys import RunKeys
from services.transport.values import hash_value, text

# Admission and reservation in one step, so two actors that look at the same queue cannot both
# count themselves first. KEYS: schedule hash, groups stream, in-flight hash.
# ARGV: actor, its round's groups, its weights version, max_staleness, groups per step, reserve.
_ADMIT_LUA = """
local step = tonumber(redis.call('HGET', KEYS[1], 'step') or '0')
local ahead = redis.call('XLEN', KEYS[2])
local inflight = redis.call('HGETALL', KEYS[3])
for i = 1, #inflight, 2 do
  if inflight[i] ~= ARGV[1] then ahead = ahead + tonumber(inflight[i + 1]) end
end
local share = tonumber(ARGV[2])
local used_at = step + math.floor((ahead + share - 1) / tonumber(ARGV[5]))
if tonumber(ARGV[3]) < used_at - tonumber(ARGV[4]) then return 0 end
if ARGV[6] == '1' then redis.call('HSET', KEYS[3], ARGV[1], share) end
return 1
"""


class RunState:
    """Reads and plain writes of one run's hashes and lists."""

    def __init__(self, client: redis.Redis, keys: RunKeys) -> None:
        self.client = client
        self.keys = keys
        self._admit_script = client.register_script(_ADMIT_LUA)

    # ---- hashes as dicts -----------------------------------------------------------------------

    def _hash(self, key: str) -> dict[str, str]:
        return {text(k): text(v) for k, v in self.client.hgetall(key).items()}

    def schedule(self) -> dict[str, str]:
        """The schedule hash: ``step`` (next batch), ``progress``, ratios, ``preset``."""
        return self._hash(self.keys.schedule)

    def schedule_step(self) -> int | None:
        """The step the selector builds next, or None before it wrote a schedule."""
        raw = self.client.hget(self.keys.schedule, "step")
        return int(raw) if raw is not None else None

    def write_schedule(self, fields: Mapping[str, Any]) -> None:
        self.client.hset(self.keys.schedule, mapping={k: hash_value(v) for k, v in fields.items()})

    def metrics(self) -> dict[str, str]:
        """The latest value of each metric, as stored (str)."""
        return self._hash(self.keys.metrics)

    def numeric_metrics(self) -> dict[str, float]:
        """The metrics that parse as floats."""
        row: dict[str, float] = {}
        for name, raw in self.metrics().items():
            try:
                row[name] = float(raw)
            except ValueError:
                continue
        return row

    def set_metrics(self, fields: Mapping[str, Any]) -> None:
        if fields:
            self.client.hset(
                self.keys.metrics, mapping={k: hash_value(v) for k, v in fields.items()}
            )

    def stats(self) -> dict[str, int]:
        """The run's integer counters."""
        return {text(k): int(v) for k, v in self.client.hgetall(self.keys.stats).items()}

    def counter(self, name: str) -> int:
        return int(self.client.hget(self.keys.stats, name) or 0)

    # ---- ledgers -------------------------------------------------------------------------------

    def ledger_states(self, group_ids: list[str]) -> list[str | None]:
        """The ledger state of each group id (None: never accounted for)."""
        if not group_ids:
            return []
        return [
            None if v is None else text(v) for v in self.client.hmget(self.keys.ledger, group_ids)
        ]

    def ledger(self) -> dict[str, str]:
        return self._hash(self.keys.ledger)

    def batch_groups(self) -> dict[str, list[str]]:
        return {k: json.loads(v) for k, v in self._hash(self.keys.batch_groups).items()}

    def trained(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._hash(self.keys.trained).items()}

    def record_orphans(self, states: Mapping[str, str], count: int) -> None:
        """Ledger states written outside an atomic commit (a batch another selector wrote)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.ledger, mapping=dict(states))
        pipe.hincrby(self.keys.stats, "groups_orphaned", count)
        pipe.execute()

    # ---- weight versions -----------------------------------------------------------------------

    def record_published_version(self, version: int) -> None:
        """The learner published ``version`` (audit trail plus the live ``learner_version``)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(self.keys.weight_versions, version)
        pipe.hset(self.keys.metrics, "learner_version", version)
        pipe.execute()

    def published_versions(self) -> list[int]:
        return [int(v) for v in self.client.lrange(self.keys.weight_versions, 0, -1)]

    def record_loaded_version(self, actor: str, version: int) -> None:
        self.client.rpush(self.keys.loaded_versions(actor), version)

    def loaded_versions(self, actor: str) -> list[int]:
        return [int(v) for v in self.client.lrange(self.keys.loaded_versions(actor), 0, -1)]

    def record_engine_digest(self, actor: str, version: int, digest: str) -> None:
        self.client.hset(self.keys.engine_digests(actor), str(version), digest)

    def engine_digests(self, actor: str) -> dict[int, str]:
        raw = self.client.hgetall(self.keys.engine_digests(actor))
        return {int(k): v.decode() if isinstance(v, bytes) else v for k, v in raw.items()}

    # ---- rollout actors ------------------------------------------------------------------------

    def rollout_rounds(self, actor: str) -> int:
        return int(self.client.hget(self.keys.rollout_rounds, actor) or 0)

    def set_rollout_rounds(self, actor: str, rounds: int) -> None:
        self.client.hset(self.keys.rollout_rounds, actor, rounds)

    def admit_round(
        self,
        actor: str,
        groups: int,
        version: int,
        max_staleness: int,
        groups_per_step: int,
        *,
        reserve: bool = True,
    ) -> bool:
        """Whether a round of ``groups`` generated now with weights ``version`` can still be
        trained within ``max_staleness`` (version-aware admission, bounded off-policyness); when
        it can and ``reserve``, the round is recorded as in flight for ``actor`` in the same
        atomic step.

        The selector builds step S next; the queued groups and the rounds other actors have in
        flight (Q in all) are used before this round, so its last group is used at step
        S + (Q + groups - 1) // groups_per_step at the earliest; it is fresh if ``version`` is at
        least that step minus ``max_staleness``. Groups that will be dropped still count, which
        errs towards waiting.
        """
        return bool(
            self._admit_script(
                keys=[self.keys.schedule, self.keys.groups, self.keys.rollout_inflight],
                args=[actor, groups, version, max_staleness, groups_per_step, int(reserve)],
            )
        )

    def end_round(self, actor: str) -> None:
        """``actor`` has no round in flight (its groups are published, or it just started)."""
        self.client.hdel(self.keys.rollout_inflight, actor)

    def rounds_in_flight(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._hash(self.keys.rollout_inflight).items()}

    def record_heartbeat(self, actor: str, fields: Mapping[str, Any]) -> None:
        """A rollout actor's latest report (weight version, groups published, ...) stamped with
        the wall time it was written."""
        self.client.hset(self.keys.actors, actor, json.dumps({**fields, "time": time.time()}))

    def heartbeats(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self._hash(self.keys.actors).items()}

    def claim_schedule_horizon(self, horizon: int) -> int:
        """The run's schedule horizon: ``horizon`` if this is the first claim (the run's first
        start), else the one stored then (a resumed or restarted component keeps it)."""
        self.client.set(self.keys.schedule_horizon, int(horizon), nx=True)
        return int(self.client.get(self.keys.schedule_horizon))

    # ---- pre-rollout prompt selection (rollout.prefilter) --------------------------------------

    def prefilter_streaks(self, prompt_ids: list[str]) -> list[tuple[str, int] | None]:
        """Each prompt's zero-variance streak as (kind, count), kind ``easy`` | ``hard``; None:
        no streak (never seen, or its last group had signal)."""
        if not prompt_ids:
            return []
        out: list[tuple[str, int] | None] = []
        for raw in self.client.hmget(self.keys.prefilter_streaks, prompt_ids):
            if raw is None:
                out.append(None)
            else:
                kind, count = text(raw).split(":")
                out.append((kind, int(count)))
        return out

    def record_prefilter_streaks(self, streaks: Mapping[str, tuple[str, int] | None]) -> None:
        """Set each prompt's streak; None clears it (the prompt's last group had signal)."""
        live = {pid: f"{s[0]}:{s[1]}" for pid, s in streaks.items() if s is not None}
        cleared = [pid for pid, s in streaks.items() if s is None]
        pipe = self.client.pipeline(transaction=True)
        if live:
            pipe.hset(self.keys.prefilter_streaks, mapping=live)
        if cleared:
            pipe.hdel(self.keys.prefilter_streaks, *cleared)
        pipe.execute()

    def prefilter_p(self) -> dict[str, float]:
        """The adaptive p of each kind written so far (``easy``, ``hard``; absent: never)."""
        return {k: float(v) for k, v in self._hash(self.keys.prefilter_p).items()}

    def advance_prefilter(
        self,
        step: int,
        counts: Mapping[str, int],
        adapt: Callable[[dict[str, float], dict[str, int]], Mapping[str, float]],
    ) -> dict[str, float]:
        """Add a round's ``counts`` to those of learner step ``step`` and return the p's.

        The counts of one step are summed over every actor's rounds. The first call for a later
        step closes the counted one: the p's become ``adapt(p, its counts)``, once, whichever
        actor gets there first (the read-modify-write is optimistic over both hashes, retried
        when another actor changed them in between). A round of an earlier step than the one
        counted (an actor still on older weights) adds to the current step's counts.
        """
        p_key, c_key = self.keys.prefilter_p, self.keys.prefilter_counts
        out: dict[str, float] = {}

        def apply(pipe: redis.client.Pipeline) -> None:
            p = {text(k): float(v) for k, v in pipe.hgetall(p_key).items()}
            bucket = {text(k): int(v) for k, v in pipe.hgetall(c_key).items()}
            counted = bucket.pop("step", None)
            adapted: Mapping[str, float] = {}
            if counted is None or step > counted:
                if counted is not None and bucket.get("groups", 0) > 0:
                    adapted = adapt(dict(p), dict(bucket))
                bucket, counted = {}, step
            for k, v in counts.items():
                bucket[k] = bucket.get(k, 0) + int(v)
            pipe.multi()
            pipe.delete(c_key)  # a new step's counts replace the old step's fields
            pipe.hset(c_key, mapping={"step": counted, **bucket})
            if adapted:
                pipe.hset(p_key, mapping={k: hash_value(v) for k, v in adapted.items()})
            out.clear()
            out.update({**p, **adapted})

        self.client.transaction(apply, p_key, c_key)
        return dict(out)

    # ---- per-step history, checkpoints, config -------------------------------------------------

    def record_step(self, step: int, row: Mapping[str, Any]) -> None:
        """The metric row of ``step`` (a replayed step overwrites its earlier row)."""
        finite = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        self.client.hset(self.keys.history, str(step), json.dumps({"step": step, **finite}))

    def merge_step(self, step: int, fields: Mapping[str, Any]) -> None:
        """Add ``fields`` to the row of ``step`` (an evaluation that finished after the step's
        row was written; the learner is the only writer, so read-then-write is safe)."""
        raw = self.client.hget(self.keys.history, str(step))
        row = json.loads(raw) if raw is not None else {"step": step}
        row.update({k: float(v) for k, v in fields.items() if isinstance(v, (int, float))})
        self.client.hset(self.keys.history, str(step), json.dumps(row))

    def history(self, since_step: int = 0, limit: int = 1000) -> list[dict[str, float]]:
        """Step rows with step >= ``since_step``, in step order, at most ``limit``."""
        steps = sorted(int(s) for s in self.client.hkeys(self.keys.history))
        wanted = [s for s in steps if s >= since_step][:limit]
        if not wanted:
            return []
        rows = self.client.hmget(self.keys.history, [str(s) for s in wanted])
        return [json.loads(r) for r in rows if r is not None]

    def record_checkpoint(self, step: int, path: str) -> None:
        self.client.hset(
            self.keys.checkpoints,
            str(step),
            json.dumps({"step": step, "path": path, "time": time.time()}),
        )

    def checkpoints(self) -> list[dict[str, Any]]:
        rows = [json.loads(v) for v in self._hash(self.keys.checkpoints).values()]
        return sorted(rows, key=lambda r: r["step"])

    def set_config(self, config_json: str) -> None:
        """The run's config (already redacted by the caller)."""
        self.client.set(self.keys.config, config_json)

    def config(self) -> dict[str, Any] | None:
        raw = self.client.get(self.keys.config)
        return json.loads(raw) if raw is not None else None

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead letters, newest first: reason, source stream and entry id, and the
        payload's field count, size, hash and prefix."""
        rows = self.client.xrevrange(self.keys.dead, "+", "-", count=count)
        out = []
        for entry_id, fields in rows:
            meta = {text(k): text(v) for k, v in fields.items()}
            out.append({"id": text(entry_id), **meta})
        return out

    # ---- the learner's replay stream -----------------------------------------------------------

    def replay_entries(self) -> list[tuple[str, dict[Any, Any]]]:
        """(entry id, fields) of every batch in the replay stream, oldest first."""
        return [(text(i), f) for i, f in self.client.xrange(self.keys.replay, "-", "+")]

    def trim_replay(self, through_id: str) -> None:
        """Drop replay entries up to and including ``through_id`` (a checkpoint covers them)."""
        ms, seq = through_id.split("-")
        self.client.xtrim(self.keys.replay, minid=f"{ms}-{int(seq) + 1}", approximate=False)

    def delete_run(self, extra: Iterable[str] = ()) -> int:
        """Delete every key of the run (tests and fresh starts); returns how many."""
        names = list(self.client.scan_iter(match=self.keys.pattern)) + list(extra)
        return int(self.client.delete(*names)) if names else 0

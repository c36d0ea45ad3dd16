"""The atomic commit of the run's streams: one Lua script that checks, writes, acknowledges and
counts in one step, so a crash or a retry can neither lose nor duplicate a product.

In order, inside the script: every consumed entry must still be pending for the consumer
(fencing: one whose entries were reclaimed by another cannot also publish a product); each
output is written unless its idempotency key was produced on that stream before; the consumed
entries are acknowledged and deleted; counters and hash fields are applied, unless every output
already existed (they were applied by the commit that wrote them). :class:`CommitScript` encodes
one call; :class:`~services.transport.queue.StreamQueue` is what the components use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from services.transport.values import hash_value, pairs, text

__all__ = ["CommitResult", "CommitScript", "EncodedOutput"]

EncodedOutput = tuple[str, str, Mapping[bytes, bytes]]  # (stream, idempotency key, fields)

# KEYS: [1] consumed stream, [2] produced hash, [3] stats hash,
#       [4 .. 3+n_out] output streams, then one key per HSET target.
# ARGV: group, consumer ('' = any), n_ids, ids...,
#       n_out, per output: idempotency key, n_pairs, field, value, ...,
#       n_incr, field, amount, ..., n_hset, per target: n_pairs, field, value, ...
# Returns {committed (0/1), not_pending ids, written {key, id, ...}, duplicates {key, id, ...},
#          acked count}.
_COMMIT_LUA = """
local pos = 1
local function nxt()
  local v = ARGV[pos]
  pos = pos + 1
  return v
end
local stream, produced, stats = KEYS[1], KEYS[2], KEYS[3]
local group, consumer = nxt(), nxt()
local n_ids = tonumber(nxt())
local ids = {}
for j = 1, n_ids do ids[j] = nxt() end

-- Fencing, before any write: every consumed entry must still be pending for this consumer.
local not_pending = {}
for _, id in ipairs(ids) do
  local p
  if consumer == '' then
    p = redis.call('XPENDING', stream, group, id, id, 1)
  else
    p = redis.call('XPENDING', stream, group, id, id, 1, consumer)
  end
  if #p == 0 then table.insert(not_pending, id) end
end
if #not_pending > 0 then return {0, not_pending, {}, {}, 0} end

local n_out = tonumber(nxt())
local written, dups = {}, {}
for o = 1, n_out do
  local out = KEYS[3 + o]
  local key = nxt()
  local n_pairs = tonumber(nxt())
  local args = {}
  for j = 1, 2 * n_pairs do args[j] = nxt() end
  local tag = out .. '|' .. key
  local earlier = redis.call('HGET', produced, tag)
  if earlier then
    table.insert(dups, key)
    table.insert(dups, earlier)
  else
    local id = redis.call('XADD', out, '*', unpack(args))
    redis.call('HSET', produced, tag, id)
    table.insert(written, key)
    table.insert(written, id)
  end
end

-- In chunks: Lua's unpack() fails past a few thousand values.
local acked = 0
for first = 1, n_ids, 1000 do
  local last = math.min(first + 999, n_ids)
  acked = acked + redis.call('XACK', stream, group, unpack(ids, first, last))
  redis.call('XDEL', stream, unpack(ids, first, last))
end

-- Counters and fields belong to the product: a commit whose every output already existed
-- applied them the first time.
local effects = (n_out == 0) or (#written > 0)
local n_incr = tonumber(nxt())
for j = 1, n_incr do
  local f, amount = nxt(), nxt()
  if effects then redis.call('HINCRBY', stats, f, amount) end
end
local n_hset = tonumber(nxt())
for h = 1, n_hset do
  local n_pairs = tonumber(nxt())
  local args = {}
  for j = 1, 2 * n_pairs do args[j] = nxt() end
  if effects and n_pairs > 0 then
    redis.call('HSET', KEYS[3 + n_out + h], unpack(args))
  end
end
return {1, {}, written, dups, acked}
"""


@dataclass(frozen=True)
class CommitResult:
    """What :meth:`~services.transport.queue.StreamQueue.commit` did.

    ``committed`` is False only when some consumed entry was no longer pending for the consumer
    (``not_pending``): it was reclaimed by another consumer or already committed. Then nothing
    was written, acknowledged or counted, and the caller should drop its work on those entries.
    """

    committed: bool
    written: dict[str, str] = field(default_factory=dict)  # idempotency key -> new entry id
    duplicates: dict[str, str] = field(default_factory=dict)  # key -> entry id written earlier
    acked: int = 0
    not_pending: list[str] = field(default_factory=list)


class CommitScript:
    """The commit script registered on ``client``; idempotency keys go to the hash ``produced``,
    counters to the hash ``stats``."""

    def __init__(self, client: redis.Redis, produced: str, stats: str) -> None:
        self.produced = produced
        self.stats = stats
        self._script = client.register_script(_COMMIT_LUA)

    def __call__(
        self,
        stream: str,
        group: str,
        consumer: str | None,
        entry_ids: Sequence[str],
        outputs: Sequence[EncodedOutput],
        incr: Mapping[str, int] | None,
        hset: Mapping[str, Mapping[str, str | int | float]] | None,
    ) -> CommitResult:
        if entry_ids and not group:
            raise ValueError("commit with entry ids needs the consumer group")
        keys: list[str] = [stream, self.produced, self.stats]
        args: list[Any] = [group, consumer or "", len(entry_ids), *entry_ids, len(outputs)]
        for out, key, fields in outputs:
            keys.append(out)
            args += [key, len(fields)]
            for name, value in fields.items():
                args += [name, value]
        incr = incr or {}
        args.append(len(incr))
        for name, amount in incr.items():
            args += [name, int(amount)]
        hset = hset or {}
        args.append(len(hset))
        for hkey, mapping in hset.items():
            keys.append(hkey)
            args.append(len(mapping))
            for name, value in mapping.items():
                args += [name, hash_value(value)]
        committed, not_pending, written, dups, acked = self._script(keys=keys, args=args)
        return CommitResult(
            committed=bool(committed),
            written=pairs(written),
            duplicates=pairs(dups),
            acked=int(acked),
            not_pending=[text(x) for x in not_pending],
        )

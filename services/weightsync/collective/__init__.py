"""Bucketed broadcast from learner rank 0 into every rollout engine over a process group of
their own (NCCL on GPU, gloo on CPU), separate from the learner's training group.

Per version the publisher sends a small header (version, sequence number, the bucket layout,
aliases), then per *bucket* one broadcast of its flat buffer (many tensors of one wire dtype,
about ``bucket_mb``) and one of its 32-byte digest (the sampled checksum's part for the bucket's
tensors), then a trailer with the version's sampled checksum. bf16 models travel as bf16
(``wire_dtype: auto``). The broadcast is sent from the device the learner's tensors are on.

Neither side ever holds a second copy of the model. The publisher packs into a ring of two
bucket buffers (a ZeRO-3 learner gathers, packs and releases one bucket at a time; a one-tensor
bucket of a plain tensor is sent as is), with at most two buckets in flight. A receiver receives
into a pool of two bucket buffers (double-buffered: the next bucket arrives while this one
loads), checks each bucket against its digest and loads it into its model (or, inside a vLLM
worker, into vLLM's model) before the buffer is reused. The extra memory per side is therefore
about 2 x max(``bucket_mb``, the largest tensor), whatever the model's size. A version that fails
after its first bucket loaded leaves the engine *dirty* (:attr:`WeightReceiver.dirty`): it must
not generate until it restored itself from the catch-up files or loaded the next version whole.

Rendezvous and membership go through a TCP store that rank 0 serves (``host:port``):

- An engine *joins* by name (``rollout-3``); a join with a name already in the group replaces the
  old member, which is how a restarted engine takes its own place back.
- Groups are re-formed only at a publish, as a new *generation* ``g`` (store prefix ``g{g}/``)
  when someone joined, left, or fell silent for ``member_timeout_s`` (engines bump a heartbeat
  counter each time they poll; rank 0 times it with its own clock, so no clocks need agree).
- Every publish gets a sequence number ``s`` and a record ``seq/{s}`` naming its generation;
  receivers walk the records in order, so one that is a few versions behind receives them all
  on the right group and loads the newest.

Late joiners (chosen design): an engine that starts late or restarts first loads the newest
version from the *catch-up* files (``weight_sync.path``, written by rank 0 every
``catchup_every`` versions), so it can generate at once; its join request makes the next publish
form a new generation that includes it, and from then on it receives by broadcast. With
``catchup_every: 0`` a late engine waits for the next publish instead. The catch-up write is off
the broadcast's path: it starts once the trailer is sent (the engines already hold the version),
gathers the buckets again and copies each into one of two host staging buffers, which a
background thread streams into the file; ``publish`` returns once the last bucket is copied out
(the learner's next step may change its tensors), so the learner pays about the write's time
every ``catchup_every`` versions and never holds a host copy of the model.

A failed broadcast (a member died mid-transfer) drops the group: rank 0 writes that version to
the catch-up files, every live engine re-joins (an engine the failure left dirty restores itself
from those files), and the next publish forms a group without the dead one; the run does not
stop. Only a checksum mismatch stops it.

A publish blocks until every member of the group has called :meth:`receive` (a collective has no
other way): engines poll between generations, so the learner waits at most one generation.

The modules: :mod:`~services.weightsync.collective.group` (the rendezvous store, generations and
membership), :mod:`~services.weightsync.collective.buckets` (the bucket layout and packing),
:mod:`~services.weightsync.collective.publisher`, :mod:`~services.weightsync.collective.receiver`
and :mod:`~services.weightsync.collective.catchup` (rank 0's catch-up files).
"""

from services.weightsync.collective.group import parse_address
from services.weightsync.collective.publisher import CollectivePublisher
from services.weightsync.collective.receiver import CollectiveReceiver

__all__ = ["CollectivePublisher", "CollectiveReceiver", "parse_address"]

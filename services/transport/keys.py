"""Every Redis key of a run, in one place.

All keys of a run share its namespace prefix ``{ns}:``, so runs sharing a Redis never see each
other and a run can be inspected or deleted with one pattern (``{ns}:*``). docs/architecture.md
lists what each key holds and who writes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class RunKeys:
    """The key names of the run ``namespace``."""

    namespace: str

    def __post_init__(self) -> None:
        if not _NAMESPACE.match(self.namespace or ""):
            raise ValueError(
                f"namespace: {self.namespace!r} must be non-empty letters, digits, '_', '.', '-'"
            )

    def _key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    # ---- streams ---------------------------------------------------------------------------------

    @property
    def groups(self) -> str:
        """Stream of scored groups, rollout actors -> selector (consumer group ``selector``)."""
        return self._key("groups")

    @property
    def batches(self) -> str:
        """Stream of curated batches, selector -> learner (consumer group ``learner``)."""
        return self._key("batches")

    @property
    def dead(self) -> str:
        """Stream of dead letters: records no consumer could use, with the reason."""
        return self._key("dead")

    @property
    def replay(self) -> str:
        """Stream of the batches trained since the learner's last checkpoint."""
        return self._key("replay")

    # ---- hashes and lists --------------------------------------------------------------------

    @property
    def schedule(self) -> str:
        """Hash: the step the selector builds next, its progress, ratios and preset."""
        return self._key("schedule")

    @property
    def stats(self) -> str:
        """Hash of integer counters (groups written, used, stale, dead, batches, ...)."""
        return self._key("stats")

    @property
    def metrics(self) -> str:
        """Hash of the latest value of each learner and rollout metric."""
        return self._key("metrics")

    @property
    def control(self) -> str:
        """Hash of run flags: ``paused``, ``stop`` + ``stop_reason``, ``done``."""
        return self._key("control")

    @property
    def produced(self) -> str:
        """Hash ``<stream>|<idempotency key>`` -> entry id of every record a commit wrote."""
        return self._key("produced")

    @property
    def ledger(self) -> str:
        """Hash group id -> ``used:<batch>`` | ``stale`` | ``skipped:<batch>`` | ``orphaned:<batch>``."""
        return self._key("ledger")

    @property
    def batch_groups(self) -> str:
        """Hash batch id -> JSON list of the group ids the batch was built from."""
        return self._key("batch_groups")

    @property
    def trained(self) -> str:
        """Hash batch id -> the learner step that trained it."""
        return self._key("trained")

    @property
    def weight_versions(self) -> str:
        """List of every weight version the learner published, in order."""
        return self._key("weight_versions")

    @property
    def rollout_rounds(self) -> str:
        """Hash actor name -> rounds generated (a restarted actor never reuses a seed)."""
        return self._key("rollout_rounds")

    @property
    def rollout_inflight(self) -> str:
        """Hash actor name -> groups of the round it is generating now (version-aware admission
        counts other actors' rounds in flight as queued ahead)."""
        return self._key("rollout_inflight")

    @property
    def actors(self) -> str:
        """Hash actor name -> JSON heartbeat (weight version, groups published, time)."""
        return self._key("actors")

    @property
    def history(self) -> str:
        """Hash step -> JSON of that step's metric row (what the API serves as history)."""
        return self._key("history")

    @property
    def checkpoints(self) -> str:
        """Hash step -> JSON of a saved checkpoint (path, time)."""
        return self._key("checkpoints")

    @property
    def config(self) -> str:
        """String: the run's config as JSON, secrets redacted."""
        return self._key("config")

    @property
    def schedule_horizon(self) -> str:
        """String: the step at which the run's schedules (keep ratios, learning rate) reach
        their final values, set by the first component to start and kept on every resume."""
        return self._key("schedule_horizon")

    @property
    def prefilter_streaks(self) -> str:
        """Hash prompt id -> ``easy:<n>`` | ``hard:<n>``: the prompt's last ``n`` groups in a row
        were all right (easy) or all wrong (hard); a prompt whose last group had signal has no
        field (pre-rollout prompt selection, ``rollout.prefilter``)."""
        return self._key("prefilter:streaks")

    @property
    def prefilter_p(self) -> str:
        """Hash ``easy`` | ``hard`` -> the adaptive base p of the skip probability 1 - max(p^n,
        floor) for prompts of that kind (absent: ``rollout.prefilter.p_init``)."""
        return self._key("prefilter:p")

    @property
    def prefilter_counts(self) -> str:
        """Hash ``step`` -> the learner step whose rounds are being counted, and ``groups`` |
        ``easy`` | ``hard`` -> the groups generated at that step, by every actor, and how many
        were all right and all wrong: the p's adapt once from them when a later step begins."""
        return self._key("prefilter:counts")

    @property
    def weight_rendezvous(self) -> str:
        """String: ``host:port`` of the collective weight transport's rendezvous store, set by
        learner rank 0 when it starts publishing."""
        return self._key("weightsync:rendezvous")

    def loaded_versions(self, actor: str) -> str:
        """List of the weight versions rollout actor ``actor`` loaded, in order."""
        return self._key(f"rollout:{actor}:versions")

    def engine_digests(self, actor: str) -> str:
        """Hash of ``version -> sha256`` of rollout actor ``actor``'s live engine parameters
        after it loaded that version (written only when ``weight_sync.engine_digest`` is on)."""
        return self._key(f"rollout:{actor}:digests")

    @property
    def pattern(self) -> str:
        """A SCAN/KEYS pattern matching every key of the run."""
        return self._key("*")

"""Pre-rollout prompt selection (GRESO, arXiv 2506.02177): skip prompts whose groups are
predicted to carry no advantage before generating them.

A group whose G rewards are all equal has zero advantage variance: the selector throws it away,
and generating it was wasted. Such prompts tend to stay that way for a while, so a prompt whose
last ``n`` groups in a row were all right ("easy") or all wrong ("hard") is skipped when drawn
with probability ``1 - max(p^n, floor)``; ``floor`` keeps every prompt generated with at least
that probability, so none is starved.

Right and wrong are the verifier's correctness, as evaluation counts it (reward >=
:data:`~services.tasks.verify.CORRECT_REWARD`), not the sign of the reward: under
``gsm8k_format`` a group of formatted wrong answers (every reward 0.1) is all wrong.

``p`` is kept per kind and adapts by ``+-p_step`` once per learner step, as in GRESO, toward
that kind's target share of zero-variance groups: the groups of every actor's rounds at one
step (the weight version they generated with) are counted together, and the first round of a
later step adapts the p's once from them. So N actors move p as far per step as one.

The streaks, the two p's and the counts live in Redis (:class:`PromptHistory` over the run's
state), shared by every rollout actor and kept across actor restarts; the in-process trainer
keeps them in memory (:class:`MemoryHistoryStore`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from services.rollout.config import PrefilterConfig
from services.tasks.verify import CORRECT_REWARD

Kind = Literal["easy", "hard"]
KINDS: tuple[Kind, Kind] = ("easy", "hard")

# Rewards closer than this are equal (verifier rewards are a few exact values: 0, 0.1, 1).
_EQUAL = 1e-6

# A step's counts: groups generated, and those all right (easy) and all wrong (hard).
Counts = dict[str, int]


def skip_probability(count: int, p: float, floor: float) -> float:
    """Probability of skipping a drawn prompt with a zero-variance streak of ``count`` groups:
    ``1 - max(p^count, floor)``; 0 without a streak (``count`` 0).

    Example: p=0.5, count=3 -> 0.875; count=8 -> 1 - max(0.0039, 0.01) = 0.99.
    """
    if count <= 0:
        return 0.0
    return 1.0 - max(p**count, floor)


def adapt_p(
    p: float,
    observed_share: float,
    target_share: float,
    step: float = 0.01,
    lo: float = 0.05,
    hi: float = 0.95,
) -> float:
    """One adaptation of a kind's p: down by ``step`` (skip more) when a learner step's share of
    zero-variance groups of that kind exceeded ``target_share``, up by ``step`` otherwise;
    clipped to ``[lo, hi]``."""
    moved = p - step if observed_share > target_share else p + step
    return min(hi, max(lo, moved))


def zero_variance_kind(rewards: np.ndarray) -> Kind | None:
    """None when a group's rewards [G] differ (the group has signal); else ``easy`` when every
    response is correct (reward >= ``CORRECT_REWARD``), ``hard`` when none is (all rewards
    0, or all the same partial credit)."""
    r = np.asarray(rewards, dtype=np.float64)
    if float(r.max() - r.min()) > _EQUAL:
        return None
    return "easy" if float(r.min()) >= CORRECT_REWARD else "hard"


@dataclass(frozen=True)
class Streak:
    """A prompt's current run of zero-variance groups: all ``kind``, ``count`` >= 1 in a row."""

    kind: Kind
    count: int


class HistoryStore(Protocol):
    """Where streaks and p's are kept (:class:`~services.transport.state.RunState` in a run)."""

    def prefilter_streaks(self, prompt_ids: list[str]) -> list[tuple[str, int] | None]: ...

    def record_prefilter_streaks(self, streaks: Mapping[str, tuple[str, int] | None]) -> None: ...

    def prefilter_p(self) -> dict[str, float]: ...

    def advance_prefilter(
        self,
        step: int,
        counts: Mapping[str, int],
        adapt: Callable[[dict[str, float], dict[str, int]], Mapping[str, float]],
    ) -> dict[str, float]: ...


class MemoryHistoryStore:
    """A :class:`HistoryStore` in this process (the synchronous trainer has no Redis)."""

    def __init__(self) -> None:
        self.streaks: dict[str, tuple[str, int]] = {}
        self.p: dict[str, float] = {}
        self.counted: int | None = None
        self.counts: Counts = {}

    def prefilter_streaks(self, prompt_ids: list[str]) -> list[tuple[str, int] | None]:
        return [self.streaks.get(pid) for pid in prompt_ids]

    def record_prefilter_streaks(self, streaks: Mapping[str, tuple[str, int] | None]) -> None:
        for pid, s in streaks.items():
            if s is None:
                self.streaks.pop(pid, None)
            else:
                self.streaks[pid] = s

    def prefilter_p(self) -> dict[str, float]:
        return dict(self.p)

    def advance_prefilter(
        self,
        step: int,
        counts: Mapping[str, int],
        adapt: Callable[[dict[str, float], dict[str, int]], Mapping[str, float]],
    ) -> dict[str, float]:
        """As :meth:`services.transport.state.RunState.advance_prefilter`, in this process."""
        if self.counted is None or step > self.counted:
            if self.counted is not None and self.counts.get("groups", 0) > 0:
                self.p.update(adapt(dict(self.p), dict(self.counts)))
            self.counted, self.counts = step, {}
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)
        return dict(self.p)


class PromptHistory:
    """Per-prompt zero-variance streaks and the two adaptive p's, in ``store``.

    Args:
        store: The run's state (shared by every actor, survives restarts) or a memory store.
        p_init: Each p until it was first adapted.
    """

    def __init__(self, store: HistoryStore, p_init: float) -> None:
        self.store = store
        self.p_init = p_init

    def streaks(self, prompt_ids: Sequence[str]) -> list[Streak | None]:
        """The streak of each prompt (None: none)."""
        out: list[Streak | None] = []
        for s in self.store.prefilter_streaks(list(prompt_ids)):
            out.append(None if s is None else Streak("easy" if s[0] == "easy" else "hard", s[1]))
        return out

    def record(self, outcomes: Mapping[str, Kind | None]) -> None:
        """Each generated prompt's group outcome: a zero-variance group of the streak's kind
        extends it by one, of the other kind starts a new streak of 1, a group with signal ends
        it. (Two actors recording the same prompt at once may lose one observation: harmless.)"""
        ids = list(outcomes)
        updated: dict[str, tuple[str, int] | None] = {}
        for pid, old in zip(ids, self.streaks(ids), strict=True):
            kind = outcomes[pid]
            if kind is None:
                updated[pid] = None
            elif old is not None and old.kind == kind:
                updated[pid] = (kind, old.count + 1)
            else:
                updated[pid] = (kind, 1)
        self.store.record_prefilter_streaks(updated)

    def probabilities(self) -> dict[Kind, float]:
        """The current p of each kind."""
        stored = self.store.prefilter_p()
        return {k: stored.get(k, self.p_init) for k in KINDS}

    def advance(
        self,
        step: int,
        counts: Mapping[str, int],
        update: Callable[[dict[Kind, float], Counts], dict[Kind, float]],
    ) -> dict[Kind, float]:
        """Count a round (``counts``, possibly empty) at learner step ``step``; when ``step`` is
        later than the step being counted, first replace both p's by ``update(current, that
        step's counts)``, once for all actors. Returns the p's after."""

        def apply(stored: dict[str, float], counted: dict[str, int]) -> dict[str, float]:
            return dict(update({k: stored.get(k, self.p_init) for k in KINDS}, counted))

        stored = self.store.advance_prefilter(step, counts, apply)
        return {k: stored.get(k, self.p_init) for k in KINDS}


@dataclass(frozen=True)
class RoundReport:
    """What the prefilter saw of one round's generated groups.

    ``predicted_zero_var``: share of generated prompts that had a streak (the history predicted
    zero variance for them); ``actual_zero_var``: share of generated groups with zero variance;
    ``p``: each kind's p after the round (adapted when the round began a new learner step).
    """

    predicted_zero_var: float
    actual_zero_var: float
    p: dict[Kind, float]

    def metrics(self) -> dict[str, float]:
        """The report as metric fields (``prefilter_*``)."""
        return {
            "prefilter_predicted_zero_var": self.predicted_zero_var,
            "prefilter_actual_zero_var": self.actual_zero_var,
            "prefilter_p_easy": self.p["easy"],
            "prefilter_p_hard": self.p["hard"],
        }


class Prefilter:
    """The GRESO rule over a :class:`PromptHistory`, applied to one round at a time.

    Per round, at learner step ``step`` (the weight version the round generates with):
    :meth:`skip_chances` for the drawn prompts (the worker skips each with its chance), then
    :meth:`observe` with the generated prompts' rewards. Either one, first at a new step, adapts
    the p's from the previous step's counts (so the draws of a step already use them).
    """

    def __init__(self, config: PrefilterConfig, history: PromptHistory) -> None:
        self.config = config
        self.history = history

    def skip_chances(self, prompt_ids: Sequence[str], step: int | None = None) -> list[float]:
        """Each prompt's skip probability under the p's of learner step ``step`` (0 without a
        streak); None: under the p's as they are, without beginning a step."""
        if step is None:
            p = self.history.probabilities()
        else:
            p = self.history.advance(step, {}, self._update)
        return [
            0.0 if s is None else skip_probability(s.count, p[s.kind], self.config.floor)
            for s in self.history.streaks(prompt_ids)
        ]

    def observe(self, prompt_ids: Sequence[str], rewards: np.ndarray, step: int) -> RoundReport:
        """Record a round's outcomes (``rewards`` [B, G], row i is prompt i's group) and count
        them toward learner step ``step``'s shares."""
        predicted = sum(s is not None for s in self.history.streaks(prompt_ids))
        kinds = [zero_variance_kind(r) for r in rewards]
        self.history.record(dict(zip(prompt_ids, kinds, strict=True)))
        counts = {"groups": len(kinds), "easy": kinds.count("easy"), "hard": kinds.count("hard")}
        new_p = self.history.advance(step, counts, self._update)
        n = max(1, len(kinds))
        return RoundReport(
            predicted_zero_var=predicted / n,
            actual_zero_var=sum(k is not None for k in kinds) / n,
            p=new_p,
        )

    def _update(self, p: dict[Kind, float], counts: Counts) -> dict[Kind, float]:
        """One step's adaptation of both p's from that step's counts (all actors' groups)."""
        c = self.config
        n = max(1, counts.get("groups", 0))
        target = {"easy": c.target_zero_var * c.easy_fraction}
        target["hard"] = c.target_zero_var - target["easy"]
        return {
            k: adapt_p(p[k], counts.get(k, 0) / n, target[k], c.p_step, c.p_min, c.p_max)
            for k in KINDS
        }

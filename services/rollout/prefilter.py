"""Pre-rollout prompt selection (GRESO, arXiv 2506.02177): skip prompts whose groups are
predicted to carry no advantage before generating them.

A group whose G rewards are all equal has zero advantage variance: the selector throws it away,
and generating it was wasted. Such prompts tend to stay that way for a while, so a prompt whose
last ``n`` groups in a row were all right ("easy") or all wrong ("hard") is skipped when drawn
with probability ``1 - max(p^n, floor)``. ``p`` is kept per kind and adapts by ``+-p_step`` once
per round toward that kind's target share of zero-variance groups; ``floor`` keeps every prompt
generated with at least that probability, so none is starved.

The streaks and the two p's live in Redis (:class:`PromptHistory` over the run's state), shared
by every rollout actor and kept across actor restarts; the in-process trainer keeps them in
memory (:class:`MemoryHistoryStore`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from services.rollout.config import PrefilterConfig

Kind = Literal["easy", "hard"]
KINDS: tuple[Kind, Kind] = ("easy", "hard")

# Rewards closer than this are equal (verifier rewards are 0.0 or 1.0).
_EQUAL = 1e-6


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
    """One adaptation of a kind's p: down by ``step`` (skip more) when the round's share of
    zero-variance groups of that kind exceeded ``target_share``, up by ``step`` otherwise;
    clipped to ``[lo, hi]``."""
    moved = p - step if observed_share > target_share else p + step
    return min(hi, max(lo, moved))


def zero_variance_kind(rewards: np.ndarray) -> Kind | None:
    """``easy`` when a group's rewards [G] are all equal and positive (all right), ``hard`` when
    all equal and not positive (all wrong), None when they differ (the group has signal)."""
    r = np.asarray(rewards, dtype=np.float64)
    if float(r.max() - r.min()) > _EQUAL:
        return None
    return "easy" if float(r[0]) > 0 else "hard"


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

    def update_prefilter_p(
        self, update: Callable[[dict[str, float]], Mapping[str, float]]
    ) -> dict[str, float]: ...


class MemoryHistoryStore:
    """A :class:`HistoryStore` in this process (the synchronous trainer has no Redis)."""

    def __init__(self) -> None:
        self.streaks: dict[str, tuple[str, int]] = {}
        self.p: dict[str, float] = {}

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

    def update_prefilter_p(
        self, update: Callable[[dict[str, float]], Mapping[str, float]]
    ) -> dict[str, float]:
        self.p.update(update(dict(self.p)))
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

    def adapt(self, update: Callable[[dict[Kind, float]], dict[Kind, float]]) -> dict[Kind, float]:
        """Replace both p's by ``update(current)`` atomically (every actor adapts them); returns
        the new p's."""
        new: dict[Kind, float] = {}

        def apply(stored: dict[str, float]) -> dict[str, float]:
            new.update(update({k: stored.get(k, self.p_init) for k in KINDS}))
            return dict(new)

        self.store.update_prefilter_p(apply)
        return new


@dataclass(frozen=True)
class RoundReport:
    """What the prefilter saw of one round's generated groups.

    ``predicted_zero_var``: share of generated prompts that had a streak (the history predicted
    zero variance for them); ``actual_zero_var``: share of generated groups with zero variance;
    ``p``: each kind's p after this round's adaptation.
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

    Per round: :meth:`skip_chances` for the drawn prompts (the worker skips each with its
    chance), then :meth:`observe` with the generated prompts' rewards.
    """

    def __init__(self, config: PrefilterConfig, history: PromptHistory) -> None:
        self.config = config
        self.history = history

    def skip_chances(self, prompt_ids: Sequence[str]) -> list[float]:
        """Each prompt's skip probability under the current p's (0 without a streak)."""
        p = self.history.probabilities()
        return [
            0.0 if s is None else skip_probability(s.count, p[s.kind], self.config.floor)
            for s in self.history.streaks(prompt_ids)
        ]

    def observe(self, prompt_ids: Sequence[str], rewards: np.ndarray) -> RoundReport:
        """Record a round's outcomes (``rewards`` [B, G], row i is prompt i's group), then adapt
        each p once from the round's share of zero-variance groups of its kind."""
        c = self.config
        predicted = sum(s is not None for s in self.history.streaks(prompt_ids))
        kinds = [zero_variance_kind(r) for r in rewards]
        self.history.record(dict(zip(prompt_ids, kinds, strict=True)))
        n = max(1, len(kinds))
        target = {"easy": c.target_zero_var * c.easy_fraction}
        target["hard"] = c.target_zero_var - target["easy"]

        def update(p: dict[Kind, float]) -> dict[Kind, float]:
            return {
                k: adapt_p(p[k], kinds.count(k) / n, target[k], c.p_step, c.p_min, c.p_max)
                for k in KINDS
            }

        new_p = self.history.adapt(update)
        return RoundReport(
            predicted_zero_var=predicted / n,
            actual_zero_var=sum(k is not None for k in kinds) / n,
            p=new_p,
        )

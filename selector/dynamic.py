"""Dynamic sampling (DAPO): the groups one learner step draws until its batch has
``prompts_per_step`` groups with reward variance.

Both the synchronous trainer (which generates more rounds) and the selector service (which reads
more groups from the stream) count a step's draws with :class:`StepDraws`, so the bound, the
error and the metrics are the same in ``d3s train`` and ``d3s run``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from selector.advantages import flat_groups
from selector.curate import GroupLike

G = TypeVar("G", bound=GroupLike)
T = TypeVar("T", bound=Any)


class DynamicSamplingExhausted(RuntimeError):
    """A step drew ``algorithm.dynamic_sampling.max_draws_factor x prompts_per_step`` groups
    without finding enough with reward variance to fill its batch."""


def split_flat(
    items: list[T], rewards: Callable[[T], np.ndarray] = operator.attrgetter("rewards")
) -> tuple[list[T], list[T]]:
    """``items`` (groups, or anything ``rewards`` takes a group's rewards [G] from) split into
    (with reward variance, without), each in the given order."""
    if not items:
        return [], []
    table = torch.from_numpy(np.stack([rewards(x) for x in items]).astype(np.float64))
    flat = flat_groups(table).tolist()
    return (
        [x for x, f in zip(items, flat, strict=True) if not f],
        [x for x, f in zip(items, flat, strict=True) if f],
    )


def response_tokens(groups: list[G]) -> int:
    """Tokens generated for ``groups`` (every response's length)."""
    return sum(int(g.response_lengths.sum()) for g in groups)


class StepDraws:
    """What one learner step has drawn: kept groups (with variance), dropped ones, tokens.

    Args:
        need: groups the batch takes (``prompts_per_step``).
        max_draws: most groups the step may draw, kept and dropped together; None: no
            dynamic sampling (every group is kept, nothing is dropped or bounded).
        step: the learner step, for the error message.
    """

    def __init__(self, need: int, max_draws: int | None, step: int) -> None:
        self.need = need
        self.max_draws = max_draws
        self.step = step
        self.drawn = 0
        self.dropped = 0
        self.tokens = 0
        self.surplus = 0

    @property
    def filtering(self) -> bool:
        return self.max_draws is not None

    def drop(self, flat: list[G]) -> None:
        """Count ``flat`` (zero-variance groups) as drawn and dropped, then check the bound."""
        self.drawn += len(flat)
        self.dropped += len(flat)
        self.tokens += response_tokens(flat)
        self.check()

    def keep(self, groups: list[G]) -> None:
        """Count ``groups`` (with variance, or every group without dynamic sampling) as drawn."""
        self.drawn += len(groups)
        self.tokens += response_tokens(groups)

    def take(self, kept: list[G]) -> list[G]:
        """The batch's groups out of ``kept``: the first ``need``; the rest (a lock-step round
        that overshot) is counted as surplus, generated for this step and not used."""
        self.surplus += max(0, len(kept) - self.need)
        return kept[: self.need]

    def check(self) -> None:
        """Raise :class:`DynamicSamplingExhausted` when the batch can no longer be filled
        within the bound: more than ``max_draws - need`` groups were dropped."""
        if self.max_draws is None or self.dropped <= self.max_draws - self.need:
            return
        # The dropped count, not the drawn one: the service books a kept group only when its
        # batch commits, so "drawn" would leave out the groups with variance held so far.
        raise DynamicSamplingExhausted(
            f"algorithm.dynamic_sampling: step {self.step} dropped {self.dropped} groups with "
            f"no reward variance, more than the {self.max_draws - self.need} its bound leaves "
            f"(max_draws_factor x prompts_per_step = {self.max_draws} draws for a batch of "
            f"{self.need}), so the batch cannot be filled; too few of the task's prompts get "
            "both right and wrong answers from this policy: raise "
            "algorithm.dynamic_sampling.max_draws_factor, or give the task prompts of mixed "
            "difficulty"
        )

    def next_round(self, kept: int) -> int:
        """How many groups to generate next (lock-step), holding ``kept`` with variance: the
        missing ones divided by the share with variance seen so far, at most one batch
        (``need``; a share guessed from a few groups would otherwise overshoot by many) and
        never beyond the bound."""
        missing = self.need - kept
        left = self.max_draws - self.drawn if self.max_draws is not None else missing
        rate = kept / self.drawn if self.drawn else 1.0
        want = math.ceil(missing / rate) if rate > 0 else self.need
        return max(1, min(left, self.need, max(missing, want)))

    def metrics(self) -> dict[str, float]:
        """The step's draws as metrics: groups generated for it, zero-variance groups dropped,
        draws per step (generated / batch size), generated tokens per kept group."""
        kept = self.drawn - self.dropped - self.surplus
        return {
            "groups_generated": float(self.drawn),
            "groups_zero_var_dropped": float(self.dropped),
            "groups_surplus_dropped": float(self.surplus),
            "draws_per_step": self.drawn / self.need,
            "gen_tokens_per_kept_group": self.tokens / kept if kept else 0.0,
        }

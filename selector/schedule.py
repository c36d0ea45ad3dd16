"""The dynamic schedule: keep ratios that move from aggressive to relaxed as training goes on.

Progress p = step / horizon, clamped to [0, 1]; x(p) interpolates x_init -> x_final. The horizon
is the run's ``train.schedule_steps``: its ``total_steps`` at its first start, kept when a resumed
run is extended, so the steps past it hold x_final.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from selector._checks import check_ratio, require

ScheduleKind = Literal["linear", "cosine", "constant"]
SCHEDULE_KINDS: tuple[str, ...] = ("linear", "cosine", "constant")


def _interpolate(kind: str, p: float) -> float:
    """Weight of the final value at progress p: 0 at p = 0, 1 at p = 1, non-decreasing."""
    if kind == "linear":
        return p
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    return 0.0  # constant stays at the initial value


@dataclass(frozen=True)
class Schedule:
    """Sample keep ratio rho_s and token keep ratio K over training.

    ``constant`` uses the *_init values throughout (and ignores *_final).
    """

    kind: ScheduleKind = "linear"
    sample_init: float = 0.25
    sample_final: float = 0.5
    token_init: float = 0.2
    token_final: float = 0.5

    def __post_init__(self) -> None:
        require(
            self.kind in SCHEDULE_KINDS,
            "kind",
            f"must be one of {SCHEDULE_KINDS}, got {self.kind!r}",
        )
        for name in ("sample_init", "sample_final", "token_init", "token_final"):
            check_ratio(getattr(self, name), name)

    @staticmethod
    def progress(step: int, total_steps: int) -> float:
        require(
            int(total_steps) == total_steps and total_steps > 0,
            "total_steps",
            f"must be a positive integer, got {total_steps!r}",
        )
        require(
            int(step) == step and step >= 0, "step", f"must be a non-negative integer, got {step!r}"
        )
        return min(1.0, step / total_steps)

    def at(self, step: int, total_steps: int) -> tuple[float, float]:
        """(sample_ratio, token_ratio) at ``step`` of a schedule over ``total_steps`` steps (the
        horizon); at and past it, the final values."""
        w = _interpolate(self.kind, self.progress(step, total_steps))
        sample = (1.0 - w) * self.sample_init + w * self.sample_final
        token = (1.0 - w) * self.token_init + w * self.token_final
        return sample, token

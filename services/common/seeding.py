"""Per-step seeds: every component derives its randomness for a step from the run seed, so a
resumed or restarted component draws exactly what an uninterrupted one would have."""

from __future__ import annotations

_MODULUS = 2**31 - 1  # torch.Generator and numpy both accept seeds below this


def step_seed(seed: int, step: int) -> int:
    """A seed for ``step`` of a run seeded with ``seed``; distinct steps give distinct seeds."""
    return (seed * 1_000_003 + step) % _MODULUS

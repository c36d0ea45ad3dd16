"""How scalar values go into Redis hashes and come back out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def text(value: bytes | str) -> str:
    """A Redis reply value as str (clients here use ``decode_responses=False``)."""
    return value.decode() if isinstance(value, bytes) else value


def hash_value(value: Any) -> bytes | str:
    """A hash field value as Redis stores it; floats keep full precision (repr)."""
    if isinstance(value, (bytes, str)):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # numpy 2's repr would give "np.float64(...)"
    raise TypeError(f"cannot store {type(value).__name__} in a Redis hash")


def pairs(flat: Sequence[Any]) -> dict[str, str]:
    """A flat [k1, v1, k2, v2, ...] reply as a dict of str."""
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}

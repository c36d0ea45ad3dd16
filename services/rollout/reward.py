"""The ``reward`` section: shaping added to the verifier's reward of every training response.

It lives with the rollouts because its inputs are the generation's own (a response's length in
tokens, and whether ``max_new_tokens`` cut it), which a verifier, scoring text, never sees; and
it shapes training rewards only: evaluation scores with the verifier alone, so its accuracy stays
strict.

Overlong shaping (DAPO's soft overlong punishment). For a response of ``L`` tokens (its stop
token counted), limit ``max_len`` and buffer ``B``:

- ``0`` while ``L <= max_len - B``;
- ``((max_len - B) - L) / B * penalty`` inside the buffer, falling linearly to ``-penalty`` at
  ``max_len``;
- ``-penalty`` beyond ``max_len``.

A truncated response (cut at ``rollout.max_new_tokens`` with no stop token) takes ``-penalty``,
whatever its length (``max_len`` is at most ``max_new_tokens``, so the rule above gives the same).
The shaping is added to the verifier's reward: a right answer in the buffer earns less than 1,
a truncated one ``verifier - penalty``.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class OverlongConfig(BaseModel):
    """DAPO's soft overlong punishment (see the module): responses in the last ``buffer``
    tokens before ``max_len`` lose up to ``penalty``, longer or truncated ones all of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_len: int = Field(ge=2)
    """Length, in response tokens, at which the full penalty applies; at most
    ``rollout.max_new_tokens``."""
    buffer: int = Field(ge=1)
    """Tokens before ``max_len`` over which the penalty grows linearly from 0; below
    ``max_len``."""
    penalty: float = Field(1.0, gt=0)
    """The most taken off the verifier's reward (DAPO: 1.0)."""

    @model_validator(mode="after")
    def _buffer_fits(self) -> OverlongConfig:
        if self.buffer >= self.max_len:
            raise ValueError(
                f"buffer: {self.buffer} must be below max_len ({self.max_len}); the penalty "
                "starts max_len - buffer tokens into a response"
            )
        return self

    def shaping(self, lengths: np.ndarray, truncated: np.ndarray) -> np.ndarray:
        """What is added to each response's reward.

        Args:
            lengths: int [N], response lengths in tokens (the stop token counted).
            truncated: bool [N], True where ``max_new_tokens`` cut the response.
        Returns:
            float32 [N], in ``[-penalty, 0]``.
        """
        start = self.max_len - self.buffer
        over = np.asarray(lengths, dtype=np.float64) - start
        shaped = -np.clip(over / self.buffer, 0.0, 1.0) * self.penalty
        return np.where(np.asarray(truncated, dtype=bool), -self.penalty, shaped).astype(np.float32)


class RewardConfig(BaseModel):
    """Shaping of the training rewards, added to the verifier's (evaluation never sees it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    overlong: OverlongConfig | None = None
    """DAPO's soft overlong punishment; None: responses are rewarded by the verifier alone."""

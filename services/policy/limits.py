"""What a model can take: its vocabulary and context length, read from its config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelLimits:
    """Token ids must be below ``vocab_size``; a sequence may hold ``max_positions`` tokens."""

    vocab_size: int
    max_positions: int | None


def model_limits(path: str | Path) -> ModelLimits:
    """The limits of the local Hugging Face model at ``path`` (its config.json only)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    text = getattr(config, "get_text_config", lambda: config)()
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return ModelLimits(int(text.vocab_size), int(positions) if positions else None)

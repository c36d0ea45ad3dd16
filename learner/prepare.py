"""What the learner does to a Hugging Face model before DeepSpeed wraps it."""

from __future__ import annotations

import torch


def disable_dropout(model: torch.nn.Module) -> None:
    # With dropout on, the gradient pass and the no-grad pass of the same weights disagree and
    # the PPO ratio is not 1 at the start of a step; RL trainers turn it off.
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0


def enable_checkpointing(model: torch.nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"learner.gradient_checkpointing: {type(model).__name__} does not support it"
        )
    # Non-reentrant checkpointing handles inputs that need no grad and ZeRO-3's parameter hooks.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

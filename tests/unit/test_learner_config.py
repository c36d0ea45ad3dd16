"""LearnerConfig: the typed loss section, its defaults, and errors that name the field."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from learner.config import (
    GRPOLossConfig,
    GSPOLossConfig,
    LearnerConfig,
    LossConfig,
    default_loss_config,
)
from learner.loss import POLICY_LOSSES, get_policy_loss


def error_locs(err: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in err.value.errors()]


def test_default_loss_is_grpo_with_its_own_defaults():
    loss = LearnerConfig().loss
    assert isinstance(loss, GRPOLossConfig)
    assert (loss.clip_low, loss.clip_high, loss.aggregation, loss.is_cap, loss.kl_coef) == (
        0.2,
        0.28,
        "token-mean",
        2.0,
        0.0,
    )


def test_gspo_variant_has_its_own_defaults_and_no_aggregation():
    loss = LearnerConfig(loss={"type": "gspo"}).loss
    assert isinstance(loss, GSPOLossConfig)
    assert (loss.clip_low, loss.clip_high, loss.is_cap) == (3e-4, 4e-4, 2.0)
    assert "aggregation" not in GSPOLossConfig.model_fields


def test_loss_section_without_type_is_grpo():
    assert LearnerConfig(loss={"clip_high": 0.3}).loss == GRPOLossConfig(clip_high=0.3)


def test_union_and_registry_agree():
    union = typing.get_args(typing.get_args(LossConfig)[0])
    tags = {typing.get_args(member)[0].model_fields["type"].default for member in union}
    assert tags == set(POLICY_LOSSES) == {"grpo", "gspo"}
    for name in tags:
        loss = get_policy_loss(default_loss_config(name))
        assert loss.name == name and loss.cfg.type == name


@pytest.mark.parametrize(
    "kwargs, loc",
    [
        ({"loss": {"type": "ppo"}}, "loss"),
        ({"loss": {"type": "grpo", "typo_field": 1}}, "loss.grpo.typo_field"),
        ({"loss": {"type": "gspo", "aggregation": "token-mean"}}, "loss.gspo.aggregation"),
        ({"loss": {"type": "grpo", "kl_coef": 0.05}}, "loss.grpo.kl_coef"),
        ({"loss": {"type": "grpo", "clip_low": 1.5}}, "loss.grpo.clip_low"),
        ({"micro_batch_tokens": 0}, "micro_batch_tokens"),
        ({"micro_batch_tokens": -512}, "micro_batch_tokens"),
        ({"micro_batch_tokens": "lots"}, "micro_batch_tokens"),
        ({"gradient_checkpointing": "maybe"}, "gradient_checkpointing"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"clip_low": 0.1}, "clip_low"),  # the loss's fields live under `loss` now
    ],
)
def test_bad_fields_are_refused_by_name(kwargs, loc):
    with pytest.raises(ValidationError) as err:
        LearnerConfig(**kwargs)
    assert error_locs(err) == [loc]


def test_kl_coef_refusal_says_why():
    with pytest.raises(ValidationError, match="frozen reference model"):
        LearnerConfig(loss={"type": "gspo", "kl_coef": 0.1})
    assert LearnerConfig(loss={"kl_coef": 0}).loss.kl_coef == 0


def test_unknown_loss_type_lists_the_choices():
    with pytest.raises(ValidationError, match="'grpo', 'gspo'"):
        LearnerConfig(loss={"type": "dpo"})


def test_micro_batch_tokens_default_is_one_micro_batch_and_accepts_a_budget():
    assert LearnerConfig().micro_batch_tokens is None
    assert (
        LearnerConfig(micro_batch_tokens=8192, gradient_checkpointing=True).micro_batch_tokens
        == 8192
    )


def test_every_field_is_documented():
    for cls in (LearnerConfig, GRPOLossConfig, GSPOLossConfig):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name}"

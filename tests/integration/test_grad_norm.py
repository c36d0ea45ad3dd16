"""The learner logs the policy-gradient norm before clipping, the same under ZeRO-0 and ZeRO-1."""

from __future__ import annotations

import pytest
import torch

from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from selector.presets import get_preset
from tests.integration.test_learner import make_batch, tiny_model

pytestmark = pytest.mark.integration


def _manual_norm(batch) -> float:
    """The gradient norm of one step at ZeRO-0 with a clip too large to act."""
    eng = LearnerEngine(tiny_model(), LearnerConfig(zero_stage=0, grad_clip=1e9), schedule_steps=4)
    return eng.train_step(batch, get_preset("grpo"), 1.0)["grad_norm"]


@pytest.mark.parametrize("stage", [0, 1])
def test_grad_norm_is_before_clipping(stage):
    batch = make_batch(0)
    clip = 1e-3
    eng = LearnerEngine(
        tiny_model(), LearnerConfig(zero_stage=stage, grad_clip=clip), schedule_steps=4
    )
    before = {k: v.clone() for k, v in eng.state_dict_cpu().items()}
    m = eng.train_step(batch, get_preset("grpo"), 1.0)
    # the norm is the gradient's, far above the clip, and agrees with an unclipped measurement
    assert m["grad_norm"] > 100 * clip
    assert m["grad_norm"] == pytest.approx(_manual_norm(batch), rel=1e-4)
    after = eng.state_dict_cpu()
    assert any(not torch.equal(before[k], after[k]) for k in before)

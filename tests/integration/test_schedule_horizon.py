"""The schedules' horizon in a run's Redis (a real one): claimed by the first component to start,
kept by every later one, so components started one by one (compose, ``d3s learner``), which no
resume check passed, extend a run with its schedules at their final values, as ``d3s run``
does (tests/unit/test_resume.py, tests/e2e/test_resume_cli.py)."""

from __future__ import annotations

import pytest

from services.run.components import with_run_horizon
from services.run.config import parse_config
from services.transport.bundle import Transport

pytestmark = pytest.mark.integration


def _cfg(*overrides: str):
    return parse_config({"name": "h", "train": {"run_dir": "runs/h"}}, list(overrides))


def test_the_first_start_claims_the_horizon_and_later_starts_keep_it(transport: Transport):
    first = with_run_horizon(_cfg("train.total_steps=60"), transport)
    assert first.train.horizon == 60
    assert transport.client.get(transport.keys.schedule_horizon) == b"60"
    # Restarted with a longer run: the selector and learner settings span the first 60 steps.
    longer = with_run_horizon(_cfg("train.total_steps=120"), transport)
    assert longer.train.total_steps == 120 and longer.train.schedule_steps == 60
    assert longer.selector_settings().horizon == 60
    assert with_run_horizon(_cfg("train.schedule_steps=60"), transport).train.horizon == 60
    # Naming another horizon is refused, by its field.
    with pytest.raises(ValueError, match=r"train.schedule_steps: 120 given.*span 60 steps"):
        with_run_horizon(_cfg("train.total_steps=120", "train.schedule_steps=120"), transport)
    assert transport.client.get(transport.keys.schedule_horizon) == b"60"


def test_an_explicit_horizon_at_the_first_start_is_the_one_kept(transport: Transport):
    cfg = with_run_horizon(_cfg("train.total_steps=100", "train.schedule_steps=40"), transport)
    assert cfg.train.horizon == 40
    assert with_run_horizon(_cfg("train.total_steps=100"), transport).train.horizon == 40

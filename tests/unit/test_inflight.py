"""In-flight weight updates, without a service: the HF engine loading weights between decoding
steps (tokens record their version, the KV cache is kept), per-token versions on the wire, the
selector's token-level staleness, and the config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selector.service import token_staleness
from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.hf_engine import HFRolloutEngine
from services.rollout.worker import group_versions
from services.run.config import ConfigError, parse_config
from services.tasks import Prompt
from services.transport.codec import SchemaError
from services.transport.records import ScoredGroup, decode

TOK = CharTokenizer()
PROMPTS = [Prompt("p0", "1+1=", "2", "arithmetic"), Prompt("p1", "123+456=", "579", "arithmetic")]
STEPS = 8


def engine(seed: int = 0) -> HFRolloutEngine:
    # A stop set the random model never samples, so every row runs all STEPS steps.
    return HFRolloutEngine(
        build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), TOK, seed=seed),
        TOK,
        max_new_tokens=STEPS,
        stop_token_ids=[TOK.pad_token_id],
    )


class SwitchAt:
    """A ``between_steps`` hook that loads ``state`` as ``version`` after decoding step ``at``
    (1-based), as the rollout actor does when a new version is published mid-round."""

    def __init__(self, eng: HFRolloutEngine, state: dict, version: int, at: int) -> None:
        self.eng, self.state, self.version, self.at, self.calls = eng, state, version, at, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.eng.load_state_dict(self.state, self.version)


def test_tokens_after_an_in_flight_load_record_the_new_version_and_come_from_it() -> None:
    other = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), TOK, seed=7).state_dict()
    plain = engine().generate(PROMPTS, n=4, seed=3)
    eng = engine()
    hook = SwitchAt(eng, other, version=1, at=3)
    mixed = eng.generate(PROMPTS, n=4, seed=3, between_steps=hook)

    assert hook.calls == STEPS - 1  # between every two steps, not after the last
    assert mixed.policy_version == 0 and eng.version == 1
    expected = torch.tensor([0, 0, 0] + [1] * (STEPS - 3)).expand(len(mixed), -1)
    assert torch.equal(mixed.token_versions, torch.where(mixed.response_mask, expected, 0))
    # Before the load: the same tokens and log-probs as without one (same seed, same weights).
    assert torch.equal(mixed.responses[:, :3], plain.responses[:, :3])
    assert torch.allclose(mixed.behav_logp[:, :3], plain.behav_logp[:, :3])
    # After it: the new weights sample, so the behaviour log-probs (the learner's IS
    # denominator) are the new version's, not the old one's.
    assert not torch.allclose(mixed.behav_logp[:, 3:], plain.behav_logp[:, 3:])


def _teacher_forced_logp(model: torch.nn.Module, batch, row: int) -> torch.Tensor:
    """log-softmax of ``model`` at each response token of ``row``, by one full forward pass
    over prompt + response (every key and value computed by ``model``)."""
    p_ids = batch.prompt_ids[row // batch.n]
    k = int(batch.response_lengths[row])
    resp = batch.responses[row, :k].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([p_ids + resp])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[len(p_ids) - 1 : len(p_ids) - 1 + k]
    return logp.gather(-1, torch.tensor(resp).unsqueeze(-1)).squeeze(-1)


def test_an_in_flight_load_keeps_the_kv_cache() -> None:
    """Tokens before the load are the old weights' (teacher-forced); tokens after it come from
    the new weights over the old weights' cache of the tokens before, as in PipelineRL: not
    what the new weights give with every key and value recomputed."""
    old = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), TOK, seed=0)
    new = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), TOK, seed=9)
    eng = engine()
    batch = eng.generate(
        PROMPTS, n=2, seed=5, between_steps=SwitchAt(eng, new.state_dict(), 1, at=4)
    )
    for row in range(len(batch)):
        before = _teacher_forced_logp(old, batch, row)[:4]
        assert torch.allclose(batch.behav_logp[row, :4], before, atol=1e-5)
        recomputed = _teacher_forced_logp(new, batch, row)[4:]
        assert not torch.allclose(batch.behav_logp[row, 4:STEPS], recomputed, atol=1e-3)

    # Same values under a new version: only the labels change.
    same = {k: v.clone() for k, v in old.state_dict().items()}
    eng2 = engine()
    relabelled = eng2.generate(PROMPTS, n=2, seed=5, between_steps=SwitchAt(eng2, same, 4, at=5))
    plain = engine().generate(PROMPTS, n=2, seed=5)
    assert torch.equal(relabelled.responses, plain.responses)
    assert torch.allclose(relabelled.behav_logp, plain.behav_logp)
    assert relabelled.token_versions[0].tolist() == [0] * 5 + [4] * (STEPS - 5)


def test_no_load_means_no_token_versions() -> None:
    eng = engine()
    batch = eng.generate(PROMPTS, n=2, seed=1, between_steps=lambda: None)
    assert batch.token_versions is None and batch.policy_version == 0


def test_group_versions_per_group() -> None:
    lengths = np.array([3, 1])
    straddles = np.array([[2, 2, 3], [2, 0, 0]])
    assert group_versions(straddles, lengths, 2)[0] == 2
    assert group_versions(straddles, lengths, 2)[1].tolist() == straddles.tolist()
    # A group whose every token is from one version has no token_versions, and that version
    # (here newer than the batch's first: its rows started after the load) is its version.
    one = np.array([[3, 3, 0], [3, 0, 0]])
    assert group_versions(one, np.array([2, 1]), 2) == (3, None)
    assert group_versions(None, lengths, 5) == (5, None)


def group(**changes) -> ScoredGroup:
    base = dict(
        group_id="g-1",
        prompt_id="p",
        policy_version=2,
        prompt=np.array([1, 2, 3]),
        responses=np.array([[4, 5, 6], [7, 0, 0]]),
        response_lengths=np.array([3, 1]),
        behav_logp=np.array([[-0.1, -0.2, -0.3], [-0.4, 0, 0]], dtype=np.float32),
        rewards=np.array([1.0, 0.0], dtype=np.float32),
        created_at=1.0,
        actor="rollout-0",
        task="arithmetic",
        token_versions=np.array([[2, 3, 3], [2, 0, 0]]),
    )
    return ScoredGroup(**{**base, **changes})


def test_token_versions_travel_and_old_records_still_decode() -> None:
    g = group()
    back = decode(g.to_fields())
    assert back.token_versions.tolist() == [[2, 3, 3], [2, 0, 0]]
    assert back.max_version == 3
    plain = group(token_versions=None)
    fields = plain.to_fields()
    assert b"token_versions" not in fields  # a record written before the field existed
    again = decode(fields)
    assert again.token_versions is None and again.max_version == 2


@pytest.mark.parametrize(
    ("versions", "reason"),
    [
        ([[2, 3], [2, 0]], "inconsistent shapes"),
        ([[2, 3, 3], [2, 5, 0]], "must be 0 outside the response"),
        ([[3, 3, 3], [3, 0, 0]], "starts at version 3, but policy_version is 2"),
        ([[2, 4, 3], [2, 0, 0]], "goes back to an older version"),
    ],
)
def test_bad_token_versions_are_refused(versions, reason) -> None:
    with pytest.raises(SchemaError, match=reason):
        group(token_versions=np.array(versions))


def test_token_staleness_counts_each_token_by_its_version() -> None:
    # Group 1: 4 tokens, versions 2, 3, 3 and 2 at step 4 -> lags 2, 1, 1, 2; two from a newer
    # version than the group's first. Group 2: 2 tokens of version 3 -> lags 1, 1.
    g1 = group()
    g2 = group(
        group_id="g-2",
        policy_version=3,
        responses=np.array([[4, 0, 0], [7, 0, 0]]),
        response_lengths=np.array([1, 1]),
        behav_logp=np.array([[-0.1, 0, 0], [-0.4, 0, 0]], dtype=np.float32),
        token_versions=None,
    )
    lag, share = token_staleness(4, [g1, g2])
    assert lag == pytest.approx((2 + 1 + 1 + 2 + 1 + 1) / 6)
    assert share == pytest.approx(2 / 6)


def test_inflight_updates_need_async_mode() -> None:
    with pytest.raises(ConfigError, match="rollout.inflight_updates"):
        parse_config({"rollout": {"inflight_updates": True}, "service": {"mode": "sync"}})
    cfg = parse_config({"rollout": {"inflight_updates": True}, "service": {"mode": "async"}})
    assert cfg.rollout_settings().inflight_updates

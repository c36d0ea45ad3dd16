"""HF rollout engine: shapes, behaviour log-probs, EOS padding, grouping, determinism."""

from __future__ import annotations

import pytest
import torch

from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.hf_engine import HFRolloutEngine, RolloutBatch
from services.tasks import Prompt

TOK = CharTokenizer()
# Prompts of different lengths so generation needs left padding.
PROMPTS = [
    Prompt("p0", "1+1=", "2", "arithmetic"),
    Prompt("p1", "12+345=", "357", "arithmetic"),
    Prompt("p2", "123+456=", "579", "arithmetic"),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_policy(PolicySpec(), TOK, seed=0)


def _recomputed_logp(model, batch: RolloutBatch, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per row: log-softmax(logits / temperature) of each response token, by a plain unpadded
    forward pass over prompt + response."""
    out = []
    with torch.no_grad():
        for row in range(len(batch)):
            p_ids = batch.prompt_ids[batch.prompt_index(row)]
            k = int(batch.response_lengths[row])
            resp = batch.responses[row, :k].tolist()
            logits = model(torch.tensor([p_ids + resp])).logits[0].float() / temperature
            logp = torch.log_softmax(logits, -1)[len(p_ids) - 1 : len(p_ids) - 1 + k]
            out.append(logp.gather(-1, torch.tensor(resp).unsqueeze(-1)).squeeze(-1))
    return out


def test_shapes_and_types(model):
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5)
    b = eng.generate(PROMPTS, n=4, seed=0)
    n_rows = len(PROMPTS) * 4
    t = b.responses.shape[1]
    assert 1 <= t <= 5 and len(b) == n_rows
    assert b.responses.shape == b.behav_logp.shape == b.response_mask.shape == (n_rows, t)
    assert b.responses.dtype == torch.int64 and b.behav_logp.dtype == torch.float32
    assert b.response_mask.dtype == torch.bool and b.response_lengths.shape == (n_rows,)
    assert b.prompt_ids == [TOK.encode(p.text) for p in PROMPTS]
    assert b.response_mask.sum(1).tolist() == b.response_lengths.tolist()
    assert t == int(b.response_lengths.max())
    for row, text in enumerate(b.texts):
        k = int(b.response_lengths[row])
        assert text == TOK.decode(b.responses[row, :k])
    assert b.n == 4 and b.policy_version == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_plain_forward(model, temperature):
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5, temperature=temperature)
    b = eng.generate(PROMPTS, n=8, seed=1)
    ref = _recomputed_logp(model, b, temperature)
    for row, r in enumerate(ref):
        k = int(b.response_lengths[row])
        torch.testing.assert_close(b.behav_logp[row, :k], r, atol=1e-4, rtol=0)
    assert (b.behav_logp[b.response_mask] < 0).all()


def test_rows_grouped_by_prompt():
    """With a near-greedy temperature each row reproduces its own prompt's continuation, so a
    row attached to the wrong prompt shows."""
    model = build_policy(PolicySpec(), TOK, seed=0)
    # Large random weights make the continuation depend strongly on the prompt.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5, temperature=1e-3)
    n = 3
    b = eng.generate(PROMPTS, n=n, seed=0)
    singles = [eng.generate([p], n=1, seed=0) for p in PROMPTS]
    assert len({s.texts[0] for s in singles}) == len(PROMPTS)  # prompts are distinguishable
    for row in range(len(b)):
        assert b.prompt_index(row) == row // n
        assert b.texts[row] == singles[row // n].texts[0]


def test_padding_after_eos(model):
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5)
    b = eng.generate(PROMPTS * 8, n=4, seed=2)  # 96 rows: the random model emits EOS ~1/15 a step
    lengths = b.response_lengths
    ended = 0
    for row in range(len(b)):
        k = int(lengths[row])
        resp = b.responses[row]
        eos_at = (resp[:k] == TOK.eos_id).nonzero().flatten().tolist()
        if k < 5:
            assert eos_at == [k - 1]  # EOS is the last response token, and counted
            ended += 1
        else:
            assert eos_at in ([], [4])
        assert (resp[k:] == TOK.pad_id).all()
        assert (b.behav_logp[row, k:] == 0).all() and not b.response_mask[row, k:].any()
        assert b.behav_logp[row, k - 1] != 0
    assert ended > 0 and (lengths == 5).any()


def test_deterministic_given_seed_and_leaves_global_rng(model):
    eng = HFRolloutEngine(model, TOK)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = eng.generate(PROMPTS, n=8, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = eng.generate(PROMPTS, n=8, seed=5)
    c = eng.generate(PROMPTS, n=8, seed=6)
    assert torch.equal(a.responses, b.responses) and torch.equal(a.behav_logp, b.behav_logp)
    assert not torch.equal(a.responses, c.responses)


def test_length_limit_and_position_check(model):
    eng = HFRolloutEngine(model, TOK, max_new_tokens=2)
    b = eng.generate(PROMPTS, n=4, seed=0)
    assert b.responses.shape[1] <= 2 and (b.response_lengths <= 2).all()
    long = Prompt("x", "1" * 30 + "=", "1", "arithmetic")
    with pytest.raises(ValueError, match="positions"):
        HFRolloutEngine(model, TOK, max_new_tokens=5).generate([long], n=1, seed=0)


def test_load_state_dict_swaps_weights_and_version():
    model = build_policy(PolicySpec(), TOK, seed=0)
    other = build_policy(PolicySpec(), TOK, seed=1)
    eng = HFRolloutEngine(model, TOK)
    state = {k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}  # tied: optional
    eng.load_state_dict(state, version=3)
    assert eng.version == 3
    x = torch.tensor([TOK.encode("12+34=")])
    assert torch.equal(eng.model(x).logits, other(x).logits)
    assert eng.generate(PROMPTS, n=1, seed=0).policy_version == 3
    with pytest.raises(KeyError):
        eng.load_state_dict({**other.state_dict(), "bogus.weight": torch.zeros(1)}, version=4)
    partial = {k: v for k, v in other.state_dict().items() if "h.0.mlp" not in k}
    with pytest.raises(KeyError):
        eng.load_state_dict(partial, version=5)


def test_rejects_bad_settings(model):
    with pytest.raises(ValueError):
        HFRolloutEngine(model, TOK, temperature=0.0)
    with pytest.raises(ValueError):
        HFRolloutEngine(model, TOK, top_p=0.0)
    with pytest.raises(ValueError):
        HFRolloutEngine(model, TOK).generate(PROMPTS, n=0, seed=0)

"""The vLLM rollout engine on CPU, on a tiny random Qwen2: samples and behaviour log-probs,
stop tokens, in-place weight updates, and agreement with the HF engine on the same weights."""

from __future__ import annotations

import pytest
import torch
from tiny_qwen import IM_END, build_model

from services.rollout.engine import NO_STOP, RolloutEngine
from services.rollout.hf_engine import HFRolloutEngine, process_logits
from services.rollout.vllm_engine import VLLMRolloutEngine
from services.tasks.base import Prompt

PROMPTS = [
    Prompt("p0", "How many clips did Natalia sell", "72", "gsm8k"),
    Prompt("p1", "12+34=", "46", "gsm8k"),
    Prompt("p2", "Betty is saving money for a new wallet", "5", "gsm8k"),
]
G = 8
MAX_NEW = 12


@pytest.fixture(scope="module")
def engine(model_dir, hf_pair):
    _, tok = hf_pair
    eng = VLLMRolloutEngine(
        model_dir,
        tok,
        max_new_tokens=MAX_NEW,
        temperature=1.0,
        top_p=1.0,
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
    )
    yield eng
    eng.shutdown()


def hf_logp(model, prompt_ids, response, temperature=1.0, top_p=1.0) -> torch.Tensor:
    """float32 [k]: log-prob of each response token under the HF model's next-token
    distribution at each position, after temperature and top-p, from one full forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt_ids) + list(response)])).logits[0].float()
    rows = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(response)]
    logp = torch.log_softmax(process_logits(rows, temperature, top_p), dim=-1)
    return logp.gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)


def test_is_a_rollout_engine(engine, hf_pair):
    _, tok = hf_pair
    assert isinstance(engine, RolloutEngine) and engine.model is None
    # Default stops: the tokenizer's EOS and the chat template's end-of-turn token.
    assert engine.stop_token_ids == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]


def test_g_samples_per_prompt_with_behaviour_logprobs(engine):
    b = engine.generate(PROMPTS, n=G, seed=0)
    n_rows, t = len(PROMPTS) * G, b.responses.shape[1]
    assert len(b) == n_rows and b.n == G and b.policy_version == 0
    assert b.responses.shape == b.behav_logp.shape == b.response_mask.shape == (n_rows, t)
    assert b.responses.dtype == torch.int64 and b.behav_logp.dtype == torch.float32
    assert t == int(b.response_lengths.max()) <= MAX_NEW
    assert b.response_mask.sum(1).tolist() == b.response_lengths.tolist()
    valid = b.behav_logp[b.response_mask]
    assert torch.isfinite(valid).all() and (valid <= 0).all() and (valid < 0).any()
    assert (b.behav_logp[~b.response_mask] == 0).all()
    stops = set(engine.stop_token_ids)
    for row in range(n_rows):
        k = int(b.response_lengths[row])
        toks = b.responses[row, :k].tolist()
        assert not stops & set(toks[:-1])  # nothing after the first stop token
        if int(b.stop_token[row]) == NO_STOP:
            assert k == MAX_NEW and toks[-1] not in stops
        else:
            assert toks[-1] == int(b.stop_token[row]) in stops
        assert (b.responses[row, k:] == engine.pad_id).all()
    for i in range(len(PROMPTS)):  # G different samples, not one repeated
        group = {tuple(b.responses[r].tolist()) for r in range(i * G, (i + 1) * G)}
        assert len(group) > 1
    again = engine.generate(PROMPTS, n=G, seed=0)
    other = engine.generate(PROMPTS, n=G, seed=1)
    assert torch.equal(again.responses, b.responses) and torch.equal(again.behav_logp, b.behav_logp)
    assert not torch.equal(other.responses, b.responses)


def test_stops_on_end_of_turn_token(engine, hf_pair):
    """A random model seldom samples <|im_end|>; give it the output row of the token it samples
    most, so the two tie, then the engine must stop there and record which token stopped it."""
    model, tok = hf_pair
    im_end = tok.convert_tokens_to_ids(IM_END)
    b = engine.generate(PROMPTS, n=G, seed=3)
    common = int(torch.mode(b.responses[b.response_mask]).values)
    head = model.lm_head.weight.detach().clone()
    head[im_end] = head[common]
    engine.load_weights([("lm_head.weight", head)], version=engine.version)
    try:
        b = engine.generate(PROMPTS, n=G, seed=3)
    finally:
        engine.load_weights(
            [("lm_head.weight", model.lm_head.weight.detach())], version=engine.version
        )
    by_im_end = b.stop_token == im_end
    assert by_im_end.any()
    rows = by_im_end.nonzero().flatten()
    last = b.responses[rows, b.response_lengths[rows] - 1]
    assert (last == im_end).all() and (b.response_lengths[rows] < MAX_NEW).any()


def test_logprobs_equal_hf_log_softmax_at_temperature_1(engine, hf_pair):
    model, _ = hf_pair
    b = engine.generate(PROMPTS, n=G, seed=5)
    for row in range(len(b)):
        k = int(b.response_lengths[row])
        ref = hf_logp(model, b.prompt_ids[row // b.n], b.responses[row, :k].tolist())
        torch.testing.assert_close(b.behav_logp[row, :k], ref, atol=2e-4, rtol=0)


def test_logprobs_are_of_the_processed_distribution(engine, hf_pair, monkeypatch):
    """Temperature and top-p travel with each request, so the same engine samples with other
    settings; the log-probs must be those of the distribution sampled from, not the raw one."""
    model, _ = hf_pair
    monkeypatch.setattr(engine, "temperature", 0.7)
    monkeypatch.setattr(engine, "top_p", 0.8)
    b = engine.generate(PROMPTS, n=G, seed=6)
    differs_from_raw = False
    for row in range(len(b)):
        k = int(b.response_lengths[row])
        p_ids, resp = b.prompt_ids[row // b.n], b.responses[row, :k].tolist()
        ref = hf_logp(model, p_ids, resp, temperature=0.7, top_p=0.8)
        torch.testing.assert_close(b.behav_logp[row, :k], ref, atol=2e-4, rtol=0)
        raw = hf_logp(model, p_ids, resp)
        differs_from_raw |= bool((b.behav_logp[row, :k] - raw).abs().max() > 1e-2)
    assert differs_from_raw


def test_greedy_equals_hf_engine_greedy(engine, hf_pair):
    model, tok = hf_pair
    hf = HFRolloutEngine(model, tok, max_new_tokens=MAX_NEW)
    assert hf.stop_token_ids == engine.stop_token_ids
    ours, theirs = engine.greedy(PROMPTS), hf.greedy(PROMPTS)
    assert torch.equal(ours.responses, theirs.responses)
    assert torch.equal(ours.stop_token, theirs.stop_token)
    assert ours.texts == theirs.texts
    torch.testing.assert_close(ours.behav_logp, theirs.behav_logp, atol=2e-4, rtol=0)


def test_new_weights_load_in_place(engine, hf_pair, monkeypatch):
    model, tok = hf_pair
    # Small chunks: the update spans many collective_rpc calls, layers split across them.
    monkeypatch.setattr("services.rollout.vllm_weights.WEIGHT_CHUNK_BYTES", 64 << 10)
    llm = engine._llm
    digest0, greedy0 = engine.weights_digest(), engine.greedy(PROMPTS)

    new = build_model(tok, seed=1)
    engine.load_state_dict(new.state_dict(), version=7)
    assert engine._llm is llm  # same engine, not a restart
    assert engine.version == 7 and engine.weights_digest() != digest0
    greedy1 = engine.greedy(PROMPTS)
    assert greedy1.policy_version == 7
    assert not torch.equal(greedy1.responses, greedy0.responses)
    assert torch.equal(
        greedy1.responses,
        HFRolloutEngine(new, tok, max_new_tokens=MAX_NEW).greedy(PROMPTS).responses,
    )
    b = engine.generate(PROMPTS, n=G, seed=0)
    for row in range(len(b)):  # every tensor arrived: sampling log-probs match the new model
        k = int(b.response_lengths[row])
        ref = hf_logp(new, b.prompt_ids[row // b.n], b.responses[row, :k].tolist())
        torch.testing.assert_close(b.behav_logp[row, :k], ref, atol=2e-4, rtol=0)

    # A streamed subset: only the output projection changes, the rest stays the new model's.
    head = build_model(tok, seed=2).lm_head.weight.detach()
    engine.load_weights(iter([("lm_head.weight", head)]), version=8)
    with torch.no_grad():
        new.lm_head.weight.copy_(head)
    expected = HFRolloutEngine(new, tok, max_new_tokens=MAX_NEW).greedy(PROMPTS)
    assert torch.equal(engine.greedy(PROMPTS).responses, expected.responses) and engine.version == 8

    engine.load_state_dict(model.state_dict(), version=9)  # back to the original weights
    assert engine.weights_digest() == digest0
    assert torch.equal(engine.greedy(PROMPTS).responses, greedy0.responses)


def test_rejects_prompt_longer_than_the_engine(engine):
    long = Prompt("x", "12+34= " * 80, "1", "gsm8k")
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([long], n=1, seed=0)


def test_worker_renders_chat_prompts_and_skips_long_ones(engine, hf_pair):
    """The rollout worker drives the vLLM engine as it drives the HF one: the prompt encoded is
    the chat template's rendering, and prompts over max_prompt_tokens are skipped and counted."""
    from services.rollout.worker import RolloutWorker
    from services.tasks.prompting import PromptFormat
    from services.tasks.source import TaskSource

    _, tok = hf_pair
    long = Prompt("long", "Natalia sold clips to her friends " * 20, "1", "gsm8k")
    tasks = TaskSource(None, train=[*PROMPTS, long])
    fmt = PromptFormat("{question}\nPut the final answer after ####.", chat_template=True)
    worker = RolloutWorker(engine, tasks, 2, prompt_format=fmt, max_prompt_tokens=60)
    groups = []
    for seed in range(3):
        groups += worker.produce(4, seed)[0]
    assert len(groups) == 12 and worker.prompts_skipped_too_long > 0
    for g in groups:
        text = tok.decode(g.prompt.tolist(), skip_special_tokens=False)
        assert text.startswith("<|im_start|>user\n"), text
        assert text.endswith(
            "\nPut the final answer after ####.<|im_end|>\n<|im_start|>assistant\n"
        )
        assert len(g.prompt) <= 60 and g.prompt_id != "long"


def test_in_flight_load_between_steps_records_each_tokens_version(engine, hf_pair):
    """A load between engine steps pauses the requests (kept), swaps the weights and goes on:
    each row's tokens before the load are what the old weights sample without any load (same
    seeds), later tokens are labelled with the new version and come from the new weights."""
    model, tok = hf_pair
    engine.load_state_dict(model.state_dict(), version=20)
    plain = engine.generate(PROMPTS, n=G, seed=3)
    new = build_model(tok, seed=1)
    calls = {"n": 0}

    def load_new_after_three_steps() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            engine.load_state_dict(new.state_dict(), version=21)

    mixed = engine.generate(PROMPTS, n=G, seed=3, between_steps=load_new_after_three_steps)
    assert calls["n"] >= 3 and engine.version == 21
    assert mixed.policy_version == 20 and mixed.token_versions is not None
    switched = 0
    for row in range(len(mixed)):
        k = int(mixed.response_lengths[row])
        versions = mixed.token_versions[row, :k].tolist()
        old = versions.count(20)
        assert versions == [20] * old + [21] * (k - old)  # one switch, never back
        assert old >= 1  # the first tokens were sampled before the load
        assert mixed.responses[row, :old].tolist() == plain.responses[row, :old].tolist()
        torch.testing.assert_close(
            mixed.behav_logp[row, :old], plain.behav_logp[row, :old], atol=1e-5, rtol=0
        )
        switched += k > old
    assert switched > 0, "no response ran past the load"
    assert (mixed.token_versions[~mixed.response_mask] == 0).all()
    # After the round the engine samples the new weights from the start, unlabelled by the old.
    after = engine.generate(PROMPTS, n=G, seed=3)
    assert after.policy_version == 21 and after.token_versions is None
    engine.load_state_dict(model.state_dict(), version=0)  # as the other tests expect

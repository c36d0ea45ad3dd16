"""The vLLM engine with LoRA on, on the tiny Qwen2: every weight version is an adapter of its own
id, loaded from tensors in memory; a round runs under the adapter of the version it started
with, and an id goes once no round uses it.

The reference for a version is the HF model with that version's adapter merged into its
weights (PEFT's ``merge_and_unload``): vLLM's greedy tokens must equal it, and its log-probs of
sampled tokens must equal the merged model's within float32 noise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_vllm_engine import PROMPTS, hf_logp

from services.policy.lora import LoraConfig
from services.rollout.hf_engine import HFRolloutEngine
from services.rollout.vllm_engine import VLLMRolloutEngine
from services.rollout.vllm_lora import audit_errors

MAX_NEW = 12
G = 4
LORA = LoraConfig(rank=4, alpha=8.0)  # every attention and MLP projection


def adapter_version(model, seed: int) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A random adapter on ``model`` (large enough to change its greedy answers): its tensors
    under PEFT's saved names (the synced form), and a copy of ``model`` with it merged in."""
    import peft

    wrapped = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(
            r=LORA.rank, lora_alpha=LORA.alpha, target_modules=list(LORA.target_modules)
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    tensors = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(wrapped).items()}
    return tensors, wrapped.merge_and_unload().eval()


@pytest.fixture(scope="module")
def versions(hf_pair):
    model, _ = hf_pair
    return {v: adapter_version(model, seed=v) for v in (1, 2, 3)}


@pytest.fixture(scope="module")
def engine(model_dir, hf_pair):
    _, tok = hf_pair
    eng = VLLMRolloutEngine(
        model_dir,
        tok,
        max_new_tokens=MAX_NEW,
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        lora=LORA,
        lora_slots=2,
    )
    yield eng
    eng.shutdown()


def assert_is_version(engine, merged, tok, batch) -> None:
    """``batch``'s log-probs are ``merged``'s, and the engine's greedy answers are too."""
    for row in range(len(batch)):
        k = int(batch.response_lengths[row])
        ref = hf_logp(merged, batch.prompt_ids[row // batch.n], batch.responses[row, :k].tolist())
        torch.testing.assert_close(batch.behav_logp[row, :k], ref, atol=2e-4, rtol=0)
    ours = engine.greedy(PROMPTS)
    theirs = HFRolloutEngine(merged, tok, max_new_tokens=MAX_NEW).greedy(PROMPTS)
    assert torch.equal(ours.responses, theirs.responses)
    torch.testing.assert_close(ours.behav_logp, theirs.behav_logp, atol=2e-4, rtol=0)


def test_each_version_is_an_adapter_equal_to_its_merged_weights(engine, hf_pair, versions):
    model, tok = hf_pair
    base = engine.greedy(PROMPTS)  # no adapter yet: the base model
    assert torch.equal(
        base.responses,
        HFRolloutEngine(model, tok, max_new_tokens=MAX_NEW).greedy(PROMPTS).responses,
    )
    llm = engine._llm
    engine.load_state_dict(versions[1][0], version=1)  # the bytes path, in one piece
    assert engine.version == 1 and engine.adapters.book.current == (1, 1)
    b1 = engine.generate(PROMPTS, n=G, seed=0)
    assert b1.policy_version == 1 and b1.token_versions is None
    assert_is_version(engine, versions[1][1], tok, b1)
    g1 = engine.greedy(PROMPTS)
    assert not torch.equal(g1.responses, base.responses)  # the adapter changes the answers
    digest1 = engine.weights_digest()

    # In parts, as a receiver loads bucket by bucket.
    tensors = list(versions[2][0].items())
    engine.begin_update()
    assert engine.dirty
    for i in range(0, len(tensors), 5):
        engine.load_weights(iter(tensors[i : i + 5]), None)
    engine.finish_update(2)
    assert engine._llm is llm and not engine.dirty  # the same engine, never restarted
    assert engine.version == 2 and engine.weights_digest() != digest1
    b2 = engine.generate(PROMPTS, n=G, seed=0)
    assert_is_version(engine, versions[2][1], tok, b2)
    assert not torch.equal(engine.greedy(PROMPTS).responses, g1.responses)
    # Version 1's id went as soon as no round used it; only the newest stays.
    assert set(engine.llm_engine.list_loras()) == {2}
    events = engine.report()["lora_audit"]
    assert {"event": "remove", "version": 1, "adapter_id": 1} in events
    assert not audit_errors(events)


def test_a_round_keeps_its_adapter_through_an_in_flight_load(engine, hf_pair, versions):
    """A version loaded between decoding steps serves the next round: every token of the round
    comes from the adapter it started with, whose id stays until the round ends."""
    _, tok = hf_pair
    engine.load_state_dict(versions[1][0], version=10)
    plain = engine.generate(PROMPTS, n=G, seed=3)
    held = engine.adapters.book.current[1]
    seen = []

    def load_after_two_steps() -> None:
        seen.append(set(engine.llm_engine.list_loras()))
        if len(seen) == 2:
            engine.load_state_dict(versions[3][0], version=11)

    mixed = engine.generate(PROMPTS, n=G, seed=3, between_steps=load_after_two_steps)
    assert len(seen) > 2 and engine.version == 11
    new = engine.adapters.book.current[1]
    # During the round, after the load: the round's adapter and the new one, both resident.
    assert seen[-1] == {held, new}
    assert mixed.policy_version == 10 and mixed.token_versions is None
    assert torch.equal(mixed.responses, plain.responses)  # same seeds, same adapter
    torch.testing.assert_close(mixed.behav_logp, plain.behav_logp, atol=1e-5, rtol=0)
    assert set(engine.llm_engine.list_loras()) == {new}  # the round's id went with the round
    after = engine.generate(PROMPTS, n=G, seed=3)
    assert after.policy_version == 11
    assert_is_version(engine, versions[3][1], tok, after)

    events = engine.report()["lora_audit"]
    assert not audit_errors(events)
    order = [(e["event"], e["adapter_id"]) for e in events]
    # The round under the held id was recorded before that id was removed.
    assert order.index(("remove", held)) > max(
        i for i, (what, a) in enumerate(order) if what == "round" and a == held
    )
    first = next(e for e in events if e["event"] == "round" and e["adapter_id"] == new)
    assert first["version"] == 11 and first["sample"]["version"] == 11


def test_a_full_state_dict_is_refused_under_lora(engine, hf_pair):
    model, _ = hf_pair
    version = engine.version
    with pytest.raises(Exception, match="not a LoRA adapter tensor"):
        engine.load_state_dict(model.state_dict(), version=99)
    assert engine.version == version  # nothing changed; the engine still generates
    assert engine.generate(PROMPTS[:1], n=1, seed=0).policy_version == version


def test_adapters_broadcast_into_the_workers_load_by_version(engine, hf_pair, versions, tmp_path):
    """The collective transport under LoRA: the workers receive the adapter's buckets
    themselves (small buckets: a version spans several), stage them and register the version
    as a new id; a late joiner's catch-up file loads the same way."""
    from test_weight_group import _publish_async, _receive

    from services.rollout.vllm_weights import EngineWeightReceiver, WeightGroupOptions
    from services.weightsync.collective import CollectivePublisher

    _, tok = hf_pair
    pub = CollectivePublisher(bucket_bytes=16 << 10, catchup_dir=tmp_path, keep_last=10)
    receiver = None
    try:
        pub.publish(30, versions[2][0])  # nobody in the group yet: only the catch-up file
        pub.flush()
        options = WeightGroupOptions(pub.address, catchup_dir=tmp_path, digest=True)
        receiver = EngineWeightReceiver.join(engine, "rollout-0", options)
        assert _receive(receiver) == 30 and engine.version == 30
        assert_is_version(engine, versions[2][1], tok, engine.generate(PROMPTS, n=G, seed=1))
        join = _publish_async(pub, 31, versions[3][0])
        assert _receive(receiver) == 31
        join()
        assert engine.version == 31 and set(engine.llm_engine.list_loras()) == {
            engine.adapters.book.current[1]
        }
        assert_is_version(engine, versions[3][1], tok, engine.generate(PROMPTS, n=G, seed=1))
        # The digest the worker took after the broadcast is the adapter the bytes path gives.
        engine.load_state_dict(versions[3][0], version=32)
        assert receiver.digests[31] == engine.weights_digest()
        assert not audit_errors(engine.report()["lora_audit"])
    finally:
        if receiver is not None:
            receiver.close()
        pub.close()


def test_an_adapter_directory_we_write_loads_by_path_in_vllm(engine, hf_pair, versions, tmp_path):
    """A LoRA version's PEFT directory (what the catch-up files and the files transport write
    beside each version, and what engines that load adapters by path would read) goes through
    vLLM's own path loader and runs exactly as the same version loaded from memory, which is
    its merged weights."""
    from vllm.lora.request import LoRARequest

    from learner.export_lora import adapter_config
    from services.policy.lora import apply_lora
    from services.weightsync.files import adapter_dir, write_version

    model, tok = hf_pair
    config = adapter_config(apply_lora(copy.deepcopy(model), LORA))
    write_version(tmp_path, 7, versions[3][0], "unchecked", keep_last=1, adapter_config=config)
    engine.load_state_dict(versions[3][0], version=7)  # the same version, from memory
    from_memory = engine.greedy(PROMPTS)

    request = LoRARequest("by-path-v7", 1000, str(adapter_dir(tmp_path, 7)))
    prompts = [{"prompt_token_ids": ids} for ids in engine.encode_prompts(PROMPTS)]
    params = [engine._params(1, 0.0, 1.0, None) for _ in prompts]
    try:
        outputs = engine._llm.generate(prompts, params, use_tqdm=False, lora_request=request)
        by_path = engine._collect(outputs, 1, 7)
        assert 1000 in engine.llm_engine.list_loras()  # vLLM read the directory itself
    finally:
        engine.llm_engine.remove_lora(1000)
    assert torch.equal(by_path.responses, from_memory.responses)
    torch.testing.assert_close(by_path.behav_logp, from_memory.behav_logp, atol=1e-5, rtol=0)
    merged = HFRolloutEngine(versions[3][1], tok, max_new_tokens=MAX_NEW).greedy(PROMPTS)
    assert torch.equal(by_path.responses, merged.responses)


def test_a_request_under_a_removed_id_fails_instead_of_running(engine):
    """The guard behind the book: vLLM reads an adapter's path only for an id its cache lacks,
    and ours names none, so a request under an id that was removed fails loudly; it never runs
    on the base or on another version. (It kills the engine: this test runs last.)"""
    from services.rollout.vllm_lora import adapter_request

    version, adapter_id = engine.adapters.book.current
    engine.llm_engine.remove_lora(adapter_id)
    ids = engine.encode_prompts(PROMPTS[:1])
    params = engine._params(1, 0.0, 1.0, None)
    with pytest.raises(Exception):  # noqa: B017 (vLLM's engine error, whichever class it is)
        engine._llm.generate(
            [{"prompt_token_ids": ids[0]}],
            params,
            use_tqdm=False,
            lora_request=adapter_request(version, adapter_id),
        )

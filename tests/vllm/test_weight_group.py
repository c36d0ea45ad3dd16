"""Weights straight into vLLM's workers: each worker joins the learner's broadcast group (gloo on
CPU) and receives the buckets into its own parameters, while ``collective_rpc`` carries only
names and numbers.

What must hold: no tensor (and no tensor-sized bytes) passes through ``collective_rpc`` on this
path, while the bytes path moves the whole model through it; the engine's live weights after a
broadcast equal those after loading the same state dict through the bytes path (sha256 of every
parameter); greedy output follows the new weights; a late joiner catches up from the catch-up
files; a rewind (an older version republished) loads; the engine is never restarted.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from tiny_qwen import build_model

from services.rollout.vllm_engine import VLLMRolloutEngine
from services.rollout.vllm_weights import EngineWeightReceiver, WeightGroupOptions
from services.tasks.base import Prompt
from services.weightsync.collective import CollectivePublisher

PROMPTS = [Prompt("p0", "12+34=", "46", "gsm8k"), Prompt("p1", "How many clips", "72", "gsm8k")]


class RpcSpy:
    """Wraps ``LLM.collective_rpc`` and records each call's method and pickled argument size,
    and whether any argument holds a tensor."""

    def __init__(self, llm) -> None:
        self.llm, self.inner, self.calls = llm, llm.collective_rpc, []
        llm.collective_rpc = self

    def __call__(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(
            (method, len(pickle.dumps((args, kwargs))), _holds_tensor((args, kwargs)))
        )
        return self.inner(method, timeout=timeout, args=args, kwargs=kwargs)

    def restore(self) -> None:
        self.llm.collective_rpc = self.inner


def _holds_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_holds_tensor(v) for v in obj)
    return False


@pytest.fixture(scope="module")
def engine(model_dir, hf_pair) -> Iterator[VLLMRolloutEngine]:
    _, tok = hf_pair
    eng = VLLMRolloutEngine(
        model_dir, tok, max_new_tokens=8, dtype="float32", enforce_eager=True, max_model_len=128
    )
    yield eng
    eng.shutdown()


def _publish_async(pub: CollectivePublisher, version: int, weights, rewind=False):
    """Publish in a thread (a broadcast blocks until every member receives); returns the join."""
    errors: list[BaseException] = []

    def go() -> None:
        try:
            pub.publish(version, weights, rewind=rewind)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(timeout=120)
        assert not thread.is_alive(), "publish did not finish"
        assert not errors, errors

    return join


def _receive(receiver, deadline_s: float = 120.0) -> int:
    deadline = time.monotonic() + deadline_s
    while not receiver.has_update():
        assert time.monotonic() < deadline, "no update arrived"
        time.sleep(0.05)
    version = receiver.receive()
    assert version is not None
    return version


def test_buckets_land_in_the_workers_and_no_tensor_crosses_collective_rpc(
    engine, hf_pair, tmp_path
):
    model, _ = hf_pair
    digest0, greedy0 = engine.weights_digest(), engine.greedy(PROMPTS)
    new = build_model(hf_pair[1], seed=1)
    # The reference: the same weights through the bytes path, then back to the originals.
    engine.load_state_dict(new.state_dict(), version=1)
    digest_new, greedy_new = engine.weights_digest(), engine.greedy(PROMPTS)
    assert digest_new != digest0 and greedy_new.texts != greedy0.texts
    engine.load_state_dict(model.state_dict(), version=0)
    assert engine.weights_digest() == digest0

    catchup = tmp_path / "catchup"
    pub = CollectivePublisher(bucket_bytes=1 << 20, catchup_dir=catchup, keep_last=10)
    spy = RpcSpy(engine._llm)
    try:
        receiver = EngineWeightReceiver.join(
            engine, "rollout-0", WeightGroupOptions(pub.address, catchup_dir=catchup, digest=True)
        )
        join = _publish_async(pub, 5, new.state_dict())
        assert _receive(receiver) == 5
        join()
    finally:
        spy.restore()
    assert engine.version == 5 and receiver.version == 5
    # The live weights are exactly those of the bytes path, and generation follows them.
    assert receiver.digests[5] == digest_new == engine.weights_digest()
    assert engine.greedy(PROMPTS).texts == greedy_new.texts
    # Only metadata went through collective_rpc: no tensor, no call over 4 KiB.
    methods = {m for m, _, _ in spy.calls}
    assert {"d3s_join_weight_group", "d3s_weights_has_update", "d3s_weights_receive"} <= methods
    assert not any(holds for _, _, holds in spy.calls)
    model_bytes = sum(t.numel() * t.element_size() for t in new.state_dict().values())
    assert max(size for _, size, _ in spy.calls) < 4096 < model_bytes

    # The bytes path, for contrast, moves the whole model through collective_rpc.
    spy = RpcSpy(engine._llm)
    try:
        engine.load_state_dict(new.state_dict(), version=6)
    finally:
        spy.restore()
    assert sum(size for _, size, _ in spy.calls) > model_bytes

    # A rewind (a resumed learner republishes an older version's weights) loads as well.
    join = _publish_async(pub, 3, model.state_dict(), rewind=True)
    assert _receive(receiver) == 3
    join()
    assert engine.weights_digest() == digest0 == receiver.digests[3]
    receiver.close()
    pub.close()


def test_a_late_joiner_loads_the_catch_up_files_then_receives_broadcasts(engine, hf_pair, tmp_path):
    model, tok = hf_pair
    catchup = tmp_path / "catchup"
    pub = CollectivePublisher(bucket_bytes=1 << 20, catchup_dir=catchup, keep_last=10)
    v1, v2 = build_model(tok, seed=11), build_model(tok, seed=12)
    pub.publish(1, v1.state_dict())  # nobody in the group yet: only the catch-up files
    pub.flush()
    engine.load_state_dict(v1.state_dict(), version=-1)
    digest_v1 = engine.weights_digest()
    engine.load_state_dict(model.state_dict(), version=0)

    options = WeightGroupOptions(pub.address, catchup_dir=catchup, digest=True)
    receiver = EngineWeightReceiver.join(engine, "rollout-late", options)
    assert _receive(receiver) == 1  # from the files, before any broadcast
    assert engine.weights_digest() == digest_v1 == receiver.digests[1]
    join = _publish_async(pub, 2, v2.state_dict())  # the join makes this publish regroup
    assert _receive(receiver) == 2
    join()
    engine.load_state_dict(v2.state_dict(), version=2)
    assert receiver.digests[2] == engine.weights_digest()
    receiver.close()
    pub.close()

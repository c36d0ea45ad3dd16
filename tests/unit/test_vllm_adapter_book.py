"""The vLLM engine's adapter bookkeeping under LoRA (no vLLM needed): which ids may go, and the
audit that shows no round ran under an id that was gone."""

from __future__ import annotations

import pytest

from services.policy.lora import LoraConfig
from services.rollout.vllm_lora import (
    AdapterBook,
    audit_errors,
    lora_engine_kwargs,
    vllm_max_rank,
)


def test_max_rank_rounds_up_to_one_vllm_accepts():
    assert [vllm_max_rank(r) for r in (1, 2, 8, 9, 32, 33, 512)] == [1, 8, 8, 16, 32, 64, 512]
    with pytest.raises(ValueError, match="learner.lora.rank"):
        vllm_max_rank(513)


def test_engine_kwargs_give_a_slot_per_admissible_version_and_one_to_load_into():
    kw = lora_engine_kwargs(LoraConfig(rank=12), slots=3)
    assert kw == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 3, "max_cpu_loras": 4}
    with pytest.raises(ValueError, match="slots"):
        lora_engine_kwargs(LoraConfig(), slots=0)


def test_an_id_goes_once_it_is_neither_newest_nor_in_use():
    book = AdapterBook()
    assert book.acquire() is None  # before any adapter: the base model
    book.release(None, requests=2)
    book.add(0, 1)
    held = book.acquire()
    assert held == (0, 1)
    book.add(1, 2)  # loaded while a round runs under id 1
    assert book.removable() == []
    book.release(held, requests=4, sample={"tokens": [1]})
    assert book.removable() == [1]
    book.removed(1)
    assert book.live == {2: 1}
    with pytest.raises(RuntimeError, match="registered twice"):
        book.add(5, 2)
    events = list(book.events)
    assert not audit_errors(events)
    assert [e["event"] for e in events] == ["round", "add", "add", "round", "remove"]


def test_removing_an_id_in_use_is_refused():
    book = AdapterBook()
    book.add(0, 1)
    book.acquire()
    book.add(1, 2)
    with pytest.raises(RuntimeError, match="while a round uses it"):
        book.removed(1)


def test_only_the_first_round_under_an_id_keeps_its_sample():
    book = AdapterBook()
    book.add(0, 1)
    for i in range(3):
        book.release(book.acquire(), requests=1, sample={"i": i})
    samples = [e["sample"] for e in book.events if e["event"] == "round"]
    assert samples == [{"i": 0}, None, None]


def test_audit_catches_a_round_under_a_removed_or_unknown_id():
    add = {"event": "add", "version": 0, "adapter_id": 1}
    gone = {"event": "remove", "version": 0, "adapter_id": 1}
    late = {"event": "round", "version": 0, "adapter_id": 1, "requests": 1, "sample": None}
    stray = {**late, "adapter_id": 7}
    assert audit_errors([add, late, gone]) == []
    assert audit_errors([add, gone, late]) == [
        "a round (version 0) ran under adapter id 1, not live"
    ]
    assert audit_errors([stray]) == ["a round (version 0) ran under adapter id 7, not live"]
    assert audit_errors([add, gone, add]) == ["adapter id 1 added twice"]

"""The rollout actor loop against a real Redis, with weights through the files transport (no
Ray): backpressure, lock-step generation in sync mode, weights taken while waiting, a learner's
rewind, and a corrupted weight sync stopping the run."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch

from services.policy.model import PolicySpec, build_policy, load_policy, save_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.actor import RolloutActor, groups_per_round
from services.run.build_rollout import build_worker
from services.run.config import RunConfig, parse_config
from services.transport.bundle import Transport
from services.transport.records import ScoredGroup, decode
from services.weightsync.checksum import WeightSyncError
from services.weightsync.files import FilesPublisher, FilesReceiver, version_file

pytestmark = pytest.mark.integration


class Weights:
    """The learner's side: versions of one model's weights published as safetensors files;
    ``corrupt`` overwrites part of each file after it was written (what the actor reads then
    differs from what the learner checksummed)."""

    def __init__(self, model: torch.nn.Module, directory: Path, corrupt: bool = False) -> None:
        self.model, self.directory, self.corrupt = model, directory, corrupt
        self.publisher = FilesPublisher(directory, keep_last=2)
        self.publish(0)

    def publish(self, version: int, rewind: bool = False) -> None:
        self.publisher.publish(version, self.model.state_dict(), rewind=rewind)
        if self.corrupt:
            path = version_file(self.directory, version)
            raw = bytearray(path.read_bytes())
            header = 8 + int.from_bytes(raw[:8], "little")
            middle = header + (len(raw) - header) // 2
            raw[middle : middle + 256] = b"A" * 256
            path.write_bytes(bytes(raw))

    def receiver(self) -> FilesReceiver:
        return FilesReceiver(self.directory, timeout_s=5)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    tok = CharTokenizer()
    model = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), tok)
    path = save_policy(model, tok, tmp_path_factory.mktemp("policy"))
    return path, model


def make_cfg(mode: str = "async") -> RunConfig:
    return parse_config(
        {
            "task": {"type": "arithmetic", "digits": 1},
            "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "num_actors": 1},
            "train": {"total_steps": 100},
            "service": {"mode": mode, "max_group_backlog": 4, "wait_timeout_s": 20},
        }
    )


def make_actor(cfg: RunConfig, transport: Transport, weights: Weights, path: Path) -> RolloutActor:
    model, tok = load_policy(path)
    worker = build_worker(cfg, model, tok, "rollout-0")
    # Look for weights at every decoding step: the tests publish at a chosen step.
    return RolloutActor(
        cfg.rollout_settings(), transport, weights.receiver(), worker, 0, inflight_check_s=0.0
    )


def groups(t: Transport) -> list[ScoredGroup]:
    out = [decode(f) for _, f in t.client.xrange(t.keys.groups, "-", "+")]
    assert all(isinstance(g, ScoredGroup) for g in out)
    return out  # type: ignore[return-value]


def start(actor: RolloutActor, stop: threading.Event) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["report"] = actor.run(should_stop=stop.is_set)
        except Exception as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def wait_until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_shares_of_a_step_add_up() -> None:
    assert [groups_per_round(10, 3, i) for i in range(3)] == [4, 3, 3]
    assert [groups_per_round(2, 3, i) for i in range(3)] == [1, 1, 1]  # at least one each


def test_backpressure_stops_generation_at_the_bound(
    transport: Transport, policy, tmp_path: Path
) -> None:
    path, model = policy
    stop = threading.Event()
    actor = make_actor(make_cfg(), transport, Weights(model, tmp_path), path)
    thread, result = start(actor, stop)
    wait_until(lambda: transport.queue.backlog(transport.keys.groups) >= 4)
    time.sleep(0.5)  # time enough for several more rounds, were it not waiting
    assert transport.queue.backlog(transport.keys.groups) == 4
    stop.set()
    thread.join(10)
    assert result["report"]["groups_published"] == 4 == transport.state.stats()["groups_written"]
    assert result["report"]["versions_loaded"] == [0]


def test_sync_mode_generates_one_round_per_weight_version(
    transport: Transport, policy, tmp_path: Path
) -> None:
    path, model = policy
    cfg = make_cfg("sync").model_copy(
        update={"service": make_cfg("sync").service.model_copy(update={"max_group_backlog": 100})}
    )
    store = Weights(model, tmp_path)
    stop = threading.Event()
    actor = make_actor(cfg, transport, store, path)
    thread, result = start(actor, stop)
    wait_until(lambda: len(groups(transport)) >= 4)
    time.sleep(0.5)
    assert len(groups(transport)) == 4  # waits for the learner's next version
    store.publish(1)
    wait_until(lambda: len(groups(transport)) >= 8)
    time.sleep(0.5)
    assert len(groups(transport)) == 8
    # A skipped batch (no signal) leaves the version where it was: one more round from it.
    transport.client.hincrby(transport.keys.stats, "batches_skipped", 1)
    wait_until(lambda: len(groups(transport)) >= 12)
    time.sleep(0.5)
    stop.set()
    thread.join(10)
    assert [g.policy_version for g in groups(transport)] == [0] * 4 + [1] * 8
    assert transport.state.loaded_versions("rollout-0") == [0, 1]
    beat = transport.state.heartbeats()["rollout-0"]
    assert (beat["weight_version"], beat["rounds"], beat["groups_published"]) == (1, 3, 12)
    assert result["report"]["rounds"] == 3


def test_a_corrupted_weight_sync_stops_the_run(
    transport: Transport, policy, tmp_path: Path
) -> None:
    path, model = policy
    actor = make_actor(make_cfg(), transport, Weights(model, tmp_path, corrupt=True), path)
    with pytest.raises(WeightSyncError, match="version 0 arrived corrupted"):
        actor.run()
    assert transport.queue.backlog(transport.keys.groups) == 0  # nothing generated with bad weights
    reason = transport.control.stop_reason()
    assert reason is not None and "rollout-0" in reason and "corrupted" in reason


def test_admission_waits_for_weights_fresh_enough_to_be_trained(
    transport: Transport, policy, tmp_path: Path
) -> None:
    # The selector builds step 2 next and nothing is queued: with max_staleness 0 a round from
    # version 0 would be dropped as stale, so the actor waits for version 2 instead.
    path, model = policy
    cfg = make_cfg()
    cfg = cfg.model_copy(update={"service": cfg.service.model_copy(update={"max_staleness": 0})})
    transport.state.write_schedule({"step": 2})
    store = Weights(model, tmp_path)
    stop = threading.Event()
    actor = make_actor(cfg, transport, store, path)
    thread, result = start(actor, stop)
    time.sleep(1.0)
    assert groups(transport) == []  # nothing generated that would be thrown away
    store.publish(1)
    time.sleep(0.7)
    assert groups(transport) == []  # still one version short
    store.publish(2)
    wait_until(lambda: len(groups(transport)) >= 4)
    stop.set()
    thread.join(10)
    assert {g.policy_version for g in groups(transport)} == {2}
    assert result["report"]["admission_wait_seconds"] > 1.0


def test_weights_are_taken_while_waiting_and_a_rewind_is_loaded(
    transport: Transport, policy, tmp_path: Path
) -> None:
    # The actor sits in its backpressure wait (the queue is full) and still loads each version
    # the learner publishes (a collective publish would block until it did), including an
    # older version republished by a resumed learner.
    path, model = policy
    store = Weights(copy.deepcopy(model), tmp_path)  # its weights change below
    stop = threading.Event()
    actor = make_actor(make_cfg(), transport, store, path)
    thread, result = start(actor, stop)
    wait_until(lambda: transport.queue.backlog(transport.keys.groups) >= 4)
    store.publish(1)
    wait_until(lambda: transport.state.loaded_versions("rollout-0") == [0, 1])
    with torch.no_grad():
        for p in store.model.parameters():
            p.add_(0.25)
    store.publish(0, rewind=True)
    wait_until(lambda: transport.state.loaded_versions("rollout-0") == [0, 1, 0])
    held = actor.worker.engine.model.state_dict()
    for name, value in store.model.state_dict().items():
        assert torch.equal(held[name], value.to(held[name].dtype)), name
    assert transport.queue.backlog(transport.keys.groups) == 4  # nothing generated meanwhile
    stop.set()
    thread.join(10)
    assert "error" not in result and result["report"]["version"] == 0


def test_in_flight_updates_load_between_decoding_steps_and_defer_a_rewind(
    transport: Transport, policy, tmp_path: Path
) -> None:
    # Version 1 is published during the first round, after its second decoding step: the actor
    # loads it there and the round's later tokens record version 1. A rewind published during
    # the second round waits for the round's end (a response's versions never go back).
    path, model = policy
    base = make_cfg()
    cfg = base.model_copy(
        update={
            "rollout": base.rollout.model_copy(
                update={"inflight_updates": True, "max_new_tokens": 8}
            ),
            "service": base.service.model_copy(update={"max_group_backlog": 100}),
        }
    )
    store = Weights(copy.deepcopy(model), tmp_path)
    stop = threading.Event()
    actor = make_actor(cfg, transport, store, path)
    between = actor._sync_in_flight
    seen = {"calls": 0, "rewound": False}

    def publishing_mid_round() -> None:
        seen["calls"] += 1
        if actor.rounds == 0 and seen["calls"] == 2:
            with torch.no_grad():
                for p in store.model.parameters():
                    p.add_(0.1)
            store.publish(1)
        elif actor.rounds == 1 and not seen["rewound"]:
            seen["rewound"] = True
            store.publish(0, rewind=True)
        between()

    actor._sync_in_flight = publishing_mid_round  # type: ignore[method-assign]
    thread, result = start(actor, stop)
    wait_until(lambda: len(groups(transport)) >= 8)
    stop.set()
    thread.join(10)
    assert "error" not in result
    first, second = groups(transport)[:4], groups(transport)[4:8]
    assert {g.policy_version for g in first} == {0}
    straddling = [g for g in first if g.token_versions is not None]
    assert straddling, "no response of the first round ran past the in-flight load"
    for g in straddling:
        for row, k in zip(g.token_versions, g.response_lengths, strict=True):
            assert row[: min(k, 2)].tolist() == [0] * min(k, 2)
            assert row[2:k].tolist() == [1] * max(k - 2, 0)
    # The second round started on version 1 and kept it: the rewind waited for its end.
    assert {g.policy_version for g in second} == {1}
    assert all(g.token_versions is None for g in second)
    assert transport.state.loaded_versions("rollout-0")[:3] == [0, 1, 0]
    assert result["report"]["inflight_loads"] == 1

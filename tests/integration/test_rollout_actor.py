"""The rollout actor loop against a real Redis (weights from a stand-in store, no Ray):
backpressure, lock-step generation in sync mode, and a corrupted weight sync stopping the run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from services.policy.model import PolicySpec, build_policy, load_policy, save_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.actor import RolloutActor, groups_per_round
from services.run.components import build_worker
from services.run.config import RunConfig, parse_config
from services.transport.bundle import Transport
from services.transport.records import ScoredGroup, decode
from services.weightsync.checksum import WeightSyncError, state_checksum

pytestmark = pytest.mark.integration


class FakeStore:
    """Versions of one model's weights, optionally with a wrong checksum."""

    def __init__(self, model: torch.nn.Module, corrupt: bool = False) -> None:
        self.model = model
        self.version = 0
        self.corrupt = corrupt

    def latest_version(self) -> int:
        return self.version

    def fetch(self) -> tuple[int, dict[str, torch.Tensor], str]:
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        digest = state_checksum(state)
        if self.corrupt:
            # What the actor receives differs from what the learner checksummed.
            state["transformer.h.0.attn.c_attn.weight"][0, 0] += 1.0
        return self.version, state, digest


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    tok = CharTokenizer()
    model = build_policy(PolicySpec(n_layer=1, n_embd=16, n_head=2), tok)
    path = save_policy(model, tok, tmp_path_factory.mktemp("policy"))
    return path, model


def make_cfg(mode: str = "async") -> RunConfig:
    return parse_config({
        "task": {"type": "arithmetic", "digits": 1},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "num_actors": 1},
        "train": {"total_steps": 100},
        "service": {"mode": mode, "max_group_backlog": 4, "wait_timeout_s": 20},
    })  # fmt: skip


def make_actor(cfg: RunConfig, transport: Transport, store: FakeStore, path: Path) -> RolloutActor:
    model, tok = load_policy(path)
    worker = build_worker(cfg, model, tok, "rollout-0")
    return RolloutActor(cfg.rollout_settings(), transport, store, worker, 0)


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


def test_backpressure_stops_generation_at_the_bound(transport: Transport, policy) -> None:
    path, model = policy
    stop = threading.Event()
    actor = make_actor(make_cfg(), transport, FakeStore(model), path)
    thread, result = start(actor, stop)
    wait_until(lambda: transport.queue.backlog(transport.keys.groups) >= 4)
    time.sleep(0.5)  # time enough for several more rounds, were it not waiting
    assert transport.queue.backlog(transport.keys.groups) == 4
    stop.set()
    thread.join(10)
    assert result["report"]["groups_published"] == 4 == transport.state.stats()["groups_written"]
    assert result["report"]["versions_loaded"] == [0]


def test_sync_mode_generates_one_round_per_weight_version(transport: Transport, policy) -> None:
    path, model = policy
    cfg = make_cfg("sync").model_copy(update={"service": make_cfg("sync").service.model_copy(
        update={"max_group_backlog": 100})})
    store = FakeStore(model)
    stop = threading.Event()
    actor = make_actor(cfg, transport, store, path)
    thread, result = start(actor, stop)
    wait_until(lambda: len(groups(transport)) >= 4)
    time.sleep(0.5)
    assert len(groups(transport)) == 4  # waits for the learner's next version
    store.version = 1
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


def test_a_corrupted_weight_sync_stops_the_run(transport: Transport, policy) -> None:
    path, model = policy
    actor = make_actor(make_cfg(), transport, FakeStore(model, corrupt=True), path)
    with pytest.raises(WeightSyncError, match="version 0 arrived corrupted"):
        actor.run()
    assert transport.queue.backlog(transport.keys.groups) == 0  # nothing generated with bad weights
    reason = transport.control.stop_reason()
    assert reason is not None and "rollout-0" in reason and "corrupted" in reason


def test_admission_waits_for_weights_fresh_enough_to_be_trained(transport: Transport, policy) -> None:
    # The selector builds step 2 next and nothing is queued: with max_staleness 0 a round from
    # version 0 would be dropped as stale, so the actor waits for version 2 instead.
    path, model = policy
    cfg = make_cfg()
    cfg = cfg.model_copy(update={"service": cfg.service.model_copy(update={"max_staleness": 0})})
    transport.state.write_schedule({"step": 2})
    store = FakeStore(model)
    stop = threading.Event()
    actor = make_actor(cfg, transport, store, path)
    thread, result = start(actor, stop)
    time.sleep(1.0)
    assert groups(transport) == []  # nothing generated that would be thrown away
    store.version = 1
    time.sleep(0.7)
    assert groups(transport) == []  # still one version short
    store.version = 2
    wait_until(lambda: len(groups(transport)) >= 4)
    stop.set()
    thread.join(10)
    assert {g.policy_version for g in groups(transport)} == {2}
    assert result["report"]["admission_wait_seconds"] > 1.0

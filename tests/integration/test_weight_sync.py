"""Weight sync transports end to end: a learner process and rollout-engine processes on the tiny
GPT-2, full sha256 compares after every sync, corruption detected, restarted engines catch up;
the same with a LoRA adapter (the learner publishes the adapter alone; engines hold the same
base and fill their adapter). The files transport with a real LoRA learner is in
test_lora_weight_sync.py."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from learner.export_lora import adapter_config
from learner.weights import live_weights
from services.policy.lora import LoraConfig, adapter_bytes, apply_lora, is_lora, synced_state
from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer
from services.rollout.actor import EngineLoader
from services.rollout.hf_engine import HFRolloutEngine
from services.weightsync.checksum import WeightSyncError, sample_checksum, state_checksum
from services.weightsync.collective import CollectivePublisher, CollectiveReceiver
from services.weightsync.collective.buckets import plan_buckets
from services.weightsync.config import WeightSyncConfig
from services.weightsync.files import (
    FilesPublisher,
    FilesReceiver,
    adapter_dir,
    list_versions,
    read_version,
    version_file,
)

pytestmark = pytest.mark.integration

SPEC = PolicySpec(n_layer=2, n_embd=64, n_head=4, n_positions=32)
# 8 KiB buckets: the 2-layer model's ~30 tensors spread over many buckets, several per bucket
BUCKET_BYTES = 8 << 10
_CTX = mp.get_context(
    "fork"
)  # the parent holds no gloo state; forking skips a torch import per child


# GPT-2's linear layers; rank 4 gives a 32 KiB adapter: several 8 KiB buckets
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["c_attn", "c_proj", "c_fc"])


def _model(seed: int) -> torch.nn.Module:
    return build_policy(SPEC, CharTokenizer(), seed=seed)


def _lora_model(adapter_seed: int) -> torch.nn.Module:
    """The same base everywhere (it is never synced) with a fresh adapter drawn from
    ``adapter_seed`` (lora_A random; lora_B zero, so it is moved before anything is sent)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapter_seed)
        return apply_lora(_model(seed=0), LORA)


def _step(model: torch.nn.Module, version: int) -> None:
    """A stand-in optimizer step: every trained parameter (a LoRA model's adapter alone)
    moves, deterministically per version."""
    g = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)


def _synced(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a sync writes: a LoRA model's adapter (wire names), else the state dict."""
    return synced_state(model) if is_lora(model) else model.state_dict()


def _base_checksum(model: torch.nn.Module) -> str:
    return state_checksum({n: p for n, p in model.named_parameters() if not p.requires_grad})


ADAPTER_BYTES = adapter_bytes(_lora_model(adapter_seed=0), torch.float32)
FULL_BYTES = sum(t.numel() * t.element_size() for t in _model(seed=0).state_dict().values())


# ---- processes ---------------------------------------------------------------------------------


def _learner(conn: Any, catchup: str, lora: bool = False) -> None:
    torch.set_num_threads(1)
    try:
        model = _lora_model(adapter_seed=0) if lora else _model(seed=0)
        pub = CollectivePublisher(
            "127.0.0.1",
            0,
            bucket_bytes=BUCKET_BYTES,
            catchup_dir=catchup,
            catchup_every=1,
            # the broadcast to a killed engine fails at this timeout: a tiny model's live one
            # takes well under a second, so 15 s is ample even on a loaded box
            timeout_s=15,
            member_timeout_s=60,
            adapter_config=adapter_config(model),
        )
        conn.send(("address", pub.address))
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                pub.close()
                return
            version = cmd[1]
            _step(model, version)
            # what a ZeRO 0-2 learner hands a broadcast: the live weights, or the adapter alone
            weights = live_weights(model, torch.float32)
            seconds = pub.publish(version, weights)
            pub.flush()
            conn.send(
                (
                    "ok",
                    version,
                    state_checksum(_synced(model)),
                    seconds,
                    len(plan_buckets(dict(weights), BUCKET_BYTES)),
                    sum(t.numel() * t.element_size() for t in weights.values()),
                )
            )
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))


class _CorruptingReceiver(CollectiveReceiver):
    """Flips the second bucket of one version on arrival, as a bad link or a buggy copy would."""

    corrupt_version = -1

    def _on_bucket(self, version: int, index: int, flat: torch.Tensor) -> None:
        self.wire_bytes[version] = (
            self.wire_bytes.get(version, 0) + flat.numel() * flat.element_size()
        )
        if version == self.corrupt_version and index == 1:
            flat.mul_(-1.0)


def _engine(
    conn: Any, address: str, name: str, catchup: str, corrupt_version: int, lora: bool = False
) -> None:
    torch.set_num_threads(1)
    try:
        # different from the learner's until weights arrive (with LoRA: the adapter differs)
        model = _lora_model(adapter_seed=1) if lora else _model(seed=1)
        # a LoRA engine loads as the rollout actor does: the adapter by its wire names
        into: Any = EngineLoader(HFRolloutEngine(model, CharTokenizer())) if lora else model
        model = into.engine.model if lora else model
        # A tiny model's live broadcast takes well under a second: 10 s bounds any wait. (A
        # survivor of an abandoned broadcast learns of it from the store within a second.)
        recv = _CorruptingReceiver(address, name, catchup_dir=catchup, timeout_s=10)
        recv.corrupt_version, recv.wire_bytes = corrupt_version, {}
        conn.send(("ready", name, _base_checksum(model)))
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                recv.close()
                return
            target, deadline = cmd[1], time.monotonic() + 60
            while recv.version != target:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} stuck at version {recv.version}, want {target}")
                if recv.has_update():
                    recv.receive(into)
                else:
                    time.sleep(0.01)
            answer = (recv.version, state_checksum(_synced(model)), recv.generation)
            conn.send(("ok", *answer, recv.wire_bytes.get(target, 0), _base_checksum(model)))
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))


class _Proc:
    def __init__(self, target: Any, *args: Any) -> None:
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()  # only the child holds its end: its exit reads as EOF here

    def ask(self, *cmd: Any) -> None:
        self.conn.send(cmd)

    def answer(self, timeout: float = 90.0) -> tuple[Any, ...]:
        assert self.conn.poll(timeout), "no answer from a weight-sync process"
        try:
            got = self.conn.recv()
        except EOFError:  # it died without a word (poll is also true on a closed pipe)
            self.proc.join(5)
            raise AssertionError(
                f"a weight-sync process exited with code {self.proc.exitcode} before answering"
            ) from None
        if got[0] == "error" and got[1] != "WeightSyncError":
            raise AssertionError(f"{got[1]}: {got[2]}")
        return got

    def stop(self) -> None:
        """End the process whatever state it is in. A process that answered with an error is
        already on its way out: it may still be alive while its end of the pipe is gone, so
        the polite "stop" can meet a broken pipe; then it is waited for, terminated, killed."""
        if self.proc.is_alive():
            with contextlib.suppress(OSError, EOFError, ValueError):
                self.conn.send(("stop",))
            self.proc.join(10)
        for end in (self.proc.terminate, self.proc.kill):
            if not self.proc.is_alive():
                break
            end()
            self.proc.join(5)
        self.conn.close()


def _sync(
    learner: _Proc, engines: dict[str, _Proc], version: int
) -> tuple[str, dict[str, tuple[Any, ...]]]:
    """Publish ``version`` and wait until every engine holds it; the learner's full checksum
    and each engine's answer."""
    learner.ask("publish", version)
    for e in engines.values():
        e.ask("sync", version)
    got = learner.answer()
    assert got[0] == "ok", got
    return got[2], {name: e.answer() for name, e in engines.items()}


def _leaving(conn: Any) -> None:
    """A process on its way out, as an engine after its WeightSyncError answer: its end of the
    pipe is closed while it still runs for a moment."""
    conn.close()
    time.sleep(1.0)


def test_stop_ends_a_process_whose_pipe_is_already_gone() -> None:
    proc = _Proc(_leaving)
    assert proc.conn.poll(10)  # the closed far end reads as EOF: the pipe is gone
    assert proc.proc.is_alive()
    proc.stop()  # the "stop" meets a broken pipe; stop() waits the process out instead
    assert not proc.proc.is_alive() and proc.proc.exitcode == 0


# ---- collective ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_collective_broadcast_two_engines_restart_and_corruption(
    tmp_path: Path, lora: bool
) -> None:
    """Broadcast, a restarted engine's catch-up from the files, a group re-formed, a dead
    member dropped, a corrupted bucket caught; with LoRA every version (on the wire and in
    the catch-up files) is the adapter alone, the engines' base never changes, and each
    catch-up version is a PEFT adapter directory."""
    catchup = str(tmp_path / "catchup")
    learner = _Proc(_learner, catchup, lora)
    procs = [learner]
    try:
        kind, address = learner.answer()
        assert kind == "address"
        engines = {
            n: _Proc(_engine, address, n, catchup, 5, lora) for n in ("rollout-0", "rollout-1")
        }
        procs += engines.values()
        bases = {e.answer()[2] for e in engines.values()}
        assert len(bases) == 1  # the same frozen base in both (a full model has none)

        # two versions by broadcast: both engines hold exactly the learner's bytes
        for version in (1, 2):
            expected, answers = _sync(learner, engines, version)
            for name, ans in answers.items():
                assert ans[:3] == ("ok", version, expected), (
                    f"{name} after version {version}: {ans}"
                )
                if lora:  # the adapter alone on the wire; the base as it was
                    assert ans[4] <= 2 * ADAPTER_BYTES and ans[5] in bases, ans
        assert {a[3] for a in answers.values()} == {
            1
        }  # one generation, formed at the first publish

        # rollout-1 dies and restarts under the same name: it catches up from the files at once
        engines["rollout-1"].proc.kill()
        engines["rollout-1"].proc.join(5)
        engines["rollout-1"] = restarted = _Proc(_engine, address, "rollout-1", catchup, 5, lora)
        procs.append(restarted)
        assert restarted.answer()[0] == "ready"
        restarted.ask("sync", 2)
        ans = restarted.answer()
        assert ans[:3] == ("ok", 2, expected) and ans[3] == 0, f"catch-up from files: {ans}"
        assert ans[4] == 0  # nothing on the wire: all of it from the catch-up file

        # the next publish re-forms the group with the restarted engine in its old place
        expected, answers = _sync(learner, engines, 3)
        for name, ans in answers.items():
            assert ans[:3] == ("ok", 3, expected), f"{name}: {ans}"
            assert ans[3] == 2, f"{name} should be in generation 2: {ans}"

        # rollout-0 dies and nobody replaces it: the broadcast to it fails, the learner drops the
        # group and writes the version to the files, the survivor re-joins and loses nothing
        engines.pop("rollout-0").proc.kill()
        expected, answers = _sync(learner, engines, 4)
        assert answers["rollout-1"][:3] == ("ok", 4, expected), answers

        # a corrupted bucket on the wire stops the engine with a clear error
        learner.ask("publish", 5)
        engines["rollout-1"].ask("sync", 5)
        assert learner.answer()[0] == "ok"
        err = engines["rollout-1"].answer()
        assert err[0] == "error" and err[1] == "WeightSyncError", err
        assert "version 5 arrived corrupted" in err[2] and "broadcast" in err[2], err[2]
        if lora:
            _check_adapter_catchup(Path(catchup))
    finally:
        for p in procs:
            p.stop()


def _check_adapter_catchup(catchup: Path) -> None:
    """Each catch-up version kept holds the adapter alone, and is also a PEFT adapter
    directory: its config and the same file (a hard link, no second copy)."""
    assert ADAPTER_BYTES * 10 < FULL_BYTES  # 32,768 B against 416,256 B
    names = set(synced_state(_lora_model(adapter_seed=0)))
    versions = list_versions(catchup)
    assert versions and versions[-1] == 5
    for v in versions:
        tensors, _, aliases = read_version(catchup, v)
        assert set(tensors) == names and aliases == {}
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == ADAPTER_BYTES
        d = adapter_dir(catchup, v)
        config = json.loads((d / "adapter_config.json").read_text())
        assert config["r"] == LORA.rank and config["peft_type"] == "LORA"
        assert (d / "adapter_model.safetensors").stat().st_ino == version_file(
            catchup, v
        ).stat().st_ino
    assert sorted(p.name for p in catchup.iterdir() if p.name.startswith("adapter-v")) == [
        adapter_dir(catchup, v).name for v in versions
    ]


# ---- files --------------------------------------------------------------------------------------


def test_files_equality_late_joiner_pruning_and_corruption(tmp_path: Path) -> None:
    model = _model(seed=0)
    pub = FilesPublisher(tmp_path, keep_last=2)
    early, early_model = FilesReceiver(tmp_path, timeout_s=5), _model(seed=1)
    assert early.latest_version() == -1 and early.receive(early_model) is None
    for version in (1, 2, 3):
        _step(model, version)
        pub.publish(version, model.state_dict())
        assert early.receive(early_model) == version
        assert state_checksum(early_model.state_dict()) == state_checksum(model.state_dict())
    assert early.receive(early_model) is None  # nothing new
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        version_file(tmp_path, v).name for v in (2, 3)
    ]

    late, late_model = FilesReceiver(tmp_path, timeout_s=5), _model(seed=2)
    assert late.receive(late_model) == 3
    assert state_checksum(late_model.state_dict()) == state_checksum(model.state_dict())

    # a resumed learner republishes an older version: receivers follow it back
    pub.publish(2, model.state_dict(), rewind=True)
    assert late.latest_version() == 2 and late.receive(late_model) == 2

    # corrupted tensor bytes under intact metadata: the sampled checksum catches it
    path = version_file(tmp_path, 2)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["transformer.h.0.mlp.c_fc.weight"] = tensors["transformer.h.0.mlp.c_fc.weight"] * 0.5
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(WeightSyncError, match="version 2 arrived corrupted"):
        FilesReceiver(tmp_path, timeout_s=5).receive(_model(seed=3))
    # a truncated file is an error that names it, not a crash in the engine
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightSyncError, match="unreadable"):
        FilesReceiver(tmp_path, timeout_s=5).receive(_model(seed=3))


def test_bf16_model_travels_as_bf16_and_loads_exactly(tmp_path: Path) -> None:
    """A bf16 model keeps bf16 on the wire (auto); a forced bf16 wire into a float32 engine
    rounds once, and the engine's check accepts exactly those rounded values."""
    model = _model(seed=0).to(torch.bfloat16)
    FilesPublisher(tmp_path / "a").publish(1, model.state_dict())
    on_disk = load_file(str(version_file(tmp_path / "a", 1)))
    assert {t.dtype for t in on_disk.values()} == {torch.bfloat16}
    engine = _model(seed=1)  # float32
    assert FilesReceiver(tmp_path / "a").receive(engine) == 1
    assert all(
        torch.equal(engine.state_dict()[n], t.float()) for n, t in model.state_dict().items()
    )

    f32 = _model(seed=0)
    FilesPublisher(tmp_path / "b", wire=torch.bfloat16).publish(1, f32.state_dict())
    assert FilesReceiver(tmp_path / "b").receive(engine) == 1
    for n, t in f32.state_dict().items():
        assert torch.equal(engine.state_dict()[n], t.to(torch.bfloat16).float()), n


def test_sample_checksum_is_cheap_and_sensitive() -> None:
    big = {"w": torch.randn(4096, 1024), "b": torch.randn(1024)}
    base = sample_checksum(big)
    assert sample_checksum({k: v.clone() for k, v in big.items()}) == base
    assert sample_checksum({k: v.to(torch.float64) for k, v in big.items()}) == base  # dtype-blind
    assert sample_checksum({"w": big["w"] * -1, "b": big["b"]}) != base  # a flipped tensor
    assert sample_checksum({"w": big["w"][:-1], "b": big["b"]}) != base  # truncated
    assert sample_checksum({"w": big["w"], "b2": big["b"]}) != base  # renamed
    shifted = big["w"].reshape(-1).roll(1).reshape(4096, 1024)
    assert sample_checksum({"w": shifted, "b": big["b"]}) != base  # an offset error


def test_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="weight_sync.path"):
        WeightSyncConfig(transport="files")
    with pytest.raises(ValueError, match="bucket_mb"):
        WeightSyncConfig(bucket_mb=-1)
    cfg = WeightSyncConfig(
        transport="collective", path="/shared/w", bucket_mb=64, wire_dtype="bfloat16"
    )
    assert cfg.bucket_bytes == 64 << 20 and cfg.wire() is torch.bfloat16
    assert WeightSyncConfig().wire() is None


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_zero3_learner_is_gathered_and_sent_one_bucket_at_a_time(lora: bool):
    """Under ZeRO-3 the publisher gathers each bucket's parameters just before sending it: as
    many gathers as buckets, none holding the whole model, and the engine receives exactly the
    learner's weights (tied ones under both names); with LoRA exactly its adapter, gathered
    the same way, and nothing of the base."""
    import threading

    from learner.config import LearnerConfig
    from learner.engine import LearnerEngine
    from learner.weights import ZeroShardedWeights
    from services.weightsync.collective.buckets import plan_layout

    cfg = LearnerConfig(zero_stage=3, lr=1e-3, lora=LORA if lora else None)
    engine = LearnerEngine(_model(seed=0), cfg, 2)
    source = engine.device_weights()
    assert isinstance(source, ZeroShardedWeights)
    gathered: list[list[str]] = []
    inner = source.gather

    def spy(names):
        gathered.append(list(names))
        return inner(names)

    source.gather = spy  # type: ignore[method-assign]
    pub = CollectivePublisher(bucket_bytes=BUCKET_BYTES, catchup_every=0, timeout_s=60)
    receiver = CollectiveReceiver(pub.address, "engine-0", timeout_s=60)
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            pub.publish(1, source)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    while not receiver.has_update():
        time.sleep(0.01)
    got: dict[str, torch.Tensor] = {}
    # buckets are views into the receiver's two reused buffers: copy what is kept
    assert receiver.receive(lambda b: got.update({n: t.clone() for n, t in b.items()})) == 1
    thread.join(60)
    assert not thread.is_alive() and not errors, errors

    expected = engine.state_dict_cpu()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    if lora:  # the adapter alone, under PEFT's saved names
        assert set(got) == set(synced_state(_lora_model(adapter_seed=0)))
        assert sum(t.numel() * t.element_size() for t in got.values()) == ADAPTER_BYTES
    buckets = plan_layout(source.layout(), BUCKET_BYTES)
    assert len(gathered) == len(buckets) > 1
    assert [names for names in gathered] == [[n for n, _, _ in b.tensors] for b in buckets]
    assert max(map(len, gathered)) < len(source.layout())
    receiver.close()
    pub.close()


# ---- memory: a sync holds about two buckets, whatever the model's size ----------------------------

MEM_BUCKET = 4 << 20
MEM_TENSOR = 1 << 18  # float32 elements: 1 MiB tensors, four to a bucket


def _fixed_mmap_threshold() -> None:
    """Large blocks always come from mmap and go back to the OS when freed, so resident bytes
    follow what is allocated (glibc otherwise keeps freed blocks in a heap that stays
    resident)."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")


def _peak_reset() -> int:
    """Reset the peak resident set (VmHWM) and return the resident KiB now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _mem_state(mib: int) -> dict[str, torch.Tensor]:
    return {f"w{i:04d}": torch.zeros(MEM_TENSOR) for i in range(mib)}


def _mem_learner(conn: Any, mib: int, catchup: str | None) -> None:
    torch.set_num_threads(1)
    try:
        _fixed_mmap_threshold()
        state = _mem_state(mib)
        pub = CollectivePublisher(
            bucket_bytes=MEM_BUCKET,
            catchup_dir=catchup,
            catchup_every=1 if catchup else 0,
            timeout_s=60,
        )
        conn.send(("address", pub.address))
        base = _peak_reset()
        for version in (1, 2, 3):
            assert conn.recv() == ("publish", version)
            for t in state.values():
                t.add_(1.0)
            pub.publish(version, state)
            pub.flush()
            conn.send(("ok", version))
        ring = [b.numel() for b in pub._ring if b is not None]
        staging = [b.numel() for b in pub.catchup._staging if b is not None] if pub.catchup else []
        conn.send(("peak", (_status_kb("VmHWM") - base) << 10, ring, staging))
        pub.close()
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))


def _mem_engine(conn: Any, address: str, mib: int) -> None:
    torch.set_num_threads(1)
    try:
        _fixed_mmap_threshold()
        model = torch.nn.Module()
        for name, t in _mem_state(mib).items():
            model.register_buffer(name, t)
        recv = CollectiveReceiver(address, "rollout-0", timeout_s=60)
        conn.send(("ready",))  # joined: the first publish forms a group with it
        base = _peak_reset()
        deadline = time.monotonic() + 120
        while recv.version != 3:
            assert time.monotonic() < deadline, f"stuck at version {recv.version}"
            if recv.has_update():
                recv.receive(model)
            else:
                time.sleep(0.005)
        assert float(model.w0000[0]) == 3.0
        pool = [b.numel() for b in recv._pool]
        conn.send(("peak", (_status_kb("VmHWM") - base) << 10, pool))
        recv.close()
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))


def _extra_during_sync(mib: int, catchup: str | None) -> tuple[int, int, tuple[Any, ...]]:
    """(learner's, engine's) peak resident bytes above those before three syncs of a float32
    model of ``mib`` MiB, and the learner's answer."""
    learner = _Proc(_mem_learner, mib, catchup)
    procs = [learner]
    try:
        kind, address = learner.answer()
        assert kind == "address"
        engine = _Proc(_mem_engine, address, mib)
        procs.append(engine)
        assert engine.answer() == ("ready",)
        for version in (1, 2, 3):
            learner.ask("publish", version)
            assert learner.answer() == ("ok", version)
        lpeak = learner.answer()
        epeak = engine.answer()
        assert lpeak[0] == "peak" and epeak[0] == "peak", (lpeak, epeak)
        assert epeak[2] == [MEM_BUCKET, MEM_BUCKET]  # the receive pool: two buckets
        return lpeak[1], epeak[1], lpeak
    finally:
        for p in procs:
            p.stop()


# What a sync costs beyond its buffers: gloo's and the store's threads, the JSON header,
# sampled parts, the allocator's slack. Independent of the model's size.
MEM_CONSTANT = 24 << 20


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_sync_holds_two_buckets_on_each_side_whatever_the_model_size(tmp_path: Path) -> None:
    """Three versions of a 32 MiB and a 128 MiB model (4x apart) through 4 MiB buckets: the
    learner's and the engine's peak resident bytes grow by at most 2 buckets + a constant, the
    same for both sizes (a buffer per bucket, as before, would add the whole model: 128 MiB).
    With catch-up files the learner adds its two host staging buckets, no host copy."""
    small = _extra_during_sync(32, None)
    large = _extra_during_sync(128, None)
    for (learner, engine, answer), mib in ((small, 32), (large, 128)):
        assert answer[2] == [MEM_BUCKET, MEM_BUCKET], answer  # the learner's ring: two buckets
        assert learner <= 2 * MEM_BUCKET + MEM_CONSTANT, (mib, learner)
        assert engine <= 2 * MEM_BUCKET + MEM_CONSTANT, (mib, engine)
    # Independent of the model's size: 96 MiB more model moves the extra by at most a few
    # buckets' worth of allocator slack (8.4 MiB measured once on a loaded box), where one
    # held copy of the model would move it by 96 MiB.
    slack = 3 * MEM_BUCKET
    assert abs(large[0] - small[0]) < slack and abs(large[1] - small[1]) < slack, (
        small,
        large,
    )

    learner, engine, answer = _extra_during_sync(128, str(tmp_path / "catchup"))
    assert answer[3] == [MEM_BUCKET, MEM_BUCKET], answer  # two host staging buckets
    assert learner <= 4 * MEM_BUCKET + MEM_CONSTANT, learner
    assert engine <= 2 * MEM_BUCKET + MEM_CONSTANT, engine
    written = sorted((tmp_path / "catchup").glob("weights-v*.safetensors"))
    assert [p.name for p in written] == [
        "weights-v0000000002.safetensors",
        "weights-v0000000003.safetensors",
    ]
    tensors = load_file(str(written[-1]))
    assert len(tensors) == 128 and all(float(t[0]) == 3.0 for t in tensors.values())


def _cuda_learner(conn: Any, mib: int) -> None:
    try:
        torch.cuda.set_device(0)
        state = {n: t.cuda() for n, t in _mem_state(mib).items()}
        pub = CollectivePublisher(bucket_bytes=MEM_BUCKET, catchup_every=0, timeout_s=60)
        conn.send(("address", pub.address))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        assert conn.recv() == ("publish", 1)
        pub.publish(1, state)
        conn.send(("ok", 1))
        conn.send(("peak", torch.cuda.max_memory_allocated() - base, [], []))
        pub.close()
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))


def _cuda_engine(conn: Any, address: str, mib: int) -> None:
    try:
        torch.cuda.set_device(1)
        model = torch.nn.Module()
        for name, t in _mem_state(mib).items():
            model.register_buffer(name, t.cuda())
        recv = CollectiveReceiver(address, "rollout-0", device="cuda:1", timeout_s=60)
        conn.send(("ready",))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        while recv.version != 1:
            if recv.has_update():
                recv.receive(model)
            else:
                time.sleep(0.005)
        conn.send(("peak", torch.cuda.max_memory_allocated() - base, []))
        recv.close()
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two CUDA devices (an NCCL group has one rank per device)",
)
def test_a_cuda_sync_allocates_two_buckets_on_each_device_whatever_the_model_size() -> None:
    ctx = mp.get_context("spawn")  # CUDA does not survive a fork
    extras = []
    for mib in (32, 128):
        lconn, lchild = ctx.Pipe()
        learner = ctx.Process(target=_cuda_learner, args=(lchild, mib), daemon=True)
        learner.start()
        kind, address = lconn.recv()
        assert kind == "address"
        econn, echild = ctx.Pipe()
        engine = ctx.Process(target=_cuda_engine, args=(echild, address, mib), daemon=True)
        engine.start()
        assert econn.recv() == ("ready",)
        lconn.send(("publish", 1))
        assert lconn.recv() == ("ok", 1)
        lpeak, epeak = lconn.recv(), econn.recv()
        learner.join(30)
        engine.join(30)
        assert lpeak[0] == "peak" and epeak[0] == "peak", (lpeak, epeak)
        assert lpeak[1] <= 2 * MEM_BUCKET + (4 << 20), (mib, lpeak)
        assert epeak[1] <= 2 * MEM_BUCKET + (4 << 20), (mib, epeak)
        extras.append((lpeak[1], epeak[1]))
    assert extras[0] == extras[1], extras


# ---- a version that fails midway ------------------------------------------------------------------


class _CorruptAt(CollectiveReceiver):
    """Corrupts bucket ``index`` of ``version`` on arrival (after earlier buckets loaded)."""

    at = (-1, -1)

    def _on_bucket(self, version: int, index: int, flat: torch.Tensor) -> None:
        if (version, index) == self.at:
            flat.mul_(-1.0)


def _publish_in_thread(pub: CollectivePublisher, version: int, state: dict) -> Any:
    errors: list[BaseException] = []

    def go() -> None:
        try:
            pub.publish(version, state)
            pub.flush()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(60)
        assert not thread.is_alive() and not errors, errors

    return join


def _receive_into(recv: CollectiveReceiver, loader: Any) -> int | None:
    deadline = time.monotonic() + 60
    while not recv.has_update():
        assert time.monotonic() < deadline, "no update"
        time.sleep(0.01)
    return recv.receive(loader)


def test_a_bucket_corrupted_mid_version_leaves_no_engine_generating_from_half_a_model(
    tmp_path: Path,
) -> None:
    """Version 2's third bucket arrives corrupted, after two buckets already loaded into the
    engine's model: the receiver raises, the engine is marked dirty and refuses to generate
    (before a round and between two decoding steps), and the next receive restores it from
    the catch-up files to exactly the learner's version 2, after which it generates again."""
    from services.rollout.actor import EngineLoader
    from services.rollout.hf_engine import HFRolloutEngine
    from services.tasks.base import Prompt

    learner = _model(seed=0)
    engine = HFRolloutEngine(_model(seed=1), CharTokenizer(), max_new_tokens=4)
    prompts = [Prompt("p0", "1+2=", "3", "mixed")]
    catchup = tmp_path / "catchup"
    pub = CollectivePublisher(
        bucket_bytes=BUCKET_BYTES, catchup_dir=catchup, catchup_every=1, timeout_s=60
    )
    recv = _CorruptAt(pub.address, "rollout-0", catchup_dir=catchup, timeout_s=60)
    recv.at = (2, 2)
    assert len(plan_buckets(dict(learner.state_dict()), BUCKET_BYTES)) > 3

    _step(learner, 1)
    join = _publish_in_thread(pub, 1, learner.state_dict())
    assert _receive_into(recv, EngineLoader(engine)) == 1
    join()
    v1 = {n: t.clone() for n, t in learner.state_dict().items()}
    assert state_checksum(engine.model.state_dict()) == state_checksum(v1)
    engine.generate(prompts, 2, seed=0)  # a whole version: generates

    _step(learner, 2)
    join = _publish_in_thread(pub, 2, learner.state_dict())
    with pytest.raises(WeightSyncError, match="bucket 3 of .* was not loaded"):
        _receive_into(recv, EngineLoader(engine))
    join()  # the receiver drained the rest of the publish: the learner was not left waiting
    v2 = learner.state_dict()
    held = engine.model.state_dict()
    from_v2 = {n for n in v2 if torch.equal(held[n], v2[n]) and not torch.equal(v1[n], v2[n])}
    from_v1 = {n for n in v2 if torch.equal(held[n], v1[n]) and not torch.equal(v1[n], v2[n])}
    assert from_v2 and from_v1, "the failure should have come after part of version 2 loaded"
    assert recv.dirty and engine.dirty and engine.version == 1 and recv.version == 1
    with pytest.raises(RuntimeError, match="holds part of a weights version"):
        engine.generate(prompts, 2, seed=0)

    # A load between two decoding steps that fails midway ends the round at that step.
    engine.dirty = False
    steps: list[int] = []

    def failing_load() -> None:
        steps.append(1)
        engine.begin_update()  # a streamed update starts and never finishes

    with pytest.raises(RuntimeError, match="holds part of a weights version"):
        engine.generate(prompts, 2, seed=0, between_steps=failing_load)
    assert len(steps) == 1
    engine.dirty = True

    # The receiver restores itself from the catch-up file of version 2 (written after the
    # broadcast), and the engine generates again from whole weights. The failed publish was
    # drained, so it is not waited for again: the group survives (no re-join after a timeout).
    group = (recv.generation, recv._pg)
    assert recv.has_update()
    assert recv.receive(EngineLoader(engine)) == 2
    assert not recv.dirty and not engine.dirty and engine.version == 2
    assert state_checksum(engine.model.state_dict()) == state_checksum(v2)
    assert (recv.generation, recv._pg) == group
    engine.generate(prompts, 2, seed=0)

    # ...and the next version arrives over that group's broadcast, not from the files.
    _step(learner, 3)
    join = _publish_in_thread(pub, 3, learner.state_dict())
    assert _receive_into(recv, EngineLoader(engine)) == 3
    join()
    assert (recv.generation, recv._pg) == group and recv.catchup.version != 3
    assert state_checksum(engine.model.state_dict()) == state_checksum(learner.state_dict())
    recv.close()
    pub.close()


class _PeerDiesMidBroadcast(CollectivePublisher):
    """Publish ``fail_seq`` fails right after its header, where gloo raises on rank 0 when a
    member died mid-broadcast; the publisher's own failure path runs from there (the group is
    dropped, the version written to the catch-up files). The failed group stays alive, as it
    does while anything holds the exception's traceback (a log handler keeping records, a
    reference cycle), so its sockets stay open: the survivor cannot learn of the failure
    from a closed connection."""

    fail_seq = -1
    kept: Any = None

    def _send_buckets(self, pg: Any, out: Any, parts: dict[str, bytes]) -> float:
        if self.seq == self.fail_seq:
            self.kept = pg
            raise RuntimeError("Connection reset by peer (a member died mid-broadcast)")
        return super()._send_buckets(pg, out, parts)


def test_a_survivor_of_an_abandoned_broadcast_restores_itself_at_once(tmp_path: Path) -> None:
    """A member dies mid-broadcast: the learner abandons the broadcast, and the survivor, blocked
    waiting for a bucket that will never come, notices within a second (not at the group's
    timeout, two minutes here), restores the version from the catch-up files, and takes the
    next version by broadcast again, in a new generation."""
    learner, model = _model(seed=0), _model(seed=1)
    catchup = tmp_path / "catchup"
    pub = _PeerDiesMidBroadcast(
        bucket_bytes=BUCKET_BYTES, catchup_dir=catchup, catchup_every=1, timeout_s=120
    )
    recv = CollectiveReceiver(pub.address, "rollout-0", catchup_dir=catchup, timeout_s=120)

    _step(learner, 1)
    join = _publish_in_thread(pub, 1, learner.state_dict())
    assert _receive_into(recv, model) == 1
    join()
    generation = recv.generation

    _step(learner, 2)
    pub.fail_seq = 2
    join = _publish_in_thread(pub, 2, learner.state_dict())
    t0 = time.monotonic()
    while recv.version != 2:
        assert time.monotonic() - t0 < 30, f"the survivor is stuck at version {recv.version}"
        if recv.has_update():
            recv.receive(model)
        else:
            time.sleep(0.01)
    join()
    assert time.monotonic() - t0 < 30
    assert not recv.dirty and recv.catchup.version == 2
    assert state_checksum(model.state_dict()) == state_checksum(learner.state_dict())

    _step(learner, 3)
    join = _publish_in_thread(pub, 3, learner.state_dict())
    assert _receive_into(recv, model) == 3
    join()
    assert recv.generation > generation and recv.catchup.version == 2  # by broadcast
    assert state_checksum(model.state_dict()) == state_checksum(learner.state_dict())
    recv.close()
    pub.close()

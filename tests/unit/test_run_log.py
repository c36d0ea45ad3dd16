"""The run logger: one per-step row to metrics.jsonl, TensorBoard and an offline W&B run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from services.telemetry.run_log import RunLogger, read_metrics, scalars

ROWS = {
    1: {"reward_mean": 0.25, "loss": 0.5, "flag": True, "note": "warm", "grad_norm": math.nan},
    2: {"reward_mean": 0.5, "loss": 0.25, "heldout_accuracy": 0.125, "eval_step": 2},
    3: {"reward_mean": 0.75, "loss": math.inf, "samples_total": 24},
}


def test_scalars_keep_finite_numbers_only() -> None:
    assert scalars(ROWS[1]) == {"reward_mean": 0.25, "loss": 0.5}
    assert scalars(ROWS[3]) == {"reward_mean": 0.75, "samples_total": 24.0}


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        parts += chunk
        if kind in (1, 4):
            records.append(parts)
            parts = b""
    return records


def _wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """Step -> the values logged at it, read from the offline run's .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict[str, float]] = {}
    for raw in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
        }
        step = items.pop("_step", record.history.step.num)
        history[int(step)] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def _tensorboard_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def test_one_row_feeds_jsonl_tensorboard_and_offline_wandb(tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="needs the wandb package")
    logger = RunLogger(tmp_path, wandb={"project": "d3s-test", "mode": "offline"})
    for step, row in ROWS.items():
        logger.log(step, row)
    logger.close()

    jsonl = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in jsonl] == [1, 2, 3] and jsonl[0]["note"] == "warm"
    expected = {step: scalars(row) for step, row in ROWS.items()}
    # Every value is exact in float32 (TensorBoard) and in JSON (W&B): compare exactly.
    assert _tensorboard_scalars(tmp_path) == expected
    assert _wandb_history(tmp_path) == expected


def test_a_late_evaluation_joins_its_step_everywhere(tmp_path: Path) -> None:
    # A background evaluation of step 1 lands after step 3 was logged.
    pytest.importorskip("wandb", reason="needs the wandb package")
    logger = RunLogger(tmp_path, wandb={"project": "d3s-test", "mode": "offline"})
    for step, row in ROWS.items():
        logger.log(step, row)
    logger.log_eval(1, {"heldout_accuracy": 0.5, "eval/pass@1": 0.375, "eval_step": 1})
    logger.log(3, {"reward_mean": 1.0})  # step 3 trained again (a resume): replaces its row
    logger.close()

    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert rows[1]["heldout_accuracy"] == 0.5 and rows[1]["loss"] == 0.5  # merged, not replaced
    assert rows[1]["eval/pass@1"] == 0.375 and "row" not in rows[1]
    assert rows[2]["heldout_accuracy"] == 0.125
    assert rows[3] == {"step": 3, "reward_mean": 1.0}
    assert _tensorboard_scalars(tmp_path)[1]["heldout_accuracy"] == 0.5
    late = [h for h in _wandb_history(tmp_path).values() if h.get("eval/pass@1") == 0.375]
    assert late and late[0]["eval_step"] == 1 and late[0]["heldout_accuracy"] == 0.5


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"mode": "offline"}, "logging.wandb.project"),
        ({"project": "", "mode": "offline"}, "logging.wandb.project"),
        ({"project": "p", "mode": "cloud"}, "logging.wandb.mode"),
        ({"project": "p", "api_key": "x"}, "unknown field(s) ['api_key']"),
    ],
)
def test_bad_wandb_spec_names_the_field(tmp_path: Path, spec: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        RunLogger(tmp_path, tensorboard=False, wandb=spec)
    assert not (tmp_path / "wandb").exists()


def test_no_wandb_by_default(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(1, {"reward_mean": 1.0})
    logger.close()
    assert not (tmp_path / "wandb").exists()

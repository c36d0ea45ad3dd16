"""Per-step metrics to metrics.jsonl and TensorBoard, and learning-curve plots."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunLogger:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl`` and mirrors it to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._fh = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception as e:  # TensorBoard is optional at run time: log why it is off
                log.warning("TensorBoard disabled: %s", e)

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; on resume a step can appear twice, the last one wins."""
    rows: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[int(r["step"])] = r
    return [rows[k] for k in sorted(rows)]


def plot_run(metrics_path: Path, out_png: Path, title: str = "") -> Path:
    """Held-out accuracy and reward against step and against learner tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    ev = [r for r in rows if "heldout_accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["step"] for r in ev], [r["heldout_accuracy"] for r in ev], marker="o", label="held-out accuracy")
    axes[0].plot([r["step"] for r in rows if "reward_mean" in r], [r["reward_mean"] for r in rows if "reward_mean" in r],
                 alpha=0.5, label="train reward")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot([r.get("learner_tokens_total", 0) for r in ev], [r["heldout_accuracy"] for r in ev], marker="o")
    axes[1].set_xlabel("learner tokens (kept, cumulative)")
    axes[1].set_ylabel("held-out accuracy")
    axes[2].plot([r["step"] for r in rows if "sample_ratio" in r], [r["sample_ratio"] for r in rows if "sample_ratio" in r], label="sample ratio")
    axes[2].plot([r["step"] for r in rows if "token_ratio" in r], [r["token_ratio"] for r in rows if "token_ratio" in r], label="token ratio")
    axes[2].set_xlabel("step")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title or str(Path(metrics_path).parent.name))
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png

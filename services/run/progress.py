"""A rich progress bar for training steps that shows what a user watches: reward, accuracy, ratios."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StepProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "training") -> None:
        self.enabled = enabled
        if not enabled:
            return
        self._p = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self._task = self._p.add_task(description, total=total, completed=start, info="")
        self._p.start()

    def update(self, step: int, row: dict, accuracy: float | None, extra: str = "") -> None:
        if not self.enabled:
            return
        parts = [f"reward {row.get('reward_mean', float('nan')):.2f}"]
        if accuracy is not None:
            parts.append(f"acc {accuracy:.3f}")
        if "samples_kept" in row and row.get("samples_before"):
            parts.append(f"kept {row['samples_kept'] / row['samples_before']:.0%} samples")
        if row.get("tokens_valid"):
            parts.append(f"{row['tokens_kept'] / row['tokens_valid']:.0%} tokens")
        if extra:
            parts.append(extra)
        self._p.update(self._task, completed=step, info=" | ".join(parts))

    def close(self) -> None:
        if self.enabled:
            self._p.stop()

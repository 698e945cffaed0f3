"""The training progress bar (rich): step, per-task losses, samples/s, data wait share.

Shown by `Trainer.run` (trainer/loop.py) on the main rank when `progress` is on.
"""

from __future__ import annotations

#: Each task's short name in progress lines (here and flows/train_watch.py's run logs).
TASK_SHORT = {
    "understanding": "und",
    "reconstruction": "rec",
    "depth": "dep",
    "segmentation": "seg",
    "text_to_image": "t2i",
}


class TrainProgress:
    """Rich progress bar: step, per-task losses, samples/s, share of time waiting for data."""

    SHORT = TASK_SHORT

    def __init__(self, enabled: bool, total: int, start: int):
        self.p = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, losses: dict[str, float], sps: float, wait_share: float) -> None:
        if self.p is None:
            return
        info = " ".join(f"{self.SHORT.get(t, t)} {v:.3f}" for t, v in losses.items())
        info += f" | {sps:.1f} samples/s | data wait {100 * wait_share:.0f}%"
        self.p.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()

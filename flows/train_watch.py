"""Training as the Prefect UI shows it while it runs: step lines, progress, loss curves, probes.

`TrainWatch` is the trainer's observer (trainer.loop.TrainObserver) inside the train task:
- a log line per logged step (`trainer.log_every`) in the task run's logs: per-task losses,
  total, learning rate, samples/s;
- a progress artifact, key `unimrg-train-progress`, updated at each logged step;
- the loss curves (`<train dir>/loss.png`, one panel per task, drawn from log.jsonl by
  trainer.loss_plot) as an image artifact, key `unimrg-train-loss`, at every checkpoint and
  at the end;
- each probe grid (`<train dir>/probe/step_NNNNNN.png`) as an image artifact, key
  `unimrg-train-probe`.
Images are published by reference (path plus a small thumbnail, flows.artifacts.image_artifact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows import artifacts
from trainer.checkpoints import latest_checkpoint
from trainer.loop import TrainObserver
from trainer.loss_plot import write_loss_plot
from trainer.train_progress import TASK_SHORT

__all__ = ["TrainWatch"]

RANDOM_NOTE = "random weights (tiny-random): the numbers exercise the code, nothing more"


class TrainWatch(TrainObserver):
    """Publishes one training run's progress to the current Prefect task run."""

    def __init__(self, out: Path, max_steps: int, random_weights: bool = False):
        self.out, self.max_steps, self.random_weights = Path(out), max_steps, random_weights
        self.logger = get_run_logger()
        self.plotted_step = -1
        self.progress = create_progress_artifact(
            progress=0.0,
            key="unimrg-train-progress",
            description=f"train: 0/{max_steps} steps",
        )

    def on_log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        losses = " ".join(f"{TASK_SHORT.get(t, t)} {v:.4f}" for t, v in record["loss"].items())
        self.logger.info(
            "step %d/%d: %s | total %.4f | lr %.3g | grad norm %.3g | %.1f samples/s",
            step,
            self.max_steps,
            losses,
            record["total"],
            record["lr"],
            record["grad_norm"],
            record["samples_per_s"],
        )
        update_progress_artifact(
            self.progress,
            progress=100.0 * step / self.max_steps,
            description=f"train: {step}/{self.max_steps} steps, total loss {record['total']:.4f}",
        )

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.logger.info("checkpoint %s", path)
        self.publish_loss(step)

    def on_probe(self, step: int, path: Path) -> None:
        note = f"; {RANDOM_NOTE}" if self.random_weights else ""
        artifacts.image_artifact(
            path,
            key="unimrg-train-probe",
            description=f"probe at step {step}: input | generated next to target{note}",
        )

    def publish_loss(self, step: int) -> None:
        """Redraw loss.png from log.jsonl and publish it (once per step)."""
        if step == self.plotted_step:
            return
        note = RANDOM_NOTE if self.random_weights else ""
        path = write_loss_plot(self.out, note=note)
        if path is None:
            return
        self.plotted_step = step
        artifacts.image_artifact(
            path,
            key="unimrg-train-loss",
            description=f"loss curves up to step {step}" + (f"; {note}" if note else ""),
        )

    def finish(self, steps: int, computed: bool) -> None:
        """At the end: progress 100%, the final loss curves, the last probe when not trained now."""
        update_progress_artifact(
            self.progress,
            progress=100.0,
            description=f"train: {steps}/{self.max_steps} steps"
            + ("" if computed else " (already trained, nothing ran)"),
        )
        self.publish_loss(steps)
        if not computed:
            probes = sorted((self.out / "probe").glob("step_*.png"))
            if probes:
                self.on_probe(steps, probes[-1])
            last = latest_checkpoint(self.out)
            if last is not None:
                self.logger.info("final checkpoint %s (found on disk)", last)

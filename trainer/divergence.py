"""A diverged training run: what went non-finite, its record, and the stop.

A non-finite loss (any task's) or gradient norm stops training before its optimizer step, and
non-finite weights before a checkpoint (trainer/loop.py checks, on every rank at the same
step). `stop_diverged` writes `diverged.json` into the run folder (`unimrg eval` refuses such a
run; trainer/run_folder.py reads it) and raises TrainingDiverged with one line naming the step,
what went non-finite and the checkpoint kept.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, NoReturn

from pipeline.shards import atomic_write_bytes
from trainer.run_folder import DIVERGED_FILE

__all__ = ["TrainingDiverged", "describe_nonfinite", "stop_diverged"]


class TrainingDiverged(ValueError):
    """Training met a non-finite loss or gradient norm (or non-finite weights): the run stopped
    before that step changed anything, its last finite checkpoint stays, and it is not done.
    The message is one line naming the step, what went non-finite and the checkpoint kept;
    `diverged.json` in the run folder records it (`unimrg eval` refuses such a run)."""


def describe_nonfinite(losses: dict[str, float], grad_norm: float) -> tuple[str, dict[str, Any]]:
    """(what went non-finite, the fields `diverged.json` records) for a step whose losses or
    gradient norm some rank found not finite."""
    bad = [t for t in sorted(losses) if not math.isfinite(losses[t])]
    if len(bad) == 1:
        what = f"the {bad[0]} loss is {losses[bad[0]]}"
    elif bad:
        what = "the losses " + ", ".join(f"{t} ({losses[t]})" for t in bad) + " are not finite"
    elif not math.isfinite(grad_norm):
        what = f"the gradient norm is {grad_norm} (every task's loss is finite)"
    else:  # every rank agrees some rank saw one; its mean loss would show it
        what = "a loss or the gradient norm is not finite on another rank"
    record = {
        "tasks": bad,
        "losses": {t: repr(v) if not math.isfinite(v) else v for t, v in losses.items()},
        "grad_norm": grad_norm if math.isfinite(grad_norm) else repr(grad_norm),
    }
    return what, record


def stop_diverged(
    out: Path,
    step: int,
    what: str,
    record: dict[str, Any],
    *,
    lr: float,
    kept: Path | None,
    write: bool,
) -> NoReturn:
    """Raise TrainingDiverged naming `step`, `what` and the checkpoint `kept`; with `write`
    (the main rank, when checkpoints are saved) record it in `out`/diverged.json first."""
    keep = (
        f"kept {kept.name}, the last finite checkpoint"
        if kept
        else "no checkpoint was written before it"
    )
    message = (
        f"train: diverged at step {step}: {what} (trainer.lr {lr:g}); stopped "
        f"before saving that state; {keep}; the run is not done and `unimrg eval` refuses "
        "it. Lower trainer.lr or check trainer.loss_weights and the data, then train again"
    )
    if write:
        record = {
            "step": step,
            **record,
            "lr": lr,
            "last_checkpoint": kept.name if kept else None,
            "message": message,
            "time": time.time(),
        }
        atomic_write_bytes(out / DIVERGED_FILE, json.dumps(record, indent=2).encode())
    raise TrainingDiverged(message)

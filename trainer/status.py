"""Where training stands, read from the files alone (no model loaded).

Whether the final checkpoint (`step_<max_steps>`) of the current train fingerprint exists, and
the newest checkpoint so far. `unimrg status` (flows/status.py) shows it beside the label stages.

Usage from Python:
    from trainer.status import train_status
    train_status(load_manifest("data_manifest.yaml")).latest_step
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.manifest import Manifest

__all__ = ["TrainStatus", "train_status"]


@dataclass
class TrainStatus:
    fingerprint: str | None
    done: bool = False
    max_steps: int = 0
    latest_step: int | None = None
    output_dir: str | None = None
    error: str | None = None


def train_status(manifest: Manifest) -> TrainStatus:
    """Done / latest checkpoint of the current train fingerprint (or why it is unknown)."""
    try:
        from trainer.loop import latest_checkpoint, step_dir, train_fingerprint, train_output_dir

        fp = train_fingerprint(manifest)
        out = train_output_dir(manifest, fp)
    except Exception as exc:
        return TrainStatus(None, error=f"{type(exc).__name__}: {exc}")
    latest = latest_checkpoint(out)
    max_steps = manifest.trainer.max_steps
    return TrainStatus(
        fp,
        done=step_dir(out, max_steps).exists(),
        max_steps=max_steps,
        latest_step=int(latest.name.split("_")[-1]) if latest else None,
        output_dir=str(out),
    )

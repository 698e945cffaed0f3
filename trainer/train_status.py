"""Where training stands, read from the files alone (no model loaded).

Whether the final checkpoint (`step_<max_steps>`) of the current train fingerprint exists, the
newest checkpoint so far, and the step at which the latest attempt diverged (if it did).
`unimrg status` (flows/status.py) shows it beside the label stages.

Usage from Python:
    from trainer.train_status import train_status
    train_status(load_manifest("data_manifest.yaml")).latest_step
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.lineage import describe, read_lineage
from pipeline.manifest import Manifest
from pipeline.stage_status import FingerprintFolder, folder_bytes

__all__ = ["TrainStatus", "train_folders", "train_status"]


def train_folders(root: Path) -> list[FingerprintFolder]:
    """Every training run folder (`train/<fingerprint>/`) under `root`, with its checkpoints."""
    from trainer.checkpoints import checkpoints

    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rec = read_lineage(d)
        out.append(
            FingerprintFolder(
                d.name,
                str(d),
                describe(rec),
                folder_bytes(d),
                len(checkpoints(d)),
                bool(rec and rec.get("random_weights")),
            )
        )
    return out


@dataclass
class TrainStatus:
    fingerprint: str | None
    done: bool = False
    max_steps: int = 0
    latest_step: int | None = None
    output_dir: str | None = None
    error: str | None = None
    #: What makes the current run: model and key parameters.
    made_by: str | None = None
    #: Other training runs on disk (`shards` counts their checkpoints).
    others: list[dict] = field(default_factory=list)
    #: The step at which the latest attempt diverged (diverged.json), else None.
    diverged_step: int | None = None


def train_status(manifest: Manifest) -> TrainStatus:
    """Done / latest checkpoint of the current train fingerprint (or why it is unknown)."""
    try:
        from trainer.checkpoints import latest_checkpoint, step_dir
        from trainer.run_folder import read_diverged, train_fingerprint, train_output_dir

        fp = train_fingerprint(manifest)
        out = train_output_dir(manifest, fp)
    except Exception as exc:
        return TrainStatus(None, error=f"{type(exc).__name__}: {exc}")
    cfg = manifest.trainer
    rec = read_lineage(out)
    made_by = (
        describe(rec)
        if rec
        else f"{cfg.model} adapter={cfg.adapter} max_steps={cfg.max_steps} lr={cfg.lr}"
    )
    latest = latest_checkpoint(out)
    max_steps = manifest.trainer.max_steps
    diverged = read_diverged(out)
    return TrainStatus(
        fp,
        done=step_dir(out, max_steps).exists(),
        max_steps=max_steps,
        latest_step=int(latest.name.split("_")[-1]) if latest else None,
        output_dir=str(out),
        made_by=made_by,
        others=[asdict(f) for f in train_folders(out.parent) if f.fingerprint != fp],
        diverged_step=diverged.get("step", -1) if diverged is not None else None,
    )

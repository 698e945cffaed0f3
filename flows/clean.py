"""Remove the outputs of fingerprints the manifest no longer uses, and say what that frees.

    unimrg clean [-m MANIFEST] [--dry-run] [--keep-current]

What goes (from the files alone, nothing loaded):
- `labels/<stage>/<fp>/` for every fingerprint other than the stage's current one, and every
  fingerprint of a label stage the manifest no longer configures;
- `train/<fp>/` for every run other than the current training fingerprint (all of them when the
  manifest has no `trainer` section);
- `eval/<fp>/` (one model scored on one benchmark) when that model is not of the current run:
  neither the trainer's base model (same identity: weights hash, hub commit) nor a checkpoint
  under the current `train/<fp>/` (one the model's `lineage.json` names, relative to
  output_dir). Scores of the current run's checkpoints stay even when `--keep-current` trims
  the checkpoints themselves (they cannot be recomputed, and they are small). An `eval/<fp>/`
  holding nothing but an eval's temporary task folders (what a killed eval leaves; a failed one
  removes its own) goes once it is older than an hour; any other eval folder without a lineage
  record (a younger one: an eval in progress) is left alone, and said so; so is `eval/probes/`;
- temporary files and folders that interrupted writes left behind (`.<name>.tmp`, older than
  an hour: a younger one may belong to a run in progress).
Image shards, quarantine records and the current fingerprints' outputs stay. A stage whose
current fingerprint cannot be computed (its model files are missing, say) is left alone, and
said so: there is no telling which of its folders is current (the eval folders too, when the
training fingerprint cannot be computed).

`--keep-current` also trims the current training run to its newest checkpoint plus the final
one (what `trainer.keep_last: 1` would have kept). `--dry-run` lists and removes nothing.
It lives here, above pipeline/ and trainer/, because it reads both; it imports no Prefect.

Usage from Python:
    from flows.clean import plan_clean
    [r.path for r in plan_clean(load_manifest("data_manifest.yaml")).remove]
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.lineage import read_lineage
from pipeline.manifest import Manifest
from pipeline.shards import Layout
from pipeline.status import folder_bytes, stage_folders

__all__ = ["CleanPlan", "Removal", "clean", "plan_clean"]


@dataclass
class Removal:
    """One folder or file to remove: what it is, what made it, how big it is."""

    kind: str  # "labels/<stage>", "train", "checkpoint", "eval", "temporary"
    path: str
    fingerprint: str | None
    made_by: str
    bytes: int


@dataclass
class CleanPlan:
    remove: list[Removal] = field(default_factory=list)
    #: What was left alone (a stage, the train or eval folder, one eval folder), with the reason.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.remove)


def plan_clean(manifest: Manifest, keep_current: bool = False) -> CleanPlan:
    """What `unimrg clean` removes (nothing is touched)."""
    from pipeline.stage import STAGE_NAMES, build_stage

    layout = Layout(manifest.out)
    plan = CleanPlan()
    labels_root = layout.root / "labels"
    on_disk = (
        sorted(p.name for p in labels_root.iterdir() if p.is_dir()) if labels_root.is_dir() else []
    )
    for name in on_disk:
        current = None
        if name in STAGE_NAMES and getattr(manifest.stages, name, None) is not None:
            try:
                current = build_stage(name, manifest).fingerprint()
            except Exception as exc:  # noqa: BLE001 - unknown current fingerprint: touch nothing
                plan.skipped[f"labels/{name}"] = _unknown(exc)
                continue
        for f in stage_folders(layout, name):
            if f.fingerprint != current:
                plan.remove.append(
                    Removal(f"labels/{name}", f.path, f.fingerprint, f.made_by, f.bytes)
                )
    train_removals, run_dir = _train_removals(manifest, keep_current, plan)
    plan.remove += train_removals
    plan.remove += _eval_removals(manifest, run_dir, plan)
    plan.remove += _temporaries(layout.root, {Path(r.path) for r in plan.remove})
    return plan


def _unknown(exc: Exception) -> str:
    return f"its current fingerprint is unknown ({type(exc).__name__}: {exc})"


def _train_removals(
    manifest: Manifest, keep_current: bool, plan: CleanPlan
) -> tuple[list[Removal], Path | None]:
    """(removals, the current run's folder: None without a trainer section or when its
    fingerprint is unknown)."""
    from trainer.status import train_folders

    subdir = manifest.trainer.output_subdir if manifest.trainer is not None else "train"
    root = manifest.out / subdir
    current = None
    if manifest.trainer is not None:
        try:
            from trainer.loop import train_fingerprint

            current = train_fingerprint(manifest)
        except Exception as exc:  # noqa: BLE001
            plan.skipped[subdir] = _unknown(exc)
            return [], None
    out = [
        Removal("train", f.path, f.fingerprint, f.made_by, f.bytes)
        for f in train_folders(root)
        if f.fingerprint != current
    ]
    if keep_current and current is not None:
        from trainer.loop import checkpoints, step_dir

        found = checkpoints(root / current)
        final = step_dir(root / current, manifest.trainer.max_steps)
        for ckpt in found[:-1]:
            if ckpt != final:
                out.append(Removal("checkpoint", str(ckpt), current, ckpt.name, folder_bytes(ckpt)))
    return out, (root / current if current is not None else None)


def _eval_removals(manifest: Manifest, run_dir: Path | None, plan: CleanPlan) -> list[Removal]:
    """`eval/<fp>/` folders whose model is neither the base model nor a checkpoint of the
    current training run `run_dir` (trainer/evaluation/evaluate.py writes the model's identity,
    the fingerprint's `model` part, into each task's lineage.json)."""
    subdir = manifest.eval.output_subdir if manifest.eval is not None else "eval"
    root = manifest.out / subdir
    if not root.is_dir():
        return []
    base = None
    if manifest.trainer is not None:
        if run_dir is None:
            plan.skipped[subdir] = "the current training run is unknown (see above)"
            return []
        try:
            from trainer.evaluation.evaluate import EvalModel, model_identity

            cfg = manifest.trainer
            base = model_identity(manifest, EvalModel("base", cfg.model, cfg.revision, base=True))
        except Exception as exc:  # noqa: BLE001 - unknown base model: touch nothing
            plan.skipped[subdir] = _unknown(exc)
            return []
        run_dir = run_dir.resolve()
    from trainer.evaluation.evaluate import model_location

    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name == "probes":
            continue  # the spatial probe's question sets, keyed by held-out images and labels
        tasks = [b for b in sorted(d.iterdir()) if b.is_dir() and not b.name.startswith(".")]
        if not tasks and all(_eval_temporary(p) for p in d.iterdir()) and not _recent(d):
            # Only what a failed or killed eval leaves: its temporary task folders, or nothing.
            failed = "left by a failed or interrupted eval (no finished task)"
            out.append(Removal("eval", str(d), d.name, failed, folder_bytes(d)))
            continue
        records = [read_lineage(b) for b in tasks]
        if not records or not all(records):
            plan.skipped[f"{subdir}/{d.name}"] = "no lineage.json yet (an eval in progress?)"
            continue
        ident = records[0].get("model") or {}
        ckpt = model_location(ident, manifest.out)  # inside output_dir: named relative to it
        current = ident == base or (
            run_dir is not None and ckpt is not None and ckpt.resolve().is_relative_to(run_dir)
        )
        if not current:
            made_by = ", ".join(str(r.get("task", "eval")) for r in records)
            out.append(Removal("eval", str(d), d.name, made_by, folder_bytes(d)))
    return out


def _eval_temporary(path: Path) -> bool:
    """A task folder an eval writes before renaming it into place: `.<benchmark>.<random>.tmp`."""
    return path.is_dir() and path.name.startswith(".") and path.name.endswith(".tmp")


def _recent(folder: Path) -> bool:
    """Whether `folder` or anything in it changed within TEMP_MIN_AGE_S (a run in progress?)."""
    import time

    now = time.time()
    return any(now - p.stat().st_mtime < TEMP_MIN_AGE_S for p in [folder, *folder.rglob("*")])


#: A temporary file younger than this may belong to a write in progress.
TEMP_MIN_AGE_S = 3600


def _temporaries(root: Path, removed: set[Path]) -> list[Removal]:
    import time

    if not root.is_dir():
        return []
    out = []
    now = time.time()
    for p in sorted(root.rglob(".*.tmp")):
        if any(parent in removed for parent in p.parents):
            continue
        if now - p.stat().st_mtime < TEMP_MIN_AGE_S:
            continue
        size = folder_bytes(p) if p.is_dir() else p.stat().st_size
        out.append(Removal("temporary", str(p), None, "left by an interrupted write", size))
    return out


def clean(manifest: Manifest, dry_run: bool = False, keep_current: bool = False) -> CleanPlan:
    """Remove what `plan_clean` lists (unless `dry_run`) and print it with the space freed."""
    from flows.status import human_bytes

    plan = plan_clean(manifest, keep_current)
    verb = "would remove" if dry_run else "removed"
    for r in plan.remove:
        if not dry_run:
            p = Path(r.path)
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        print(f"{verb} {r.kind} {r.path} ({human_bytes(r.bytes)}): {r.made_by}")
    for what, why in plan.skipped.items():
        print(f"left {what} alone: {why}")
    freed = "would free" if dry_run else "freed"
    print(f"{freed} {human_bytes(plan.bytes)} in {len(plan.remove)} item(s)")
    return plan

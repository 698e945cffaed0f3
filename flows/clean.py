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
  an hour: a younger one may belong to a run in progress), looked for only in unimrg's own
  folders (images/, quarantine/, labels/, the train and eval subfolders) and directly in
  output_dir.
Image shards, quarantine records and the current fingerprints' outputs stay. A stage whose
current fingerprint cannot be computed (its model files are missing, say) is left alone, and
said so: there is no telling which of its folders is current (the eval folders too, when the
training fingerprint cannot be computed).

Only what unimrg made goes: a folder whose lineage.json does not say unimrg made it (its kind,
stage and fingerprint; for eval, every benchmark folder's record) is left alone and said so, so
is anything that is a symbolic link or resolves outside output_dir, and every path is checked
again just before anything is removed. `clean` takes the locks `unimrg run` (`.run.lock`),
ingest (`.ingest.lock`) and every training (`<subdir>/<fp>/.train.lock`) hold, and is refused
at once while any of them is held: a training of another manifest reads labels this manifest
may call unused, and its run folder is one this manifest's clean would remove.

`--keep-current` also trims the current training run to its newest checkpoint plus the final
one (what `trainer.keep_last: 1` would have kept). `--dry-run` lists and removes nothing.
It lives here, above pipeline/ and trainer/, because it reads both; it imports no Prefect.

Usage from Python:
    from flows.clean import plan_clean
    [r.path for r in plan_clean(load_manifest("data_manifest.yaml")).remove]
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import short_repr
from pipeline.lineage import read_lineage
from pipeline.locks import exclusive
from pipeline.manifest import Manifest
from pipeline.shards import Layout
from pipeline.stage_status import folder_bytes, stage_folders

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

    def add(self, out: Path, removal: Removal, record: Any = True, what: str = "") -> None:
        """List `removal` when it is unimrg's to remove: `record` is its folder's lineage check
        (a reason string when it fails), and its path must resolve inside `out`."""
        why = _outside(out, Path(removal.path)) or (record if isinstance(record, str) else None)
        if why:
            self.skipped[what or removal.path] = why
        else:
            self.remove.append(removal)


def plan_clean(manifest: Manifest, keep_current: bool = False) -> CleanPlan:
    """What `unimrg clean` removes (nothing is touched)."""
    from pipeline.stage import STAGE_NAMES, build_stage

    layout = Layout(manifest.out)
    out = manifest.out
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
                record = _made_by_unimrg(Path(f.path), kind="labels", stage=name)
                removal = Removal(f"labels/{name}", f.path, f.fingerprint, f.made_by, f.bytes)
                plan.add(out, removal, record, f"labels/{name}/{f.fingerprint}")
    run_dir = _train_removals(manifest, keep_current, plan)
    _eval_removals(manifest, run_dir, plan)
    for r in _temporaries(manifest, {Path(r.path) for r in plan.remove}):
        plan.add(out, r)
    return plan


def _unknown(exc: Exception) -> str:
    return f"its current fingerprint is unknown ({type(exc).__name__}: {exc})"


def _outside(out: Path, path: Path) -> str | None:
    """Why `path` is not for clean to remove as a path (None: it may go): a symbolic link
    (unimrg makes none; removing one through it would reach its target), or a path that
    resolves outside `out` or to `out` itself."""
    if path.is_symlink():
        return "a symbolic link (unimrg makes none)"
    root = Path(os.path.realpath(out))
    real = Path(os.path.realpath(path))
    if real == root or not real.is_relative_to(root):
        return f"resolves to {real}, outside output_dir {root}"
    return None


def _made_by_unimrg(folder: Path, kind: str, stage: str | None = None) -> str | bool:
    """True when `folder/lineage.json` says unimrg made it as a `kind` folder (its stage and
    fingerprint, the folder's name, included); else why not."""
    rec = read_lineage(folder)
    if not isinstance(rec, dict):
        return "no lineage.json says unimrg made it (remove it by hand if it is yours to remove)"
    said = (rec.get("kind"), rec.get("stage"), rec.get("fingerprint"))
    if said != (kind, stage or kind, folder.name):
        return (
            f"its lineage.json says kind/stage/fingerprint {short_repr(said)}, not this "
            f"folder's {(kind, stage or kind, folder.name)}"
        )
    return True


def _made_by_eval(folder: Path) -> str | bool:
    """True when every benchmark folder in `eval/<fp>/` has the lineage record
    trainer/evaluation/evaluate.py writes (its `task` is `eval <benchmark> <model>`)."""
    records = [(b, read_lineage(b)) for b in sorted(folder.iterdir()) if b.is_dir()]
    if not records or not all(rec for _, rec in records):
        return "no lineage.json yet (an eval in progress?)"
    for b, rec in records:
        task = rec.get("task") if isinstance(rec, dict) else None
        if not (isinstance(task, str) and task.startswith(f"eval {b.name} ")):
            return f"{b.name}/lineage.json does not say unimrg's eval made it"
    return True


def _train_removals(manifest: Manifest, keep_current: bool, plan: CleanPlan) -> Path | None:
    """Add the training runs (and with `keep_current`, checkpoints) to remove to `plan`;
    return the current run's folder (None without a trainer section or when its fingerprint
    is unknown)."""
    from trainer.train_status import train_folders

    subdir = _subdir(manifest, "trainer", "train")
    root = manifest.out / subdir
    current = None
    if manifest.trainer is not None:
        try:
            from trainer.run_folder import train_fingerprint

            current = train_fingerprint(manifest)
        except Exception as exc:  # noqa: BLE001
            plan.skipped[subdir] = _unknown(exc)
            return None
    for f in train_folders(root):
        if f.fingerprint != current:
            record = _made_by_unimrg(Path(f.path), kind="train")
            removal = Removal("train", f.path, f.fingerprint, f.made_by, f.bytes)
            plan.add(manifest.out, removal, record, f"{subdir}/{f.fingerprint}")
    if keep_current and current is not None:
        from trainer.checkpoints import checkpoints, step_dir

        run = root / current
        found = checkpoints(run)
        final = step_dir(run, manifest.trainer.max_steps)
        record = _made_by_unimrg(run, kind="train") if found[:-1] else True
        for ckpt in found[:-1]:
            if ckpt != final:
                removal = Removal("checkpoint", str(ckpt), current, ckpt.name, folder_bytes(ckpt))
                plan.add(manifest.out, removal, record, f"{subdir}/{current}/{ckpt.name}")
    return root / current if current is not None else None


def _subdir(manifest: Manifest, section: str, default: str) -> str:
    cfg = getattr(manifest, section)
    return cfg.output_subdir if cfg is not None else default


def _eval_removals(manifest: Manifest, run_dir: Path | None, plan: CleanPlan) -> None:
    """`eval/<fp>/` folders whose model is neither the base model nor a checkpoint of the
    current training run `run_dir` (trainer/evaluation/evaluate.py writes the model's identity,
    the fingerprint's `model` part, into each task's lineage.json)."""
    subdir = _subdir(manifest, "eval", "eval")
    root = manifest.out / subdir
    if not root.is_dir():
        return
    base = None
    if manifest.trainer is not None:
        if run_dir is None:
            plan.skipped[subdir] = "the current training run is unknown (see above)"
            return
        try:
            from trainer.evaluation.evaluate import EvalModel, model_identity

            cfg = manifest.trainer
            base = model_identity(manifest, EvalModel("base", cfg.model, cfg.revision, base=True))
        except Exception as exc:  # noqa: BLE001 - unknown base model: touch nothing
            plan.skipped[subdir] = _unknown(exc)
            return
        run_dir = run_dir.resolve()
    from trainer.evaluation.evaluate import model_location

    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name == "probes":
            continue  # the spatial probe's question sets, keyed by held-out images and labels
        inside = list(d.iterdir())
        if all(_eval_temporary(p) for p in inside) and not _recent(d):
            # Only what a failed or killed eval leaves: its temporary task folders, or nothing.
            failed = "left by a failed or interrupted eval (no finished task)"
            removal = Removal("eval", str(d), d.name, failed, folder_bytes(d))
            plan.add(manifest.out, removal, what=f"{subdir}/{d.name}")
            continue
        made = _outside(manifest.out, d) or _made_by_eval(d)
        if made is not True:
            plan.skipped[f"{subdir}/{d.name}"] = made
            continue
        records = [read_lineage(b) for b in sorted(d.iterdir()) if b.is_dir()]
        ident = records[0].get("model") or {}
        ckpt = model_location(ident, manifest.out)  # inside output_dir: named relative to it
        current = ident == base or (
            run_dir is not None and ckpt is not None and ckpt.resolve().is_relative_to(run_dir)
        )
        if not current:
            made_by = ", ".join(str(r.get("task", "eval")) for r in records)
            removal = Removal("eval", str(d), d.name, made_by, folder_bytes(d))
            plan.add(manifest.out, removal, what=f"{subdir}/{d.name}")


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


def _temporaries(manifest: Manifest, removed: set[Path]) -> list[Removal]:
    """`.<name>.tmp` files and folders older than TEMP_MIN_AGE_S in unimrg's own folders
    (never following a symbolic link) and directly in output_dir; nothing else is searched."""
    import fnmatch
    import time

    root = manifest.out
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if fnmatch.fnmatch(p.name, ".*.tmp")]
    for sub in ("images", "quarantine", "labels", *_own_subdirs(manifest)):
        top = root / sub
        if top.is_symlink() or not top.is_dir():
            continue
        for folder, dirs, files in os.walk(top):  # does not enter symlinked folders
            hits = [n for n in (*dirs, *files) if fnmatch.fnmatch(n, ".*.tmp")]
            found += [Path(folder) / n for n in hits]
            dirs[:] = [d for d in dirs if d not in hits]  # a temp folder goes whole
    out = []
    now = time.time()
    for p in sorted(found):
        if any(parent in removed for parent in p.parents) or p.is_symlink():
            continue
        if now - p.lstat().st_mtime < TEMP_MIN_AGE_S:
            continue
        size = folder_bytes(p) if p.is_dir() else p.stat().st_size
        out.append(Removal("temporary", str(p), None, "left by an interrupted write", size))
    return out


def _own_subdirs(manifest: Manifest) -> set[str]:
    """The train and eval subfolders: the manifest's own and the defaults."""
    return {
        "train",
        "eval",
        _subdir(manifest, "trainer", "train"),
        _subdir(manifest, "eval", "eval"),
    }


def _lock_all(manifest: Manifest, stack: ExitStack, held: set[Path], runs: list[Path]) -> None:
    """Take the locks of `unimrg run`, ingest, eval and of every training run folder in `runs`
    (pipeline/locks.py) into `stack`; raise Busy naming the first one held elsewhere."""
    from trainer.evaluation.evaluate import EVAL_LOCK

    out = manifest.out
    wanted = [
        (out / ".run.lock", "a `unimrg run` is using this output folder"),
        (out / ".ingest.lock", "an ingest is running"),
        (out / EVAL_LOCK, "an eval is writing there"),
        *((r / ".train.lock", "a training is running in it") for r in runs),
    ]
    for lock, busy in wanted:
        if lock not in held:
            stack.enter_context(exclusive(lock, f"{busy}; `unimrg clean` waits for no one"))
            held.add(lock)


def _train_runs(manifest: Manifest) -> list[Path]:
    """Every folder holding a training lock file, `<output_dir>/<subdir>/<fp>/.train.lock`,
    whatever manifest's subfolder it is under."""
    return sorted(p.parent for p in manifest.out.glob("*/*/.train.lock") if not p.is_symlink())


def clean(manifest: Manifest, dry_run: bool = False, keep_current: bool = False) -> CleanPlan:
    """Remove what `plan_clean` lists (unless `dry_run`) and print it with the space freed.
    Holds the locks of run, ingest, eval and every training while it plans and removes (pipeline/
    locks.Busy at once when one is held elsewhere)."""
    if dry_run or not manifest.out.is_dir():
        return _report(plan_clean(manifest, keep_current), dry_run=True)
    with ExitStack() as stack:
        held: set[Path] = set()
        _lock_all(manifest, stack, held, _train_runs(manifest))
        plan = plan_clean(manifest, keep_current)
        # A run folder that appeared after the locks were taken is locked before it goes.
        runs = {Path(r.path) for r in plan.remove if r.kind == "train"}
        runs |= {Path(r.path).parent for r in plan.remove if r.kind == "checkpoint"}
        _lock_all(manifest, stack, held, sorted(runs))
        for r in plan.remove:  # every path once more, before anything is removed
            why = _outside(manifest.out, Path(r.path))
            if why:
                raise ValueError(f"clean: {r.path}: {why}; nothing was removed")
        for r in plan.remove:
            p = Path(r.path)
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return _report(plan, dry_run=False)


def _report(plan: CleanPlan, dry_run: bool) -> CleanPlan:
    from flows.status import human_bytes

    verb = "would remove" if dry_run else "removed"
    for r in plan.remove:
        print(f"{verb} {r.kind} {r.path} ({human_bytes(r.bytes)}): {r.made_by}")
    for what, why in plan.skipped.items():
        print(f"left {what} alone: {why}")
    freed = "would free" if dry_run else "freed"
    print(f"{freed} {human_bytes(plan.bytes)} in {len(plan.remove)} item(s)")
    return plan

"""A training run's folder: its fingerprint, lineage and run record, and reading its log.

`train_fingerprint` hashes everything that changes the trained model (`train_fingerprint_parts`
lists it); the run lives in `<output_dir>/<trainer.output_subdir>/<fingerprint>/`
(`train_output_dir`) with `run.json` (its fingerprint, the fingerprint without `max_steps`, and
`max_steps`: how `--resume` tells a run of another length from no run at all) and `lineage.json`
(`train_lineage`). `_log_lines` / `truncate_log` read and trim `log.jsonl` on resume. Used by
trainer/loop.py and, for the fingerprint and folder, flows/ and trainer/train_status.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.fingerprint import fingerprint
from pipeline.lineage import library_versions
from pipeline.manifest import TASK_STAGES
from pipeline.shards import Layout, atomic_write_bytes, shard_number
from trainer import data as data_mod
from trainer.adapters import adapter_class
from trainer.caption_data import captions_hash
from trainer.checkpoints import STEP_PREFIX, latest_checkpoint
from trainer.evaluation.heldout import held_out_count, held_out_ids
from trainer.image_index import ImageIndex

#: 2: Janus system prompt in understanding turns; 3: L2-normalised VQ targets; 4: each
#: micro-batch's loss divided by the micro-batches per step before clipping (released scaling)
TRAINER_VERSION = "4"
#: Trainer settings that do not change the trained weights: not part of the fingerprint.
NOT_FINGERPRINTED = {
    "probe_temperature",
    "probe_cfg_weight",
    "log_every",
    "eval_every",
    "save_every",
    "keep_last",
    "output_subdir",
    "gradient_checkpointing",
    "num_workers",
}
UNFINGERPRINTED_DEFAULTS = {"image_size": None, "parallel": "ddp"}


#: In each run folder: its fingerprint, the fingerprint without max_steps, and max_steps.
RUN_FILE = "run.json"
#: In a run folder whose latest attempt diverged (trainer/loop.py): the step, what was not
#: finite, the checkpoint kept. Removed when the run reaches its final step.
DIVERGED_FILE = "diverged.json"


def read_diverged(out: Path) -> dict[str, Any] | None:
    """The divergence record of run folder `out`, or None when its latest attempt did not
    diverge (an unreadable record counts as a divergence: it is only written on one)."""
    path = Path(out) / DIVERGED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"message": f"{path} exists (unreadable)"}
    return record if isinstance(record, dict) else {"message": f"{path} exists"}


def trainer_cfg(manifest):
    if manifest.trainer is None:
        raise ValueError("trainer: not configured in the manifest")
    return manifest.trainer


def train_fingerprint(
    manifest, label_fingerprints: dict[str, str] | None = None, *, schedule: bool = True
) -> str:
    """Hash of everything that changes the trained model; loads no model onto a device.

    `schedule=False` leaves `max_steps` out: runs that differ only in their length share it
    (recorded in each run's `run.json`, so `--resume` can tell such a run from no run at all).
    """
    return fingerprint(train_fingerprint_parts(manifest, label_fingerprints, schedule=schedule))


def train_fingerprint_parts(
    manifest, label_fingerprints: dict[str, str] | None = None, *, schedule: bool = True
) -> dict[str, Any]:
    """What `train_fingerprint` hashes (recorded in the run's lineage.json)."""
    cfg = trainer_cfg(manifest)
    if label_fingerprints is None:
        label_fingerprints = data_mod.resolve_label_fingerprints(manifest)
    exclude = NOT_FINGERPRINTED if schedule else NOT_FINGERPRINTED | {"max_steps"}
    # Fields added later, at their defaults, leave existing runs' fingerprints unchanged.
    exclude = exclude | {k for k, v in UNFINGERPRINTED_DEFAULTS.items() if getattr(cfg, k) == v}
    parts = {
        "version": TRAINER_VERSION,
        "trainer": cfg.model_dump(mode="json", exclude=exclude),
        "labels": dict(sorted(label_fingerprints.items())),
        "understanding": data_mod.understanding_hash(manifest),
        "images": data_mod.image_shards_identity(Layout(manifest.out)),
        "model": adapter_class(cfg.adapter).identity(cfg.model, cfg.revision, manifest.base_dir),
    }
    if manifest.captions:  # the text_to_image task's data (absent when none is listed)
        parts["captions"] = captions_hash(manifest)
    if held_out_count(manifest):
        # Held-out images (eval.held_out_images) are not trained on (absent when none).
        index = ImageIndex.build(Layout(manifest.out))
        parts["held_out_images"] = held_out_ids(index.image_ids, held_out_count(manifest))
    missing = _missing_label_shards(manifest, label_fingerprints)
    if missing:
        # Training then uses only the labelled shards: once the rest are labelled, the data is
        # different and must not hit this run's cache. (Absent when complete: fingerprints of
        # fully labelled data are unchanged.)
        parts["missing_label_shards"] = missing
    return parts


#: Distributions whose code computes the trained weights (their versions go into the lineage).
TRAIN_LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "pillow", "pyarrow")


def train_lineage(manifest, label_fingerprints: dict[str, str]) -> dict[str, Any]:
    """The lineage record of `train/<fingerprint>/` (pipeline/lineage.py), without `created`."""
    cfg = trainer_cfg(manifest)
    parts = train_fingerprint_parts(manifest, label_fingerprints)
    ident = parts["model"]
    source = (
        "tiny-random"
        if cfg.model == "tiny-random"
        else "hub"
        if ident.get("revision") and ident.get("model") == cfg.model
        else "local"
    )
    return {
        "kind": "train",
        "stage": "train",
        "stage_version": TRAINER_VERSION,
        "fingerprint": fingerprint(parts),
        "model": {
            "spec": cfg.model,
            "adapter": cfg.adapter,
            "source": source,
            "path": ident.get("model") if source == "local" else None,
            "revision": ident.get("revision", cfg.revision),
            "weights": ident.get("weights"),
        },
        "parameters": cfg.model_dump(mode="json"),
        "key_parameters": {
            "adapter": cfg.adapter,
            "max_steps": cfg.max_steps,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
        },
        "label_fingerprints": dict(sorted(label_fingerprints.items())),
        "covers": parts,
        "random_weights": bool(ident.get("random_weights")),
        "libraries": library_versions(TRAIN_LIBRARIES),
    }


def _missing_label_shards(manifest, label_fingerprints: dict[str, str]) -> dict[str, list[int]]:
    """label stage -> numbers of the image shards without a label shard (enabled tasks only)."""
    cfg = manifest.trainer
    layout = Layout(manifest.out)
    numbers = [shard_number(p) for p in layout.image_shards()]
    missing: dict[str, list[int]] = {}
    for task, stage in TASK_STAGES.items():
        fp = label_fingerprints.get(stage)
        if fp is None or float(cfg.loss_weights.get(task, 0.0)) <= 0:
            continue
        gone = [n for n in numbers if not layout.label_shard(stage, fp, n).exists()]
        if gone:
            missing[stage] = gone
    return missing


def train_output_dir(manifest, fp: str | None = None) -> Path:
    cfg = trainer_cfg(manifest)
    return manifest.out / cfg.output_subdir / (fp or train_fingerprint(manifest))


def _log_lines(log: Path) -> tuple[list[str], int]:
    """(the complete JSON lines of `log`, how many lines there were). A last line cut short by
    a kill is dropped; an unreadable line anywhere else is an error naming it."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    good = []
    for i, ln in enumerate(lines, 1):
        try:
            json.loads(ln)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                break  # torn by a kill mid-write: that step is logged again after resume
            raise ValueError(f"{log}:{i}: not a JSON record ({exc})") from None
        good.append(ln)
    return good, len(lines)


def same_run_other_length(manifest, family: str, fp: str) -> tuple[Path, int, Path] | None:
    """(folder, its max_steps, newest checkpoint) of a run with the same settings except
    `max_steps`, the one trained furthest; none when there is no such run with a checkpoint."""
    root = manifest.out / manifest.trainer.output_subdir
    found = []
    for rec_path in sorted(root.glob(f"*/{RUN_FILE}")) if root.is_dir() else []:
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        ckpt = latest_checkpoint(rec_path.parent)
        if rec.get("schedule_free") == family and rec.get("fingerprint") != fp and ckpt:
            found.append((rec_path.parent, int(rec["max_steps"]), ckpt))
    return max(found, key=lambda f: int(f[2].name[len(STEP_PREFIX) :]), default=None)


def other_length_message(other: tuple[Path, int, Path], max_steps: int) -> str:
    folder, steps, ckpt = other
    return (
        f"--resume with max_steps {max_steps}: this run has no checkpoint, but the same settings "
        f"were trained with max_steps {steps} in {folder} (newest {ckpt.name}). max_steps sets "
        f"the schedule (warmup, then cosine to 0 at step {steps}): continued to step "
        f"{max_steps} it would follow another learning-rate curve than a {max_steps}-step run, "
        f"so this is refused rather than silently starting from scratch. Either drop --resume to train "
        f"{max_steps} steps from step 0 in a new folder, rerun with --max-steps {steps} to use "
        f"or continue that run, or post-train further from its checkpoint with a new schedule "
        f"by setting trainer.model: {ckpt}"
    )


def last_logged(out: Path) -> dict[str, float]:
    log = out / "log.jsonl"
    if not log.exists():
        return {}
    lines, _ = _log_lines(log)
    return json.loads(lines[-1]).get("loss", {}) if lines else {}


def truncate_log(log: Path, step: int) -> None:
    """Drop the records after `step` (logged by the run that was interrupted after its last
    checkpoint) and a torn last line: the resumed run logs those steps again, so the log reads
    like an unbroken run."""
    if not log.exists():
        return
    lines, total = _log_lines(log)
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) != total:
        atomic_write_bytes(log, "".join(ln + "\n" for ln in keep).encode())

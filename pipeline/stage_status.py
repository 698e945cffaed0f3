"""Where one label stage stands, read from the files alone (no Prefect, no model loaded).

Per configured label stage, each image shard is
- done:    its label shard exists under the stage's current fingerprint;
- stale:   label shards exist for it only under other fingerprints (settings or model changed);
- missing: no label shard at all;
- corrupt: its label shard exists but cannot be trusted (unreadable, made from a different image
  shard, rows or `image_id`s that do not match: pipeline/integrity.py); the next run moves it
  aside and recomputes it. Status itself moves nothing.
It also names what makes the current fingerprint (model and key parameters, from the stage or
the folder's lineage.json) and lists the other fingerprint folders on disk: what made each (their
lineage.json) and their size. `unimrg clean` (flows/clean.py) removes those.
`unimrg status` (flows/status.py) puts this beside the trainer's part (trainer/train_status.py).

Usage from Python:
    from pipeline.stage_status import stage_status
    stage_status("depth", load_manifest("data_manifest.yaml")).done
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.integrity import image_shard_problem, label_shard_problem
from pipeline.lineage import describe, read_lineage
from pipeline.manifest import Manifest
from pipeline.shards import Layout, shard_number

__all__ = ["FingerprintFolder", "StageStatus", "folder_bytes", "stage_folders", "stage_status"]


@dataclass
class FingerprintFolder:
    """One fingerprint's output folder on disk and what made it (its lineage record)."""

    fingerprint: str
    path: str
    #: Model and key parameters, from lineage.json ("no lineage record" for older folders).
    made_by: str
    bytes: int
    shards: int
    random_weights: bool = False


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _folder(path: Path, shards: int) -> FingerprintFolder:
    rec = read_lineage(path)
    return FingerprintFolder(
        path.name,
        str(path),
        describe(rec),
        folder_bytes(path),
        shards,
        bool(rec and rec.get("random_weights")),
    )


def stage_folders(layout: Layout, name: str) -> list[FingerprintFolder]:
    """Every fingerprint folder of label stage `name` on disk."""
    return [
        _folder(layout.label_dir(name, fp), len(layout.label_shards(name, fp)))
        for fp in layout.label_fingerprints(name)
    ]


@dataclass
class StageStatus:
    stage: str
    fingerprint: str | None
    shards: int
    done: int = 0
    stale: int = 0
    missing: int = 0
    corrupt: int = 0
    #: Folder of the current fingerprint's label shards.
    labels_dir: str | None = None
    #: Other fingerprints that hold label shards for this stage (older settings or models).
    other_fingerprints: list[str] = field(default_factory=list)
    stale_shards: list[int] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)
    #: Label shard path -> why it cannot be trusted.
    corrupt_shards: dict[str, str] = field(default_factory=dict)
    random_weights: bool = False
    #: Why the fingerprint could not be computed (the model files are missing, say).
    error: str | None = None
    #: What makes the current fingerprint: model and key parameters.
    made_by: str | None = None
    #: The other fingerprints' folders on disk: what made each, its size.
    others: list[dict] = field(default_factory=list)


def stage_status(name: str, manifest: Manifest, layout: Layout | None = None) -> StageStatus:
    """Done / stale / missing / corrupt image shards for one configured label stage."""
    from pipeline.stage import build_stage

    layout = layout or Layout(manifest.out)
    shards = [shard_number(p) for p in layout.image_shards()]
    try:
        stage = build_stage(name, manifest)
        fp = stage.fingerprint()
        random_weights = stage.uses_random_weights()
        record = read_lineage(layout.label_dir(name, fp)) or stage.lineage()
    except Exception as exc:  # report it; status must still show the other stages
        return StageStatus(
            name,
            None,
            len(shards),
            missing=len(shards),
            missing_shards=shards,
            error=f"{type(exc).__name__}: {exc}",
            others=[asdict(f) for f in stage_folders(layout, name)],
        )
    others = [f for f in layout.label_fingerprints(name) if f != fp]
    current = {shard_number(p) for p in layout.label_shards(name, fp)}
    elsewhere = {shard_number(p) for f in others for p in layout.label_shards(name, f)}
    st = StageStatus(
        name,
        fp,
        len(shards),
        labels_dir=str(layout.label_dir(name, fp)),
        other_fingerprints=others,
        random_weights=random_weights,
        made_by=describe(record),
        others=[asdict(f) for f in stage_folders(layout, name) if f.fingerprint != fp],
    )
    for n in shards:
        if n in current:
            label = layout.label_shard(name, fp, n)
            problem = image_shard_problem(layout.image_shard(n)) and "its image shard is bad"
            problem = problem or label_shard_problem(label, layout.image_shard(n))
            if problem:
                st.corrupt += 1
                st.corrupt_shards[str(label)] = problem
            else:
                st.done += 1
        elif n in elsewhere:
            st.stale += 1
            st.stale_shards.append(n)
        else:
            st.missing += 1
            st.missing_shards.append(n)
    return st

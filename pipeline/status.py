"""Where one label stage stands, read from the files alone (no Prefect, no model loaded).

Per configured label stage, each image shard is
- done:    its label shard exists under the stage's current fingerprint;
- stale:   label shards exist for it only under other fingerprints (settings or model changed);
- missing: no label shard at all.
`unimrg status` (flows/status.py) puts this beside the trainer's part (trainer/status.py).

Usage from Python:
    from pipeline.status import stage_status
    stage_status("depth", load_manifest("data_manifest.yaml")).done
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.manifest import Manifest
from pipeline.shards import Layout, shard_number

__all__ = ["StageStatus", "stage_status"]


@dataclass
class StageStatus:
    stage: str
    fingerprint: str | None
    shards: int
    done: int = 0
    stale: int = 0
    missing: int = 0
    #: Folder of the current fingerprint's label shards.
    labels_dir: str | None = None
    #: Other fingerprints that hold label shards for this stage (older settings or models).
    other_fingerprints: list[str] = field(default_factory=list)
    stale_shards: list[int] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)
    random_weights: bool = False
    #: Why the fingerprint could not be computed (the model files are missing, say).
    error: str | None = None


def stage_status(name: str, manifest: Manifest, layout: Layout | None = None) -> StageStatus:
    """Done / stale / missing image shards for one configured label stage."""
    from pipeline.stage import build_stage

    layout = layout or Layout(manifest.out)
    shards = [shard_number(p) for p in layout.image_shards()]
    try:
        stage = build_stage(name, manifest)
        fp = stage.fingerprint()
        random_weights = stage.uses_random_weights()
    except Exception as exc:  # report it; status must still show the other stages
        return StageStatus(
            name,
            None,
            len(shards),
            missing=len(shards),
            missing_shards=shards,
            error=f"{type(exc).__name__}: {exc}",
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
    )
    for n in shards:
        if n in current:
            st.done += 1
        elif n in elsewhere:
            st.stale += 1
            st.stale_shards.append(n)
        else:
            st.missing += 1
            st.missing_shards.append(n)
    return st

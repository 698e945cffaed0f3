"""Where the data stands, read from the files alone (no Prefect, no model loaded).

    unimrg status [-m MANIFEST] [--json]

Per label stage, each image shard is
- done:    its label shard exists under the stage's current fingerprint;
- stale:   label shards exist for it only under other fingerprints (settings or model changed);
- missing: no label shard at all.
For train: whether the final checkpoint (`step_<max_steps>`) of the current train fingerprint
exists, and the newest checkpoint so far.

Usage from Python:
    from pipeline.status import collect_status
    collect_status(load_manifest("data_manifest.yaml"))["stages"]["depth"]["done"]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline.manifest import Manifest
from pipeline.shards import Layout, shard_number

__all__ = ["StageStatus", "TrainStatus", "collect_status", "print_status", "stage_status"]


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


@dataclass
class TrainStatus:
    fingerprint: str | None
    done: bool = False
    max_steps: int = 0
    latest_step: int | None = None
    output_dir: str | None = None
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


def train_status(manifest: Manifest) -> TrainStatus:
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


def collect_status(manifest: Manifest) -> dict[str, Any]:
    """Everything `unimrg status` prints, as plain data."""
    layout = Layout(manifest.out)
    shards = layout.image_shards()
    images = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    out: dict[str, Any] = {
        "output_dir": str(layout.root),
        "images": {"shards": len(shards), "rows": images, "dir": str(layout.images_dir)},
        "stages": {},
    }
    from pipeline.stage import STAGE_NAMES

    for name in STAGE_NAMES:
        if getattr(manifest.stages, name, None) is not None:
            out["stages"][name] = asdict(stage_status(name, manifest, layout))
    if manifest.trainer is not None:
        out["train"] = asdict(train_status(manifest))
    return out


def _ranges(ns: list[int], limit: int = 6) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (shortened past `limit` ranges)."""
    runs: list[tuple[int, int]] = []
    for n in ns:
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    return ", ".join(text) + (f", ... ({len(runs) - limit} more)" if len(runs) > limit else "")


def print_status(manifest: Manifest, as_json: bool = False) -> int:
    """Print the status; exit code 1 when a stage's fingerprint could not be computed."""
    st = collect_status(manifest)
    errors = [s["error"] for s in st["stages"].values() if s["error"]]
    if st.get("train", {}).get("error"):
        errors.append(st["train"]["error"])
    if as_json:
        print(json.dumps(st, indent=2))
        return 1 if errors else 0

    from rich.console import Console
    from rich.table import Table

    con = Console()
    img = st["images"]
    con.print(f"[bold]{st['output_dir']}[/]: {img['rows']} images in {img['shards']} shard(s)")
    table = Table("stage", "fingerprint", "done", "stale", "missing")
    table.add_column("where / why", overflow="fold")  # paths are never cut short
    for name, s in st["stages"].items():
        where = s["error"] or s["labels_dir"]
        if s["stale_shards"]:
            where += (
                f"\n  stale shards {_ranges(s['stale_shards'])} (labels under "
                f"{', '.join(s['other_fingerprints'])})"
            )
        if s["missing_shards"] and not s["error"]:
            where += f"\n  missing shards {_ranges(s['missing_shards'])}"
        if s["random_weights"]:
            where += "\n  random weights (tiny-random): labels are noise"
        table.add_row(
            name, s["fingerprint"] or "-", str(s["done"]), str(s["stale"]), str(s["missing"]), where
        )
    if "train" in st:
        t = st["train"]
        if t["error"]:
            table.add_row("train", "-", "", "", "", t["error"])
        else:
            latest = f"latest step {t['latest_step']}" if t["latest_step"] else "no checkpoint"
            table.add_row(
                "train",
                t["fingerprint"],
                "yes" if t["done"] else "no",
                "",
                "",
                f"{t['output_dir']}\n  {latest} of {t['max_steps']}",
            )
    con.print(table)
    return 1 if errors else 0

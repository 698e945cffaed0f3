"""Images joined with their depth and segmentation targets, as a Hugging Face `datasets.Dataset`.

    from pipeline.dataset import load_labelled
    ds = load_labelled("data_manifest.yaml")        # the manifest's current fingerprints
    ds[0]["image"], ds[0]["depth"], ds[0]["segmentation"]   # PIL images, decoded by `datasets`

    unimrg export --to DIR    # the same rows as Parquet in the layout `push_to_hub` writes

Only the label shards of the fingerprints the manifest uses now are read (a glob over
`labels/depth/*/` would mix settings). Label shards are row-aligned with the image shard of the
same number; the join checks `image_id` row by row. Columns:

    image_id, image, width, height, source          from images/shard-NNNNN.parquet
    depth, depth_png16, depth_min, depth_max         depth target (8-bit), 16-bit relative depth
                                                     and its range (pipeline/depth_png.py)
    segmentation, segmentation_masks                 segmentation target, COCO RLE masks

An image shard without a label shard for a stage is left out (`unimrg status` lists them); a row
whose label has an error keeps its image with that label empty (None), unless `complete=True`.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.locks import shared
from pipeline.shards import IMAGE_TYPE, Layout, make_readable, shard_number, with_hf_features

if TYPE_CHECKING:
    import datasets

    from pipeline.manifest import Manifest

__all__ = ["export_dataset", "labelled_tables", "load_labelled"]

#: stage -> (label column -> dataset column)
COLUMNS = {
    "depth": {
        "target": "depth",
        "depth_png16": "depth_png16",
        "depth_min": "depth_min",
        "depth_max": "depth_max",
    },
    "segment": {"target": "segmentation", "masks": "segmentation_masks"},
}
IMAGE_COLUMNS = ["image_id", "image", "width", "height", "source"]


def _manifest(manifest: Manifest | str | Path) -> Manifest:
    from pipeline.manifest import load_manifest

    return load_manifest(manifest) if isinstance(manifest, (str, Path)) else manifest


def labelled_tables(
    manifest: Manifest | str | Path,
    stages: list[str] | None = None,
    complete: bool = False,
):
    """Yield (shard number, joined Arrow table) per image shard that has every stage's labels."""
    from pipeline.stage import build_stage

    m = _manifest(manifest)
    layout = Layout(m.out)
    names = stages or [s for s in COLUMNS if getattr(m.stages, s, None) is not None]
    if not names:
        raise ValueError("stages: no depth or segment stage configured in the manifest")
    dirs = {s: layout.label_dir(s, build_stage(s, m).fingerprint()) for s in names}
    for image_shard in layout.image_shards():
        n = shard_number(image_shard)
        labels = {s: d / image_shard.name for s, d in dirs.items()}
        if not all(p.is_file() for p in labels.values()):
            continue
        table = pq.read_table(image_shard, columns=IMAGE_COLUMNS)
        keep = None
        for stage, path in labels.items():
            cols = COLUMNS[stage]
            lab = pq.read_table(path, columns=["image_id", "error", *cols])
            if lab.column("image_id") != table.column("image_id"):
                raise ValueError(
                    f"{path}: image_id does not match {image_shard} row by row (not row-aligned)"
                )
            ok = pc.is_null(lab.column("error"))
            keep = ok if keep is None else pc.and_(keep, ok)
            for src, dst in cols.items():
                col = lab.column(src)
                if pa.types.is_binary(col.type):  # shards written before image cells
                    col = _as_image_cells(col)
                table = table.append_column(pa.field(dst, col.type), col)
        if complete and keep is not None:
            table = table.filter(keep)
        yield n, table.replace_schema_metadata(with_hf_features(table.schema).metadata)


def _as_image_cells(col: pa.ChunkedArray) -> pa.ChunkedArray:
    chunks = [
        pa.StructArray.from_arrays(
            [c, pa.nulls(len(c), pa.string())], fields=list(IMAGE_TYPE), mask=c.is_null()
        )
        for c in col.chunks
    ]
    return pa.chunked_array(chunks, type=IMAGE_TYPE)


def load_labelled(
    manifest: Manifest | str | Path,
    stages: list[str] | None = None,
    complete: bool = False,
) -> datasets.Dataset:
    """One call: every image with its depth and segmentation targets (the manifest's current
    fingerprints) as a `datasets.Dataset`; `image`, `depth`, `depth_png16` and `segmentation`
    decode as PIL images. `complete`: leave out rows whose label has an error."""
    import datasets

    tables = [t for _, t in labelled_tables(manifest, stages, complete)]
    if not tables:
        raise ValueError("no image shard has labels under the current fingerprints yet")
    table = pa.concat_tables(tables)
    features = datasets.Features.from_arrow_schema(table.schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def export_dataset(manifest: Manifest | str | Path, to: str | Path, complete: bool = False) -> Path:
    """Write the joined rows to `to/data/train-NNNNN-of-MMMMM.parquet` (the layout
    `push_to_hub` writes; `load_dataset(to)` and `hf upload` take it as it is) with a README.md
    dataset card naming the fingerprints. `to` must be new or empty.

    Written into a temporary folder of its own beside `to` (a `.<to>.<random>.tmp` it made,
    never one that was there) and renamed into place. Refused while `unimrg run`, ingest or
    `unimrg clean` holds the output folder (pipeline/locks.py: shared locks, so exports run
    side by side)."""
    m = _manifest(manifest)
    to = Path(to)
    if to.exists() and any(to.iterdir()):
        raise ValueError(f"--to: {to} exists and is not empty")
    with ExitStack() as locks:
        if m.out.is_dir():
            for lock, busy in (
                (".run.lock", "a `unimrg run` or clean"),
                (".ingest.lock", "an ingest"),
            ):
                locks.enter_context(shared(m.out / lock, f"{busy} is writing there"))
        tables = list(labelled_tables(m, complete=complete))
        if not tables:
            raise ValueError("no image shard has labels under the current fingerprints yet")
        to.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=to.parent, prefix=f".{to.name}.", suffix=".tmp"))
        try:
            _write_export(m, tables, tmp)
            if to.exists():
                to.rmdir()
            tmp.rename(to)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else half-written
    return to


def _write_export(m: Manifest, tables: list[tuple[int, pa.Table]], tmp: Path) -> None:
    from pipeline.lineage import read_lineage
    from pipeline.stage import build_stage

    (tmp / "data").mkdir()
    rows = 0
    for i, (_, table) in enumerate(tables):
        pq.write_table(table, tmp / "data" / f"train-{i:05d}-of-{len(tables):05d}.parquet")
        rows += table.num_rows
    layout = Layout(m.out)
    made_by = {}
    for s in COLUMNS:
        if getattr(m.stages, s, None) is not None:
            fp = build_stage(s, m).fingerprint()
            made_by[s] = (fp, read_lineage(layout.label_dir(s, fp)))
    (tmp / "README.md").write_text(_dataset_card(rows, made_by))
    make_readable(tmp)


def _dataset_card(rows: int, made_by: dict[str, tuple[str, dict[str, Any] | None]]) -> str:
    from pipeline.lineage import describe

    lines = [
        "---",
        "configs:",
        "  - config_name: default",
        "    data_files:",
        "      - split: train",
        "        path: data/train-*",
        "tags: [unimrg, depth-estimation, image-segmentation]",
        "---",
        "",
        "# UniMRG post-training data",
        "",
        f"{rows} images with their depth and segmentation targets, written by `unimrg export`.",
        "",
        "| stage | fingerprint | made by |",
        "| --- | --- | --- |",
    ]
    noise = False
    for stage, (fp, rec) in made_by.items():
        lines.append(f"| {stage} | `{fp}` | {describe(rec)} |")
        noise = noise or bool(rec and rec.get("random_weights"))
    if noise:
        lines += ["", "**Random weights (tiny-random): these labels are noise.**"]
    return "\n".join(lines) + "\n"

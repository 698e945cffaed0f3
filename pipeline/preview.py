"""Contact sheet: image | depth target | segmentation target for the first N images.

    unimrg preview [-m MANIFEST] --out FILE.png [-n N]

Reads the first N rows of the image shards (in shard order) and the row-aligned label shards
under each stage's current fingerprint. A cell whose label shard does not exist yet (or whose
row failed) is drawn grey with the reason. When a stage uses `tiny-random` weights, the sheet
carries a red "random weights" banner: those labels are noise.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from pipeline.images import decode_rgb
from pipeline.manifest import Manifest
from pipeline.shards import Layout, atomic_write_bytes, image_bytes, shard_number

__all__ = ["make_preview"]

CELL = (192, 144)  # width, height of one cell in pixels
PAD = 6
HEADER = 28
COLUMNS = ("image", "depth", "segment")


def _first_rows(layout: Layout, n: int) -> list[tuple[int, int, str, bytes]]:
    """(shard, row, image_id, image bytes) of the first n images."""
    out: list[tuple[int, int, str, bytes]] = []
    for path in layout.image_shards():
        if len(out) >= n:
            break
        pf = pq.ParquetFile(path)
        batch = next(pf.iter_batches(batch_size=n - len(out), columns=["image_id", "image"]))
        ids = batch.column("image_id").to_pylist()
        imgs = batch.column("image").to_pylist()
        out += [(shard_number(path), i, ids[i], imgs[i]["bytes"]) for i in range(len(ids))]
    return out


def _targets(path: Path, rows: int) -> tuple[list[str], list[bytes | None], list[str | None]]:
    pf = pq.ParquetFile(path)
    batch = next(pf.iter_batches(batch_size=rows, columns=["image_id", "target", "error"]))
    return (
        batch.column("image_id").to_pylist(),
        [image_bytes(c) for c in batch.column("target").to_pylist()],
        batch.column("error").to_pylist(),
    )


def _fit(im: Image.Image) -> Image.Image:
    im = im.convert("RGB")
    im.thumbnail(CELL)
    cell = Image.new("RGB", CELL, (24, 24, 24))
    cell.paste(im, ((CELL[0] - im.width) // 2, (CELL[1] - im.height) // 2))
    return cell


def _placeholder(text: str, font) -> Image.Image:
    cell = Image.new("RGB", CELL, (90, 90, 90))
    d = ImageDraw.Draw(cell)
    words, lines = text.split(), [""]
    for w in words:  # crude wrap to the cell width
        if d.textlength(lines[-1] + " " + w, font=font) > CELL[0] - 8:
            lines.append(w)
        else:
            lines[-1] = (lines[-1] + " " + w).strip()
    d.multiline_text((4, 4), "\n".join(lines[:8]), fill=(230, 230, 230), font=font)
    return cell


def make_preview(
    manifest: Manifest, out: str | Path, n: int = 8, stages: dict[str, Any] | None = None
) -> Path:
    """Write the contact sheet PNG to `out` (atomically) and return its path. `stages`: label
    stages the caller has built already (by name); the others configured are built here."""
    from pipeline.stage import STAGE_NAMES, build_stage

    if n <= 0:
        raise ValueError(f"-n: expected a positive number of images, got {n}")
    layout = Layout(manifest.out)
    rows = _first_rows(layout, n)
    if not rows:
        raise ValueError(f"{layout.images_dir}: no image shards yet; run `unimrg ingest` first")
    font = ImageFont.load_default(size=13)
    random_weights = []
    # stage -> shard -> (ids, targets, errors), or the reason there is nothing to show
    labels: dict[str, dict[int, tuple] | str] = {}
    for name in STAGE_NAMES:
        if getattr(manifest.stages, name, None) is None:
            labels[name] = f"stages.{name} not configured"
            continue
        stage = (stages or {}).get(name) or build_stage(name, manifest)
        if stage.uses_random_weights():
            random_weights.append(name)
        fp = stage.fingerprint()
        per_shard = {}
        for shard in sorted({r[0] for r in rows}):
            path = layout.label_shard(name, fp, shard)
            if path.exists():
                per_shard[shard] = _targets(path, n)
        labels[name] = per_shard

    banner = HEADER if random_weights else 0
    width = PAD + len(COLUMNS) * (CELL[0] + PAD)
    height = banner + HEADER + len(rows) * (CELL[1] + PAD) + PAD
    sheet = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    if random_weights:
        draw.rectangle((0, 0, width, banner - 2), fill=(200, 30, 30))
        draw.text(
            (PAD, 6),
            f"RANDOM WEIGHTS ({', '.join(random_weights)} from tiny-random): labels are noise",
            fill=(255, 255, 255),
            font=font,
        )
    for c, title in enumerate(COLUMNS):
        draw.text((PAD + c * (CELL[0] + PAD), banner + 8), title, fill=(255, 255, 255), font=font)
    for r, (shard, row, image_id, data) in enumerate(rows):
        y = banner + HEADER + r * (CELL[1] + PAD)
        cells = [_fit(decode_rgb(data))]  # oriented as ingest and the labels are
        for name in STAGE_NAMES:
            got = labels[name]
            if isinstance(got, str):
                cells.append(_placeholder(got, font))
            elif shard not in got:
                cells.append(_placeholder(f"{name}: shard-{shard:05d} not labelled yet", font))
            else:
                ids, targets, errors = got[shard]
                if row >= len(ids) or ids[row] != image_id:
                    raise ValueError(
                        f"{name} labels for shard-{shard:05d} are not row-aligned "
                        f"with the image shard at row {row}"
                    )
                if targets[row] is None:
                    cells.append(_placeholder(f"failed: {errors[row]}", font))
                else:
                    cells.append(_fit(Image.open(io.BytesIO(targets[row]))))
        for c, cell in enumerate(cells):
            sheet.paste(cell, (PAD + c * (CELL[0] + PAD), y))
    out = Path(out)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out

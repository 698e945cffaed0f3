"""Disk per 640x480 image for each output, and ingest's CPU cost per image (docs/scale.md).

Makes 64 distinct 640x480 photo-like JPEGs from the bundled photos (examples/images: crops,
flips, small shifts of brightness), ingests them (timed: images/s in one process), labels them
with the `tiny-random` depth and segment stages, and prints the stored bytes per row of every
column (Parquet column chunks as written, compression included) and per file.

`tiny-random` outputs are noise, which matters for two columns: the depth `target` (8-bit PNG,
compressed) of a noise map is larger than a real, smooth one, and random SAM weights keep
almost no masks. So it also prints a proxy for real segment labels: masks made from the photos
themselves (colour regions: 16-colour quantisation, connected components of at least 0.1% of
the image, at most 100 per image, about what SAM ViT-H keeps on a busy photo), run through the
stage's own RLE, edge render and PNG code (timed: the segment stage's CPU work per image after
the model) and written with its schema. `depth_png16` is stored
uncompressed (PNG level 0), so its size does not depend on the content.

    PYTHONPATH=. python benchmarks/label_bytes.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 64


def photos(n: int) -> list[Image.Image]:
    """`n` distinct 640x480 RGB images cut from the bundled photos."""
    srcs = []
    for p in sorted((ROOT / "examples" / "images").iterdir()):
        if p.suffix.lower() in (".jpg", ".png"):
            im = Image.open(p).convert("RGB")
            scale = max(640 / im.width, 480 / im.height) * 1.25
            srcs.append(im.resize((round(im.width * scale), round(im.height * scale))))
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        im = srcs[i % len(srcs)]
        x, y = rng.integers(0, im.width - 640 + 1), rng.integers(0, im.height - 480 + 1)
        crop = im.crop((x, y, x + 640, y + 480))
        if i // len(srcs) % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(ImageEnhance.Brightness(crop).enhance(float(rng.uniform(0.85, 1.15))))
    return out


def column_bytes(path: Path) -> tuple[int, dict[str, int]]:
    """(rows, column -> compressed bytes) of a Parquet file, from its footer."""
    md = pq.ParquetFile(path).metadata
    sizes: dict[str, int] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            top = col.path_in_schema.split(".")[0]
            sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    return md.num_rows, sizes


def report(title: str, files: list[Path]) -> None:
    rows, sizes = 0, {}
    for f in files:
        r, s = column_bytes(f)
        rows += r
        for k, v in s.items():
            sizes[k] = sizes.get(k, 0) + v
    total = sum(f.stat().st_size for f in files)
    print(f"\n{title}: {rows} rows, {total / rows / 1024:.1f} KiB per row on disk")
    for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<14} {v / rows / 1024:9.1f} KiB per row")


def proxy_masks(img: Image.Image, max_masks: int = 100):
    """Bool masks [N, H, W] of the image's colour regions (a stand-in for SAM's masks)."""
    import cv2
    import torch

    q = np.asarray(img.quantize(16, method=Image.Quantize.MEDIANCUT))
    masks = []
    for c in np.unique(q):
        n, labels = cv2.connectedComponents((q == c).astype(np.uint8), connectivity=8)
        for k in range(1, n):
            m = labels == k
            if m.sum() >= 0.001 * m.size:
                masks.append(m)
    masks.sort(key=lambda m: -m.sum())
    return torch.from_numpy(np.stack(masks[:max_masks]))


def segment_proxy(images: list[Image.Image], out: Path) -> Path:

    from pipeline.shards import label_table, write_parquet_atomic
    from pipeline.stages.segment.fast import masks_to_coco_rle
    from pipeline.stages.segment.render import render_edges, target_png
    from pipeline.stages.segment.stage import segment_schema

    rows = []
    finish = 0.0  # the stage's CPU work after the masks: RLE, edge render, PNG
    for i, img in enumerate(images):
        masks = proxy_masks(img)
        t0 = time.perf_counter()
        rles = masks_to_coco_rle(masks)
        target = target_png(render_edges(masks))
        finish += time.perf_counter() - t0
        ys, xs = masks.any(2), masks.any(1)
        rows.append(
            {
                "image_id": f"{i:064d}",
                "error": None,
                "masks": [
                    {
                        "counts": r["counts"],
                        "size": [480, 640],
                        "predicted_iou": 0.9,
                        "stability_score": 0.96,
                        "bbox": [
                            float(xs[k].nonzero()[0]),
                            float(ys[k].nonzero()[0]),
                            float(xs[k].nonzero()[-1] - xs[k].nonzero()[0] + 1),
                            float(ys[k].nonzero()[-1] - ys[k].nonzero()[0] + 1),
                        ],
                        "area": int(masks[k].sum()),
                    }
                    for k, r in enumerate(rles)
                ],
                "target": target,
                "width": 640,
                "height": 480,
                "n_masks": len(rles),
            }
        )
    path = out / "segment-proxy.parquet"
    write_parquet_atomic(label_table(rows, segment_schema("edges", False)), path)
    n = [r["n_masks"] for r in rows]
    print(
        f"\nproxy masks per image: mean {np.mean(n):.1f}, min {min(n)}, max {max(n)}; RLE + "
        f"edge render + PNG {finish / len(images) * 1e3:.1f} ms per image (one process, CPU)"
    )
    return path


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="label-bytes-"))
    try:
        measure(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def measure(base: Path) -> None:
    os.environ.setdefault("UNIMRG_CACHE", str(base / "cache"))
    imgs = photos(N_IMAGES)
    (base / "imgs").mkdir()
    for i, im in enumerate(imgs):
        im.save(base / "imgs" / f"{i:03d}.jpg", quality=90)
    manifest = {
        "output_dir": "out",
        "shard_size": 32,
        "sources": [{"name": "imgs", "path": "imgs"}],
        "stages": {
            "depth": {"model": "tiny-random", "batch_size": 4},
            "segment": {"model_type": "tiny-random", "points_per_side": 8},
        },
    }
    (base / "m.yaml").write_text(yaml.safe_dump(manifest))

    from pipeline.ingest import ingest
    from pipeline.manifest import load_manifest
    from pipeline.shards import Layout
    from pipeline.stage import build_stage, run_stage

    m = load_manifest(base / "m.yaml")
    t0 = time.perf_counter()
    res = ingest(m, progress=False)
    secs = time.perf_counter() - t0
    print(f"ingest: {res.new} 640x480 JPEGs in {secs:.2f} s = {res.new / secs:.0f} images/s")
    jpeg = sum(f.stat().st_size for f in (base / "imgs").iterdir()) / N_IMAGES
    print(f"source JPEG (quality 90): {jpeg / 1024:.1f} KiB per image")
    layout = Layout(m.out)
    report("image shards", layout.image_shards())
    for name in ("depth", "segment"):
        stage = build_stage(name, m)
        run_stage(stage, layout)
        report(f"{name} label shards (tiny-random)", layout.label_shards(name, stage.fingerprint()))
    report("segment proxy (colour-region masks)", [segment_proxy(imgs, base)])


if __name__ == "__main__":
    main()

"""The two built-in probes: they need no download and run on the held-out ingested images.

    spatial     "which marked object is closer?": two SAM masks of one held-out image whose
                median depths (Depth Anything relative depth, larger = nearer) differ clearly are
                boxed in red and blue; a two-choice question asks which is closer, the answer
                comes from the depth label. `build_spatial_benchmark` writes it as a VLMEvalKit
                TSV, scored as `mcq`: agreement with the pseudo-labeller, not with people.
    generation  the paper's Figure 1 as numbers: the model generates the depth map, the
                segmentation map and the image itself for each held-out image; scored against
                the labels with `depth_metrics` (AbsRel and delta < 1.25 after least-squares
                scale and shift), `boundary_f_score` and `psnr`.

Metric definitions (docs/eval.md): all on the square training view of the image (long side to
the model's size, padded), pixels of the padding excluded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.shards import image_bytes

__all__ = [
    "SPATIAL_QUESTION",
    "HeldOutImage",
    "boundary_f_score",
    "build_spatial_benchmark",
    "depth_metrics",
    "held_out_images",
    "psnr",
    "run_generation_probe",
]

SPATIAL_QUESTION = "Two objects are marked, one with a red box and one with a blue box. Which is closer to the camera?"
SPATIAL_OPTIONS = {"A": "the object in the red box", "B": "the object in the blue box"}
_RED, _BLUE = (230, 25, 25), (25, 80, 230)
#: masks smaller than this share of the image are too small to box; larger ones are background
_MIN_AREA, _MAX_AREA = 0.01, 0.5
#: the two medians must differ by this share of the image's depth range (5th..95th percentile)
_MIN_GAP = 0.2
_PAIRS_PER_IMAGE = 2
#: depth pixels with a target below this (the far end of the min-max scaled label) are left out
#: of AbsRel, which divides by the target
_DEPTH_FLOOR = 0.05


# --------------------------------------------------------------------------------------------
# metrics


def depth_metrics(pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """AbsRel and delta < 1.25 of `pred` after least-squares scale and shift onto `target`.

    Both are relative depth maps scaled to [0, 1] (near = 1, as the labels are); `valid` masks
    the pixels that count. The fit solves min_{s,b} sum (s * pred + b - target)^2 over valid
    pixels; AbsRel = mean |aligned - t| / t and delta1 = share of max(aligned/t, t/aligned) <
    1.25, both over valid pixels with t >= 0.05 (aligned clipped to >= 1e-3).
    """
    p = np.asarray(pred, np.float64).ravel()
    t = np.asarray(target, np.float64).ravel()
    m = np.ones_like(t, bool) if valid is None else np.asarray(valid, bool).ravel()
    m &= t >= _DEPTH_FLOOR
    if m.sum() < 2:
        return {"abs_rel": float("nan"), "delta1": float("nan")}
    a = np.stack([p[m], np.ones(int(m.sum()))], 1)
    (s, b), *_ = np.linalg.lstsq(a, t[m], rcond=None)
    aligned = np.clip(s * p[m] + b, 1e-3, None)
    tt = t[m]
    ratio = np.maximum(aligned / tt, tt / aligned)
    return {
        "abs_rel": float(np.mean(np.abs(aligned - tt) / tt)),
        "delta1": float(np.mean(ratio < 1.25)),
    }


def boundary_f_score(pred: np.ndarray, target: np.ndarray, tolerance: int | None = None) -> float:
    """F-score of boundary pixels (boolean maps) matched within `tolerance` pixels.

    Precision: share of predicted boundary pixels within `tolerance` of a target boundary pixel;
    recall: the converse; F = 2PR / (P + R). Default tolerance: 0.75% of the image diagonal,
    at least 1 px (DAVIS's convention). Both empty: 1.0; one empty: 0.0.
    """
    import cv2

    pred = np.asarray(pred, bool)
    target = np.asarray(target, bool)
    if not pred.any() and not target.any():
        return 1.0
    if not pred.any() or not target.any():
        return 0.0
    if tolerance is None:
        tolerance = max(1, round(0.0075 * float(np.hypot(*pred.shape))))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    near_t = cv2.dilate(target.astype(np.uint8), k).astype(bool)
    near_p = cv2.dilate(pred.astype(np.uint8), k).astype(bool)
    precision = float((pred & near_t).sum() / pred.sum())
    recall = float((target & near_p).sum() / target.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def psnr(pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images (inf when identical)."""
    d = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    if valid is not None:
        d = d[..., np.asarray(valid, bool)] if d.ndim == 3 else d[np.asarray(valid, bool)]
    mse = float(np.mean(d**2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


# --------------------------------------------------------------------------------------------
# held-out images with their labels


@dataclass
class HeldOutImage:
    image_id: str
    image: bytes
    depth: np.ndarray | None  # float32 (H, W) relative depth, larger = nearer
    depth_target: bytes | None  # the rendered training target (PNG)
    masks: list[dict[str, Any]]  # COCO RLE masks of the segment label
    seg_target: bytes | None


def held_out_images(manifest) -> tuple[list[HeldOutImage], dict[str, str]]:
    """The held-out images (`eval.held_out_images`) with their depth and segment labels, and the
    label fingerprints they came from."""
    import pyarrow.parquet as pq

    from pipeline.shards import Layout
    from trainer.data import resolve_label_fingerprints
    from trainer.evaluation.heldout import held_out_count, held_out_ids
    from trainer.image_index import ImageIndex

    layout = Layout(manifest.out)
    index = ImageIndex.build(layout)
    ids = held_out_ids(index.image_ids, held_out_count(manifest))
    fps = resolve_label_fingerprints(manifest)
    out: list[HeldOutImage] = []
    tables: dict[tuple[str, int], Any] = {}

    def table(kind: str, n: int):
        if (kind, n) not in tables:
            if kind == "images":
                path = index.shards[n]
            else:
                path = layout.label_shard(kind, fps[kind], n) if kind in fps else None
            tables[(kind, n)] = pq.read_table(path) if path and path.exists() else None
        return tables[(kind, n)]

    for iid in ids:
        g = index.by_id[iid]
        n, r = int(index.shard_no[g]), int(index.row[g])
        img = table("images", n).column("image")[r].as_py()["bytes"]
        depth = depth_target = seg_target = None
        masks: list[dict[str, Any]] = []
        d = table("depth", n)
        if d is not None and d.column("image_id")[r].as_py() == iid:
            row = {c: d.column(c)[r].as_py() for c in d.column_names if c != "image_id"}
            depth_target = image_bytes(row.get("target"))
            if row.get("depth_png16") is not None:
                from pipeline.depth_png import decode_depth_png16

                depth = decode_depth_png16(
                    image_bytes(row["depth_png16"]), row["depth_min"], row["depth_max"]
                )
        s = table("segment", n)
        if s is not None and s.column("image_id")[r].as_py() == iid:
            seg_target = image_bytes(s.column("target")[r].as_py())
            if "masks" in s.column_names:
                masks = s.column("masks")[r].as_py() or []
        out.append(HeldOutImage(iid, img, depth, depth_target, masks, seg_target))
    return out, fps


# --------------------------------------------------------------------------------------------
# spatial probe


def _decode_mask(m: dict[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts = m["counts"]
    rle = {
        "size": list(m["size"]),
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }
    return mask_utils.decode(rle).astype(bool)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def spatial_questions(item: HeldOutImage, max_pairs: int = _PAIRS_PER_IMAGE) -> list[dict]:
    """Up to `max_pairs` questions about one image (empty when its labels allow none)."""
    from PIL import ImageDraw

    from pipeline.images import decode_rgb

    if item.depth is None or not item.masks:
        return []
    img = decode_rgb(item.image)
    h, w = item.depth.shape
    if img.size != (w, h):
        return []
    lo, hi = np.percentile(item.depth, [5, 95])
    if hi - lo <= 0:
        return []
    cands = []
    for m in item.masks:
        mask = _decode_mask(m)
        if mask.shape != (h, w) or not (_MIN_AREA <= mask.mean() <= _MAX_AREA):
            continue
        cands.append((float(np.median(item.depth[mask])), _bbox(mask), int(mask.sum())))
    cands = sorted(cands, key=lambda c: -c[2])[:8]
    pairs = []
    for i in range(len(cands)):
        for j in range(i + 1, len(cands)):
            gap = abs(cands[i][0] - cands[j][0]) / (hi - lo)
            if gap >= _MIN_GAP:
                pairs.append((gap, i, j))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    questions = []
    used: set[int] = set()
    for _, i, j in pairs:
        if len(questions) == max_pairs:
            break
        if i in used or j in used:
            continue
        used |= {i, j}
        # Which mask gets the red box comes from a hash, so "A" is not always the answer.
        k = len(questions)
        flip = hashlib.sha256(f"{item.image_id}:{k}".encode()).digest()[0] % 2 == 1
        red, blue = (cands[j], cands[i]) if flip else (cands[i], cands[j])
        canvas = img.copy()
        draw = ImageDraw.Draw(canvas)
        width = max(2, round(max(w, h) / 150))
        for (_, box, _), colour in ((red, _RED), (blue, _BLUE)):
            draw.rectangle(box, outline=colour, width=width)
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        questions.append(
            {
                "index": f"{item.image_id[:16]}-{k}",
                "image": base64.b64encode(buf.getvalue()).decode(),
                "question": SPATIAL_QUESTION,
                **SPATIAL_OPTIONS,
                "answer": "A" if red[0] > blue[0] else "B",
                "category": "spatial",
                "image_id": item.image_id,
            }
        )
    return questions


def build_spatial_benchmark(items: list[HeldOutImage], path: Path, max_questions: int) -> int:
    """Write the spatial probe as a VLMEvalKit TSV at `path` (atomically); returns the number of
    questions (0: nothing written)."""
    from pipeline.shards import atomic_write_bytes

    rows: list[dict] = []
    for item in items:
        rows += spatial_questions(item)
        if len(rows) >= max_questions:
            rows = rows[:max_questions]
            break
    if not rows:
        return 0
    cols = ["index", "image", "question", "A", "B", "answer", "category", "image_id"]
    text = "\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in rows)
    atomic_write_bytes(Path(path), text.encode())
    return len(rows)


# --------------------------------------------------------------------------------------------
# generation probe


def _content_mask(data: bytes, size: int) -> np.ndarray:
    """Where the image (not the square padding) lies in the square training view."""
    from pipeline.images import decode_rgb

    w, h = decode_rgb(data).size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    m = np.zeros((size, size), bool)
    x0, y0 = (size - nw) // 2, (size - nh) // 2
    m[y0 : y0 + nh, x0 : x0 + nw] = True
    return m


def run_generation_probe(
    adapter, items: list[HeldOutImage], out_dir: Path, prompts: dict[str, str], batch_size: int
) -> dict[str, Any]:
    """Generate depth, segmentation and reconstruction for `items`; write predictions.jsonl
    (one row per image) and grid.png into out_dir; return the mean scores.

    Images without a depth (segment) label are scored on the other tasks only.
    """
    import torch

    from pipeline.shards import atomic_write_bytes
    from trainer.probe_grid import grid_png
    from trainer.resize import square_image

    size = adapter.image_size
    fill = tuple(int(m * 255) for m in adapter.image_mean)
    rows: list[dict[str, Any]] = []
    grid_cols: dict[str, list] = {
        k: []
        for k in (
            "input",
            "reconstruction",
            "depth target",
            "depth generated",
            "segmentation target",
            "segmentation generated",
        )
    }
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = torch.stack([torch.from_numpy(square_image(it.image, size, fill)) for it in chunk])
        gen = {t: adapter.generate(images, prompts[t], seed=0).cpu().numpy() for t in prompts}
        for i, it in enumerate(chunk):
            valid = _content_mask(it.image, size)
            x = images[i].numpy()
            row: dict[str, Any] = {"image_id": it.image_id}
            grid_cols["input"].append(x)
            if "reconstruction" in gen:
                row["recon_psnr"] = psnr(gen["reconstruction"][i], x, valid)
                grid_cols["reconstruction"].append(gen["reconstruction"][i])
            if "depth" in gen and it.depth_target is not None:
                t = square_image(it.depth_target, size, (0, 0, 0))
                row.update(
                    {
                        f"depth_{k}": v
                        for k, v in depth_metrics(
                            gen["depth"][i].mean(0) / 255.0, t.mean(0) / 255.0, valid
                        ).items()
                    }
                )
                grid_cols["depth target"].append(t)
                grid_cols["depth generated"].append(gen["depth"][i])
            if "segmentation" in gen and it.seg_target is not None:
                t = square_image(it.seg_target, size, (0, 0, 0))
                row["seg_boundary_f"] = boundary_f_score(
                    (gen["segmentation"][i].mean(0) > 127) & valid, (t.mean(0) > 127) & valid
                )
                grid_cols["segmentation target"].append(t)
                grid_cols["segmentation generated"].append(gen["segmentation"][i])
            rows.append(row)
    keys = ["depth_abs_rel", "depth_delta1", "seg_boundary_f", "recon_psnr"]
    scores = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
        if vals:
            scores[k] = float(np.mean(vals))
    scores["images"] = len(rows)
    out_dir = Path(out_dir)
    atomic_write_bytes(
        out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()
    )
    columns = [(name, np.stack(v)) for name, v in grid_cols.items() if len(v) == len(rows)]
    title = "generation probe on held-out images"
    if adapter.random_weights:
        title += " | RANDOM WEIGHTS (tiny-random): output is noise"
    atomic_write_bytes(out_dir / "grid.png", grid_png(columns, title))
    return scores

"""Segmentation throughput: segment-anything's `SamAutomaticMaskGenerator` vs the fast path in
each precision mode (`exact`, `fast`).

All run in one process on the same device, on the same model and images, end to end through the
segment stage (decode, masks, COCO RLE, edge render, PNG). Prints img/s for each and, per mode,
the speed-up and the agreement with the reference: mask count difference per image, the fraction
of reference masks with a mask at IoU >= 0.9 (and 0.99), and the mean best IoU.

Real architectures with random weights (weights do not change the cost of a forward pass). Plain
random weights keep no mask at the default thresholds, so by default (`--weights keep-some`) the
random model is changed as `tiny-random` is (`pipeline.stages.segment.model.keep_some_masks`: mask head
x2000, IoU head bias +0.9) so that masks survive and reach NMS, RLE and rendering. `--loose`
turns the two filters off instead.

    PYTHONPATH=. python benchmarks/segment_throughput.py --device cuda --models vit_b,vit_h
    PYTHONPATH=. python benchmarks/segment_throughput.py --device cpu --tiny --n-images 2
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _images(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """Seeded JPEGs with flat discs over smooth gradients (something for SAM to segment)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        img = np.stack(
            [(xx * (1 + i % 3) + yy) % 256, (yy * 2 + i * 17) % 256, (xx + yy * 3) % 256], -1
        )
        img = img.astype(np.uint8)
        for _ in range(12):
            cx, cy, r = (
                rng.integers(0, w),
                rng.integers(0, h),
                rng.integers(min(w, h) // 20, min(w, h) // 5),
            )
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rles(row: dict) -> list[dict]:
    return [{"size": m["size"], "counts": m["counts"].encode()} for m in row["masks"] or []]


def agreement(ref_rows: list[dict], rows: list[dict]) -> dict[str, float]:
    """How far `rows` are from the reference's rows on the same images (a pure function):
    mean |mask count difference| per image (and relative to the reference's total), the fraction
    of reference masks with a mask at IoU >= 0.9, the mean over reference masks of their best
    IoU, and the fraction matched at IoU >= 0.99."""
    from pycocotools import mask as mask_utils

    best: list[np.ndarray] = []
    diffs, n_ref, n_got = [], 0, 0
    for r, f in zip(ref_rows, rows, strict=True):
        rr, ff = _rles(r), _rles(f)
        n_ref, n_got = n_ref + len(rr), n_got + len(ff)
        diffs.append(abs(len(ff) - len(rr)))
        if rr and ff:
            iou = np.asarray(mask_utils.iou(ff, rr, [0] * len(rr))).reshape(len(ff), len(rr))
            best.append(iou.max(0))
        elif rr:
            best.append(np.zeros(len(rr)))
    b = np.concatenate(best) if best else np.ones(0)
    return {
        "ref_masks": n_ref,
        "masks": n_got,
        "count_diff_per_image": float(np.mean(diffs)) if diffs else 0.0,
        "count_diff_rel": abs(n_got - n_ref) / n_ref if n_ref else 0.0,
        "matched_0.9": float((b >= 0.9).mean()) if b.size else 1.0,
        "matched_0.99": float((b >= 0.99).mean()) if b.size else 1.0,
        "mean_best_iou": float(b.mean()) if b.size else 1.0,
    }


def _run(stage, shard: Path, sync, mode: str) -> tuple[list[dict], float]:
    """One image shard through the stage's shard runner (decode/compute/encode overlapped)."""
    import pyarrow.parquet as pq

    out = shard.parent / f"labels-{mode}.parquet"
    sync()
    t0 = time.perf_counter()
    stage.run_shard(shard, out)
    sync()
    secs = time.perf_counter() - t0
    return pq.read_table(out).to_pylist(), secs


def _write_shard(folder: Path, data: list[bytes], size: tuple[int, int]) -> Path:
    import hashlib

    import pyarrow as pa

    from pipeline.shards import IMAGE_SCHEMA, write_parquet_atomic

    rows = [
        {
            "image_id": hashlib.sha256(b).hexdigest(),
            "image": {"bytes": b, "path": f"{i}.jpg"},
            "width": size[0],
            "height": size[1],
            "source": "bench",
        }
        for i, b in enumerate(data)
    ]
    path = folder / "shard-00000.parquet"
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), path)
    return path


def _instrument(stage) -> dict[str, float]:
    """Accumulate the worker-thread time of decoding and of RLE+render (benchmarks only)."""
    import threading

    totals: dict[str, float] = {"decode (threads)": 0.0, "rle+render+png (threads)": 0.0}
    lock = threading.Lock()

    def wrap(fn, key):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                with lock:
                    totals[key] += time.perf_counter() - t0

        return timed

    stage._load = wrap(stage._load, "decode (threads)")
    stage._finish = wrap(stage._finish, "rle+render+png (threads)")
    stage._generator.timings = {}
    return totals


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--models", default="vit_b,vit_h", help="comma list of vit_b, vit_l, vit_h")
    p.add_argument("--tiny", action="store_true", help="the tiny-random SAM instead of --models")
    p.add_argument("--n-images", type=int, default=16, help="images per implementation")
    p.add_argument(
        "--ref-images",
        type=int,
        default=None,
        help="images for the (slow) reference; default: --n-images",
    )
    p.add_argument("--size", default="640x480", help="image size WxH (COCO-like)")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument(
        "--points-per-batch",
        type=int,
        default=None,
        help="fast path decoder batch (default: the stage's, 1024 for fast on CUDA, else 64)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder batch")
    p.add_argument(
        "--loose",
        action="store_true",
        help="predicted-IoU and stability filters off (thresholds 0), so every candidate "
        "mask reaches NMS and RLE as real weights' masks would",
    )
    p.add_argument("--pred-iou-thresh", type=float, default=None, help="override")
    p.add_argument("--stability-score-thresh", type=float, default=None, help="override")
    p.add_argument("--warmup", type=int, default=1, help="1: run one batch before timing, 0: none")
    p.add_argument(
        "--modes",
        default="exact,fast",
        help="comma list of the stage's precision modes to time beside the reference",
    )
    p.add_argument(
        "--weights",
        default="keep-some",
        choices=["keep-some", "random"],
        help="keep-some: random weights changed as tiny-random is (sam_model.keep_some_masks: "
        "mask head x2000, IoU head bias +0.9) so masks survive the default thresholds; "
        "random: plain random init (keeps no mask at default thresholds)",
    )
    p.add_argument("--compile", action="store_true", help="fast mode: torch.compile the decoder")
    p.add_argument(
        "--profile",
        action="store_true",
        help="fast path: seconds per image in each phase (adds device syncs)",
    )
    args = p.parse_args(argv)

    import torch

    from pipeline.stages.segment.model import (
        build_sam,
        keep_some_masks,
        load_sam,
        tiny_sam_checkpoint,
    )
    from pipeline.stages.segment.stage import SegmentStage

    w, h = (int(x) for x in args.size.split("x"))
    if args.tiny:
        w, h = min(w, 96), min(h, 72)
    data = _images(args.n_images, (w, h))
    n_ref = min(args.ref_images or args.n_images, args.n_images)
    tmp = Path(tempfile.mkdtemp(prefix="segment-bench-"))
    shards = {
        "fast": _write_shard(tmp / "fast", data, (w, h)),
        "reference": _write_shard(tmp / "reference", data[:n_ref], (w, h)),
    }
    warm = _write_shard(tmp / "warmup", data[: args.batch_size], (w, h))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    thresholds = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0) if args.loose else {}
    if args.pred_iou_thresh is not None:
        thresholds["pred_iou_thresh"] = args.pred_iou_thresh
    if args.stability_score_thresh is not None:
        thresholds["stability_score_thresh"] = args.stability_score_thresh
    models = (
        ["tiny-random"] if args.tiny else [m.strip() for m in args.models.split(",") if m.strip()]
    )
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"device: {args.device} ({dev_name}), torch {torch.__version__}, images {w}x{h}, "
        f"{args.points_per_side}^2 points, thresholds {thresholds or 'default'}"
    )
    print(f"random weights ({args.weights}): mask content is meaningless; the cost is the real one")

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for model_type in models:
        torch.manual_seed(0)
        if model_type == "tiny-random":
            model = load_sam("tiny-random", tiny_sam_checkpoint())
        else:
            model = build_sam(model_type)
            if args.weights == "keep-some":
                keep_some_masks(model)
        results = {}
        for mode in ["reference", *modes]:
            impl = "reference" if mode == "reference" else "fast"
            stage = SegmentStage(
                model_type="tiny-random" if args.tiny else model_type,
                checkpoint=None if args.tiny else "<random weights>",
                impl=impl,
                precision="exact" if impl == "reference" else mode,
                compile=args.compile,
                points_per_side=args.points_per_side,
                points_per_batch=64 if impl == "reference" else args.points_per_batch,
                batch_size=args.batch_size if impl == "fast" else 1,
                device=args.device,
                **thresholds,
            )
            stage.setup(model=model)
            if args.warmup:
                stage.run_shard(warm, tmp / "warmup-labels.parquet")
            phases = _instrument(stage) if impl == "fast" and args.profile else None
            out, secs = _run(stage, shards[impl], sync, mode)
            n = len(out)
            errors = [r["error"] for r in out if r["error"]]
            if errors:
                print(f"  {mode}: {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
            results[mode] = (out, n / secs)
            n_masks = sum(r["n_masks"] or 0 for r in out)
            print(
                f"{model_type:>11} {mode:>9}: {n / secs:8.2f} img/s ({secs / n * 1000:8.1f} "
                f"ms/img, {n} images, {n_masks} masks, points_per_batch "
                f"{stage.points_per_batch})"
            )
            if phases is not None:
                phases.update(stage._generator.timings)
                print(
                    "            phases, ms/img (threads overlap the device): "
                    + ", ".join(f"{k} {v / n * 1000:.1f}" for k, v in phases.items())
                )
        ref_out, ref_ips = results["reference"]
        for mode in modes:
            out, ips = results[mode]
            a = agreement(ref_out, out[: len(ref_out)])
            print(
                f"{model_type:>11} {mode:>9} vs reference: speed-up {ips / ref_ips:.2f}x; "
                f"masks {a['masks']} vs {a['ref_masks']} (|diff| {a['count_diff_per_image']:.2f}"
                f"/image, {a['count_diff_rel']:.1%}); matched at IoU>=0.9 {a['matched_0.9']:.1%}, "
                f"at >=0.99 {a['matched_0.99']:.1%}; mean best IoU {a['mean_best_iou']:.4f}"
            )
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    shutil.rmtree(tmp, ignore_errors=True)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()

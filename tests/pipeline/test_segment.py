"""Segment stage: fast path vs segment-anything's reference generator, RLE, renders, downscale,
fingerprint, out-of-memory back-off, bad-image quarantine. Tiny SAM, tiny images, CPU."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.shards import IMAGE_SCHEMA, read_quarantine, write_parquet_atomic
from pipeline.stage import run_shard
from pipeline.stages.segment.fast import FastMaskGenerator, masks_to_coco_rle
from pipeline.stages.segment.model import tiny_sam_checkpoint
from pipeline.stages.segment.render import draw_order, mask_colors, render_colors, render_edges
from pipeline.stages.segment.stage import SegmentStage
from tests.conftest import encode, synthetic_image

# The tiny random SAM's masks hardly depend on the prompt point (near-duplicates with the same
# box), so under box NMS about one survives per image. Two settings cover the pipeline, both with
# segment-anything's default IoU and stability thresholds (the tiny weights are made so that
# they filter some masks and keep others): NMS on, over a few images; and NMS off (IoU
# threshold 1.0), where dozens of masks per image reach RLE and matching, in order.
SETTINGS = {
    "nms": dict(points_per_side=8),
    "many": dict(points_per_side=8, box_nms_thresh=1.0),
}


def scene(seed: int, w: int = 64, h: int = 64) -> np.ndarray:
    """A flat background with a few flat discs (seeded)."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(4, 16)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = rng.integers(0, 256, 3)
    return img


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ref_rles(anns: list[dict]) -> list[dict]:
    return [mask_utils.encode(np.asfortranarray(a["segmentation"].astype(np.uint8))) for a in anns]


@pytest.mark.parametrize("setting", ["nms", "many"])
def test_fast_path_matches_reference_generator(tiny_sam, setting):
    from segment_anything import SamAutomaticMaskGenerator

    kw = SETTINGS[setting]
    images = [np.asarray(synthetic_image(s, (80, 56))) for s in range(2)]
    if setting == "nms":
        images += [scene(s) for s in range(4)]
    ref = SamAutomaticMaskGenerator(tiny_sam, output_mode="binary_mask", **kw)
    fast = FastMaskGenerator(tiny_sam, encoder_batch_size=4, **kw)
    n_ref = n_fast = 0
    for im, got in zip(images, fast.generate(images), strict=True):
        anns = ref.generate(im)
        n_ref, n_fast = n_ref + len(anns), n_fast + len(got)
        assert abs(len(got) - len(anns)) <= 0.01 * len(anns)
        if not anns:
            continue
        fast_rles, ref_rles = masks_to_coco_rle(got.masks), _ref_rles(anns)
        iou = mask_utils.iou(fast_rles, ref_rles, [0] * len(ref_rles))  # [fast, ref]
        iou = np.asarray(iou).reshape(len(fast_rles), len(ref_rles))
        best = iou.max(0)
        assert (best >= 0.99).all(), f"reference masks without a match: {np.sum(best < 0.99)}"
        if len(got) == len(anns):  # one to one, in the reference's order
            assert (np.diag(iou) >= 0.99).all()
        # Same order and scores as the reference (both sort by NMS score).
        np.testing.assert_allclose(
            got.iou_preds.numpy(), [a["predicted_iou"] for a in anns], atol=1e-5
        )
        np.testing.assert_allclose(
            got.stability_score.numpy(), [a["stability_score"] for a in anns], atol=1e-5
        )
        xywh = got.boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        assert xywh.tolist() == [a["bbox"] for a in anns]
    if setting == "many":
        assert n_ref >= 20, f"only {n_ref} reference masks: the test lost its teeth"
    assert abs(n_fast - n_ref) <= 0.01 * n_ref


def test_fast_path_with_crops_and_small_regions_matches_reference(tiny_sam):
    from segment_anything import SamAutomaticMaskGenerator

    kw = dict(points_per_side=4, crop_n_layers=1, min_mask_region_area=20)
    images = [np.asarray(synthetic_image(3, (72, 56)))]
    anns = SamAutomaticMaskGenerator(tiny_sam, output_mode="binary_mask", **kw).generate(images[0])
    [got] = FastMaskGenerator(tiny_sam, **kw).generate(images)
    assert len(got) == len(anns) >= 1
    [plain] = FastMaskGenerator(tiny_sam, **{**kw, "min_mask_region_area": 0}).generate(images)
    assert int(got.masks.sum()) != int(plain.masks.sum())  # the clean-up did change something
    for m, a in zip(got.masks.numpy(), anns, strict=True):
        assert (m == a["segmentation"]).all()


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 13, 17)) > 0.5
    masks[0] = False
    masks[1] = True
    masks[2, 0, 0], masks[3, 0, 0] = True, False  # runs starting with 1 and with 0
    rles = masks_to_coco_rle(torch.as_tensor(masks), chunk=4)
    for m, rle in zip(masks, rles, strict=True):
        assert rle["size"] == [13, 17]
        assert isinstance(rle["counts"], str)
        assert (mask_utils.decode({**rle, "counts": rle["counts"].encode()}) == m).all()
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle["counts"] == ref["counts"].decode()
    assert masks_to_coco_rle(torch.zeros((0, 4, 5), dtype=torch.bool)) == []


def _disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


def test_render_edges_is_union_of_per_mask_canny():
    import cv2

    h, w = 40, 50
    masks = np.stack(
        [
            _disc(h, w, 12, 12, 8),
            _disc(h, w, 30, 20, 12),
            _disc(h, w, 0, 39, 10),  # touches two image borders
            np.zeros((h, w), bool),  # empty
            np.ones((h, w), bool),  # the whole image
        ]
    )
    want = np.zeros((h, w), np.uint8)
    for m in masks:  # independent: Canny on the whole image for every mask
        want |= cv2.Canny(m.astype(np.uint8) * 255, 100, 200)
    # In place (CPU masks) and bit-packed (the GPU path), in chunks smaller than the mask count.
    for kw in (dict(), dict(pack=True, chunk=2)):
        got = render_edges(torch.as_tensor(masks), **kw)
        assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 255}
        assert (got == want).all(), kw

    # By hand: a filled square's edges sit on its boundary, never deep inside or far outside.
    sq = np.zeros((1, 20, 20), bool)
    sq[0, 5:15, 5:15] = True
    e = render_edges(torch.as_tensor(sq)) > 0
    assert e.any()
    assert not e[7:13, 7:13].any() and not e[:3].any() and not e[:, 17:].any()
    ring = np.zeros((20, 20), bool)
    ring[4:16, 4:16] = True
    ring[6:14, 6:14] = False
    assert e[ring].sum() == e.sum()


def test_render_colors_paints_largest_first():
    h, w = 30, 40
    big = np.zeros((h, w), bool)
    big[2:28, 2:38] = True
    small = _disc(h, w, 10, 10, 5)
    mid = np.zeros((h, w), bool)
    mid[15:25, 20:35] = True
    masks = np.stack([small, big, mid])
    got = render_colors(torch.as_tensor(masks), chunk=2)

    want = np.zeros((h, w, 3), np.uint8)
    palette = mask_colors(3)
    order = sorted(range(3), key=lambda i: -masks[i].sum())  # big, mid, small
    for rank, i in enumerate(order, start=1):
        want[masks[i]] = palette[rank]
    assert (got == want).all()
    assert draw_order(torch.as_tensor(masks)).tolist() == order
    assert (got[10, 10] == palette[3]).all()  # the small disc stays visible
    assert (got[0, 0] == 0).all()  # unlabelled is black
    assert len({tuple(c) for c in palette[1:]}) == 3  # distinct, deterministic colours
    assert (mask_colors(3) == palette).all()


def _shard(layout, n, images, bad=None):
    rows = []
    for i, img in enumerate(images):
        data = encode(img, "PNG")
        rows.append(
            {
                "image_id": hashlib.sha256(data).hexdigest(),
                "image": {"bytes": data, "path": f"{i}.png"},
                "width": img.width,
                "height": img.height,
                "source": "test",
            }
        )
    if bad is not None:
        rows.insert(
            bad,
            {
                "image_id": "bad" * 8,
                "image": {"bytes": b"\x89PNG broken", "path": "bad.png"},
                "width": 10,
                "height": 10,
                "source": "test",
            },
        )
    path = layout.image_shard(n)
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), path)
    return path


def _stage(**kw):
    base = dict(model_type="tiny-random", points_per_side=8, device="cpu", batch_size=2)
    return SegmentStage(**{**base, **kw})


def test_downscale_path_keeps_original_size(tiny_sam):
    img = synthetic_image(5, (96, 64))
    stage = _stage(max_size=48, render="colors", box_nms_thresh=1.0)
    stage.setup(model=tiny_sam)
    batch = pa.RecordBatch.from_pylist(
        [{"image_id": "a", "image": {"bytes": encode(img, "PNG"), "path": "a.png"}}]
    )
    [row] = stage.process(batch)
    assert row["error"] is None and (row["width"], row["height"]) == (96, 64)
    assert row["n_masks"] == len(row["masks"]) > 0
    target = Image.open(io.BytesIO(row["target"]))
    assert target.size == (96, 64) and target.mode == "RGB"

    # The same masks as SAM on the 48x32 image, resized back by nearest neighbour.
    small = np.asarray(img.resize((48, 32), Image.Resampling.BILINEAR))
    gen = FastMaskGenerator(tiny_sam, points_per_side=8, box_nms_thresh=1.0)
    [ms] = gen.generate([small])
    up = torch.nn.functional.interpolate(
        ms.masks[:, None].to(torch.uint8), size=(64, 96), mode="nearest-exact"
    )[:, 0].numpy()
    assert len(row["masks"]) == len(ms)
    for m, want in zip(row["masks"], up, strict=True):
        assert m["size"] == [64, 96]
        dec = mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()})
        assert (dec == want).all() and m["area"] == int(want.sum())
        x, y, bw, bh = m["bbox"]
        ys, xs = np.nonzero(want)
        assert (x, y, x + bw, y + bh) == (xs.min(), ys.min(), xs.max(), ys.max())
    palette_pixels = np.asarray(target).reshape(-1, 3)
    assert (palette_pixels.max(1) > 0).any()


def test_fingerprint_changes_only_with_output(tmp_path):
    base = _stage(precision="exact")
    fp = base.fingerprint()
    same = [
        dict(points_per_batch=7),
        dict(batch_size=3),
        dict(device="cuda:1"),
        dict(device="auto"),
    ]
    for kw in same:
        assert _stage(precision="exact", **kw).fingerprint() == fp, kw
    changes = [
        dict(impl="reference"),
        dict(points_per_side=9),
        dict(pred_iou_thresh=0.5),
        dict(stability_score_thresh=0.9),
        dict(stability_score_offset=0.5),
        dict(box_nms_thresh=0.6),
        dict(crop_n_layers=1),
        dict(crop_nms_thresh=0.5),
        dict(crop_overlap_ratio=0.2),
        dict(crop_n_points_downscale_factor=2),
        dict(min_mask_region_area=5),
        dict(render="colors"),
        dict(max_size=512),
        dict(precision="fast"),
    ]
    seen = {fp}
    for kw in changes:
        other = _stage(**{"precision": "exact", **kw}).fingerprint()
        assert other not in seen, kw
        seen.add(other)
    assert _stage(precision="exact").fingerprint() == fp  # stable
    ref = _stage(impl="reference", precision="exact").fingerprint()
    assert _stage(impl="reference", precision="fast").fingerprint() == ref  # runs fp32 anyway
    assert (
        _stage(compile=True).fingerprint() == _stage(compile=True, precision="exact").fingerprint()
    )  # exact on CPU

    # A real model type names its checkpoint by content, not by path.
    ckpt = tmp_path / "a.pth"
    shutil.copy(tiny_sam_checkpoint(), ckpt)
    vit = SegmentStage(model_type="vit_b", checkpoint=str(ckpt), precision="exact")
    moved = tmp_path / "elsewhere" / "a.pth"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    assert (
        SegmentStage(model_type="vit_b", checkpoint=str(moved), precision="exact").fingerprint()
        == vit.fingerprint()
    )
    assert vit.fingerprint() not in seen
    moved.write_bytes(moved.read_bytes() + b"\0")
    assert (
        SegmentStage(model_type="vit_b", checkpoint=str(moved), precision="exact").fingerprint()
        != vit.fingerprint()
    )
    with pytest.raises(ValueError, match="stages.segment.checkpoint"):
        SegmentStage(model_type="vit_h")
    with pytest.raises(FileNotFoundError, match="stages.segment.checkpoint"):
        SegmentStage(model_type="vit_h", checkpoint=str(tmp_path / "missing.pth")).fingerprint()


def test_from_config_resolves_checkpoint_against_manifest(tmp_path):
    from pipeline.manifest import parse_manifest

    m = parse_manifest(
        {
            "output_dir": "out",
            "sources": [{"name": "s", "path": "imgs"}],
            "stages": {
                "segment": {
                    "model_type": "vit_b",
                    "checkpoint": "w/sam.pth",
                    "points_per_side": 16,
                    "render": "colors",
                }
            },
        },
        base_dir=tmp_path,
    )
    stage = SegmentStage.from_config(m.stages.segment, m.base_dir)
    assert stage.checkpoint == str(tmp_path / "w" / "sam.pth")
    assert (stage.points_per_side, stage.render, stage.impl) == (16, "colors", "fast")


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_out_of_memory_halves_points_per_batch(tiny_sam, impl, monkeypatch, caplog):
    from segment_anything import SamAutomaticMaskGenerator

    images = [synthetic_image(1, (64, 48))]
    batch = pa.RecordBatch.from_pylist(
        [{"image_id": "x", "image": {"bytes": encode(images[0], "PNG"), "path": "x.png"}}]
    )
    clean = _stage(impl=impl, box_nms_thresh=1.0, points_per_batch=64)
    clean.setup(model=tiny_sam)
    want = clean.process(batch)

    if impl == "fast":
        target, attr = FastMaskGenerator, "_process_points"
    else:
        target, attr = SamAutomaticMaskGenerator, "_process_batch"
    real = getattr(target, attr)

    def flaky(self, features_or_points, *args, **kwargs):
        n = len(args[1]) if impl == "fast" else len(features_or_points)
        if n > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, features_or_points, *args, **kwargs)

    monkeypatch.setattr(target, attr, flaky)
    stage = _stage(impl=impl, box_nms_thresh=1.0, points_per_batch=64)
    stage.setup(model=tiny_sam)
    with caplog.at_level(logging.WARNING, logger="unimrg.segment"):
        got = stage.process(batch)
    assert stage.points_per_batch == 16
    assert len(stage.backoffs) == 2 and "points_per_batch=64" in stage.backoffs[0]
    assert "retrying" in caplog.text
    assert got[0]["error"] is None
    assert [m["counts"] for m in got[0]["masks"]] == [m["counts"] for m in want[0]["masks"]]


def test_bad_image_is_quarantined_and_shard_carries_on(tiny_sam, layout):
    images = [synthetic_image(i, (48, 40)) for i in range(3)]
    shard = _shard(layout, 0, images, bad=1)
    stage = _stage()
    stage.setup(model=tiny_sam)
    res = run_shard(stage, layout, shard)
    assert (res.rows, res.errors, res.computed) == (4, 1, True)
    table = pq.read_table(res.path)
    assert table.schema.equals(stage.schema(), check_metadata=False)
    ids = pq.read_table(shard).column("image_id").to_pylist()
    assert table.column("image_id").to_pylist() == ids  # row-aligned
    errors = table.column("error").to_pylist()
    assert errors[1] and "bad.png" in errors[1] and errors[0] is None and errors[2] is None
    assert table.column("target").to_pylist()[1] is None
    for i in (0, 2, 3):
        t = Image.open(io.BytesIO(table.column("target")[i].as_py()["bytes"]))
        assert t.size == (48, 40) and t.mode == "L"
    q = read_quarantine(layout)
    assert q.num_rows == 1 and q.column("image_id").to_pylist() == ["bad" * 8]
    assert stage.uses_random_weights()


def test_reference_and_fast_stage_rows_agree(tiny_sam):
    img = synthetic_image(7, (64, 48))
    batch = pa.RecordBatch.from_pylist(
        [{"image_id": "x", "image": {"bytes": encode(img, "PNG"), "path": "x.png"}}]
    )
    rows = {}
    for impl in ("fast", "reference"):
        stage = _stage(impl=impl, box_nms_thresh=1.0)
        stage.setup(model=tiny_sam)
        [rows[impl]] = stage.process(batch)
    assert rows["fast"]["n_masks"] == rows["reference"]["n_masks"] > 0
    assert [m["counts"] for m in rows["fast"]["masks"]] == [
        m["counts"] for m in rows["reference"]["masks"]
    ]
    assert rows["fast"]["target"] == rows["reference"]["target"]


def test_benchmark_runs_tiny(capsys):
    from benchmarks.segment_throughput import main

    main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--n-images",
            "2",
            "--points-per-side",
            "4",
            "--loose",
            "--warmup",
            "0",
            "--profile",
        ]
    )
    out = capsys.readouterr().out
    assert "speed-up" in out and "matched at IoU>=0.9" in out and "encoder" in out
    assert "fast vs reference" in out and "exact vs reference" in out and "mean best IoU" in out


def test_stage_pickles_without_its_model(tiny_sam):
    import pickle

    stage = _stage()
    stage.setup(model=tiny_sam)
    copy = pickle.loads(pickle.dumps(stage))
    assert copy._model is None and copy._pool is None
    assert copy.fingerprint() == stage.fingerprint()


def test_out_of_memory_in_encoder_halves_its_batch(tiny_sam, monkeypatch):
    images = [np.asarray(synthetic_image(i, (48, 40))) for i in range(2)]
    want = FastMaskGenerator(tiny_sam, points_per_side=4).generate(images)
    real = FastMaskGenerator._encode_batch

    def flaky(self, chunk):
        if len(chunk) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(self, chunk)

    monkeypatch.setattr(FastMaskGenerator, "_encode_batch", flaky)
    gen = FastMaskGenerator(tiny_sam, points_per_side=4, encoder_batch_size=2)
    got = gen.generate(images)
    assert gen.encoder_batch_size == 1 and len(gen.backoffs) == 1
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.masks, b.masks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_matches_reference_on_cuda(tiny_sam):
    import copy

    from segment_anything import SamAutomaticMaskGenerator

    model = copy.deepcopy(tiny_sam).to("cuda")
    kw = SETTINGS["many"]
    images = [np.asarray(synthetic_image(s, (80, 56))) for s in range(2)]
    ref = SamAutomaticMaskGenerator(model, output_mode="binary_mask", **kw)
    got = FastMaskGenerator(model, **kw).generate(images)
    for im, ms in zip(images, got, strict=True):
        anns = ref.generate(im)
        assert abs(len(ms) - len(anns)) <= 0.01 * len(anns)
        iou = np.asarray(
            mask_utils.iou(masks_to_coco_rle(ms.masks), _ref_rles(anns), [0] * len(anns))
        )
        assert (iou.reshape(len(ms), len(anns)).max(0) >= 0.99).all()


def test_build_stage_and_run_stage_from_manifest(image_shards, tmp_path):
    from pipeline.manifest import parse_manifest
    from pipeline.stage import build_stage, run_stage

    m = parse_manifest(
        {
            "output_dir": str(image_shards.root),
            "sources": [{"name": "s", "path": "x"}],
            "stages": {
                "segment": {"model_type": "tiny-random", "points_per_side": 4, "device": "cpu"}
            },
        },
        base_dir=tmp_path,
    )
    stage = build_stage("segment", m)
    first = run_stage(stage, image_shards)
    assert [r.computed for r in first] == [True, True] and sum(r.rows for r in first) == 5
    assert all(r.errors == 0 for r in first)
    again = run_stage(build_stage("segment", m), image_shards)
    assert [r.computed for r in again] == [False, False]  # the files are the cache
    labels = image_shards.label_shards("segment", stage.fingerprint())
    assert len(labels) == 2
    for label, image in zip(labels, image_shards.image_shards(), strict=True):
        t = pq.read_table(label)
        assert (
            t.column("image_id").to_pylist() == pq.read_table(image).column("image_id").to_pylist()
        )
        assert all(b is not None for b in t.column("target").to_pylist())


def test_reduced_precision_paths_run_and_restore_settings(tiny_sam):
    images = [np.asarray(synthetic_image(2, (64, 48)))]
    kw = SETTINGS["many"]
    [exact] = FastMaskGenerator(tiny_sam, **kw).generate(images)
    before = torch.backends.cuda.matmul.fp32_precision
    [tf32] = FastMaskGenerator(tiny_sam, decoder_precision="tf32", **kw).generate(images)
    assert torch.backends.cuda.matmul.fp32_precision == before
    assert torch.equal(tf32.masks, exact.masks)  # TF32 only exists on CUDA
    [bf16] = FastMaskGenerator(
        tiny_sam, encoder_dtype=torch.bfloat16, decoder_precision="bfloat16", **kw
    ).generate(images)
    assert bf16.masks.shape[1:] == (48, 64) and bf16.masks.dtype == torch.bool
    with pytest.raises(ValueError, match="decoder_precision"):
        FastMaskGenerator(tiny_sam, decoder_precision="fp8")


def test_timings_synchronise_the_models_device(tiny_sam, monkeypatch):
    """`torch.cuda.synchronize()` without a device waits only for the current one (cuda:0)."""
    gen = FastMaskGenerator(tiny_sam)
    gen.timings = {}
    calls: list = []
    monkeypatch.setattr(FastMaskGenerator, "device", property(lambda self: torch.device("cuda", 1)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    with gen._timed("encoder"):
        pass
    assert calls == [torch.device("cuda", 1)] * 2 and "encoder" in gen.timings

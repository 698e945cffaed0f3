"""Segment stage robustness: out-of-memory back-off in NMS, crop merging, small-region clean-up
and finishing; OOM recognised by type; huge originals resized back in chunks; JPEG draft decode
above max_size in fast mode; RGBA composited on black. Tiny SAM, tiny images, CPU."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.images import decode_rgb
from pipeline.stages.segment import fast as sam_fast
from pipeline.stages.segment import stage as segment_mod
from pipeline.stages.segment.fast import FastMaskGenerator, is_oom
from pipeline.stages.segment.stage import SegmentStage
from tests.conftest import encode, synthetic_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(img: Image.Image, fmt: str = "PNG") -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [{"image_id": "x", "image": {"bytes": encode(img, fmt), "path": f"x.{fmt.lower()}"}}]
    )


class _OOM(RuntimeError):
    pass


def test_oom_is_recognised_by_type_and_by_message():
    assert is_oom(torch.OutOfMemoryError("anything"))
    assert is_oom(torch.cuda.OutOfMemoryError("anything"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_nms_merging_and_small_regions_fall_back_to_cpu_on_oom(tiny_sam, monkeypatch):
    kw = dict(points_per_side=4, crop_n_layers=1, min_mask_region_area=20)
    images = [np.asarray(synthetic_image(3, (72, 56)))]
    [want] = FastMaskGenerator(tiny_sam, **kw).generate(images)

    # Pretend the device is a GPU whose NMS runs out of memory on every first try.
    monkeypatch.setattr(sam_fast, "_can_fall_back", lambda device: True)
    real_nms, calls = sam_fast._nms, {"n": 0}

    def flaky_nms(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real_nms(*args, **kwargs)

    monkeypatch.setattr(sam_fast, "_nms", flaky_nms)
    gen = FastMaskGenerator(tiny_sam, **kw)
    [got] = gen.generate(images)
    where = " ".join(gen.backoffs)
    assert "box NMS" in where and "crop merging" in where and "small-region clean-up" in where
    assert len(got) == len(want) >= 1
    assert torch.equal(got.masks, want.masks) and torch.equal(got.boxes, want.boxes)


def test_other_errors_in_nms_are_not_swallowed(tiny_sam, monkeypatch):
    monkeypatch.setattr(sam_fast, "_can_fall_back", lambda device: True)
    monkeypatch.setattr(sam_fast, "_nms", lambda *a, **k: (_ for _ in ()).throw(_OOM("boom")))
    with pytest.raises(_OOM, match="boom"):
        FastMaskGenerator(tiny_sam, points_per_side=4).generate(
            [np.asarray(synthetic_image(3, (40, 32)))]
        )


def test_finishing_falls_back_to_cpu_on_oom(tiny_sam, monkeypatch):
    batch = _batch(synthetic_image(7, (64, 48)))
    stage = SegmentStage(
        model_type="tiny-random", device="cpu", points_per_side=8, box_nms_thresh=1.0
    )
    stage.setup(model=tiny_sam)
    [want] = stage.process(batch)
    monkeypatch.setattr(sam_fast, "_can_fall_back", lambda device: True)
    real, calls = SegmentStage._finish_row, {"n": 0}

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(self, *args)

    monkeypatch.setattr(SegmentStage, "_finish_row", flaky)
    [got] = stage.process(batch)
    assert calls["n"] == 2 and any("finishing" in b for b in stage.backoffs)
    assert got == want and got["n_masks"] > 0


def test_huge_original_masks_resize_back_in_chunks(tiny_sam, monkeypatch):
    batch = _batch(synthetic_image(5, (96, 64)))
    stage = SegmentStage(
        model_type="tiny-random", device="cpu", points_per_side=8, box_nms_thresh=1.0, max_size=48
    )
    stage.setup(model=tiny_sam)
    [whole] = stage.process(batch)
    resized = []
    real = segment_mod.resize_masks
    monkeypatch.setattr(
        segment_mod, "resize_masks", lambda m, size: resized.append(len(m)) or real(m, size)
    )
    monkeypatch.setattr(segment_mod, "RESIZE_PIXELS", 2 * 96 * 64)  # two masks at a time
    [chunked] = stage.process(batch)
    assert whole["n_masks"] > 2 and max(resized) == 2
    assert chunked == whole
    assert {tuple(m["size"]) for m in chunked["masks"]} == {(64, 96)}


def test_fast_mode_drafts_big_jpegs_and_keeps_the_original_size(tiny_sam):
    img = synthetic_image(4, (200, 120))
    data = encode(img, "JPEG")
    assert decode_rgb(data, long_side=64).size[0] < 200  # draft did reduce the decode
    batch = _batch(img, "JPEG")
    stage = SegmentStage(
        model_type="tiny-random", device="cpu", precision="fast", points_per_side=4, max_size=64
    )
    stage.setup(model=tiny_sam)
    arr, orig = stage._load({"bytes": data})
    assert arr.shape[:2] == (38, 64) and orig == (120, 200)  # the size exact mode gives
    [row] = stage.process(batch)
    assert row["error"] is None and (row["width"], row["height"]) == (200, 120)
    assert all(tuple(m["size"]) == (120, 200) for m in row["masks"])


def test_rgba_is_composited_on_black():
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 255
    rgba[:, :4, 3] = 0  # left half fully transparent
    rgba[0, 7, 3] = 128  # half transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = np.asarray(decode_rgb(buf.getvalue()))
    assert out.shape == (6, 8, 3)
    assert (out[:, :4] == 0).all()
    assert (out[1:, 4:] == (200, 100, 50)).all()
    assert np.abs(out[0, 7].astype(int) - (100, 50, 25)).max() <= 1
    # A palette image with a transparent index: that colour decodes to black too.
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.info["transparency"] = 1
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=1)
    out = np.asarray(decode_rgb(buf.getvalue()))
    assert (out == 0).all()

"""Precision modes of the segment stage: `exact` gives segment-anything's reference masks bit for
bit (tiny SAM in CI; a real-size ViT-B with random weights and open thresholds, slow); `fast`
(bf16 encoder, batched bf16 decoder) stays close. Random weights: the masks are noise, only the
agreement matters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.stages.segment.fast import FastMaskGenerator
from pipeline.stages.segment.model import build_sam
from pipeline.stages.segment.stage import SegmentStage
from tests.conftest import encode, synthetic_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference(sam, image: np.ndarray, **kw) -> list[dict]:
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **kw).generate(image)


def _assert_identical(ms, anns) -> None:
    assert len(ms) == len(anns)
    for k, a in enumerate(anns):
        assert np.array_equal(ms.masks[k].numpy(), a["segmentation"]), k
        # Scores to float rounding: images go through the encoder in batches, the reference
        # one at a time (a different matmul shape, the last bit can differ).
        assert ms.iou_preds[k].item() == pytest.approx(a["predicted_iou"], rel=1e-6, abs=1e-6)
        assert ms.stability_score[k].item() == pytest.approx(a["stability_score"], abs=1e-6)


def _stage_generator(sam, precision: str, **kw) -> FastMaskGenerator:
    stage = SegmentStage(
        model_type="tiny-random", device="cpu", precision=precision, batch_size=2, **kw
    )
    stage.setup(model=sam)
    return stage._generator


@pytest.mark.parametrize("decoder", ["package", "batched"])
def test_exact_mode_is_the_reference_on_tiny(tiny_sam, decoder):
    """The stage's exact mode (package decoder) and, on CPU in float32, the batched decoder too."""
    kw = dict(points_per_side=8, box_nms_thresh=1.0)
    images = [np.asarray(synthetic_image(s, (80, 56))) for s in range(2)]
    if decoder == "package":
        gen = _stage_generator(tiny_sam, "exact", **kw)
        assert gen._batched is None and gen.encoder_dtype == torch.float32
    else:
        gen = FastMaskGenerator(tiny_sam, decoder="batched", **kw)
    n = 0
    for im, ms in zip(images, gen.generate(images), strict=True):
        anns = _reference(tiny_sam, im, **kw)
        _assert_identical(ms, anns)
        n += len(anns)
    assert n >= 20, f"only {n} masks: the test lost its teeth"


def test_fast_mode_agrees_with_the_reference_on_tiny(tiny_sam):
    from pycocotools import mask as mask_utils

    from pipeline.stages.segment.fast import masks_to_coco_rle

    kw = dict(points_per_side=8, box_nms_thresh=1.0)
    gen = _stage_generator(tiny_sam, "fast", **kw)
    assert gen._batched is not None and gen.encoder_dtype == torch.bfloat16
    images = [np.asarray(synthetic_image(s, (80, 56))) for s in range(2)]
    for im, ms in zip(images, gen.generate(images), strict=True):
        anns = _reference(tiny_sam, im, **kw)
        assert abs(len(ms) - len(anns)) <= max(2, 0.1 * len(anns))
        ref = [
            mask_utils.encode(np.asfortranarray(a["segmentation"].astype(np.uint8))) for a in anns
        ]
        iou = np.asarray(mask_utils.iou(masks_to_coco_rle(ms.masks), ref, [0] * len(ref)))
        best = iou.reshape(len(ms), len(ref)).max(0)
        assert best.mean() >= 0.9, best.mean()


def test_precision_resolves_per_device_and_sets_prompt_batch():
    s = SegmentStage(model_type="tiny-random", device="cpu")
    assert s.resolved_precision() == "exact" and s.resolved_points_per_batch() == 64
    s = SegmentStage(model_type="tiny-random", device="cuda")
    assert s.resolved_precision() == "fast" and s.resolved_points_per_batch() == 1024
    s = SegmentStage(model_type="tiny-random", device="cuda", precision="exact")
    assert s.resolved_points_per_batch() == 64
    assert (
        SegmentStage(model_type="tiny-random", impl="reference", device="cuda").resolved_precision()
        == "exact"
    )
    with pytest.raises(ValueError, match="stages.segment.precision"):
        SegmentStage(model_type="tiny-random", precision="fp8")


def test_exact_stage_rows_equal_reference_stage_rows(tiny_sam):
    img = synthetic_image(7, (64, 48))
    batch = pa.RecordBatch.from_pylist(
        [{"image_id": "x", "image": {"bytes": encode(img, "PNG"), "path": "x.png"}}]
    )
    rows = {}
    for impl in ("fast", "reference"):
        stage = SegmentStage(
            model_type="tiny-random",
            device="cpu",
            impl=impl,
            precision="exact",
            points_per_side=8,
            box_nms_thresh=1.0,
        )
        stage.setup(model=tiny_sam)
        [rows[impl]] = stage.process(batch)
    assert rows["fast"]["n_masks"] == rows["reference"]["n_masks"] > 0
    assert rows["fast"]["masks"] == rows["reference"]["masks"]
    assert rows["fast"]["target"] == rows["reference"]["target"]


@pytest.mark.slow
def test_exact_mode_is_the_reference_on_vit_b_random_weights():
    """Real ViT-B (1024 px encoder, 256-channel decoder), random weights, thresholds open so
    every candidate mask reaches NMS and RLE."""
    torch.manual_seed(0)
    sam = build_sam("vit_b").eval()
    kw = dict(
        points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    image = np.asarray(synthetic_image(3, (96, 72)))
    [ms] = _stage_generator(sam, "exact", **kw).generate([image])
    anns = _reference(sam, image, **kw)
    assert len(anns) >= 8
    _assert_identical(ms, anns)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_fast_mode_on_cuda_agrees_with_the_reference(tiny_sam, compile):
    import copy

    from pycocotools import mask as mask_utils

    from pipeline.stages.segment.fast import masks_to_coco_rle

    model = copy.deepcopy(tiny_sam).to("cuda")
    kw = dict(points_per_side=8, box_nms_thresh=1.0)
    stage = SegmentStage(
        model_type="tiny-random", device="cuda", precision="fast", compile=compile, **kw
    )
    stage.setup(model=model)
    assert stage.points_per_batch == 1024
    images = [np.asarray(synthetic_image(s, (80, 56))) for s in range(2)]
    for im, ms in zip(images, stage._generator.generate(images), strict=True):
        anns = _reference(model, im, **kw)
        ref = [
            mask_utils.encode(np.asfortranarray(a["segmentation"].astype(np.uint8))) for a in anns
        ]
        iou = np.asarray(mask_utils.iou(masks_to_coco_rle(ms.masks), ref, [0] * len(ref)))
        assert iou.reshape(len(ms), len(ref)).max(0).mean() >= 0.9

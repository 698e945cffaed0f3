"""Segment Anything automatic masks, batched on the device: the masks of the reference generator.

`FastMaskGenerator` computes what segment-anything's `SamAutomaticMaskGenerator` computes (same
point grids, crops, resizing, upscaling, thresholds in the same order, same box NMS, same
small-region clean-up), but:

- the image encoder runs once per *batch* of images (and crops), in bfloat16 on CUDA;
- the point grid goes through the prompt encoder and mask decoder `points_per_batch` at a time,
  and the predicted-IoU filter runs on the low-resolution logits *before* upscaling, so only the
  masks that can survive are upscaled (the filter is per mask, so this changes nothing);
- stability score, thresholding, boxes, crop-edge filter and NMS stay on the device, vectorised;
- run-length encoding happens only for the masks that survive NMS, in one vectorised pass whose
  only transfer to the CPU is the list of run boundaries (`masks_to_coco_rle`).

No full-resolution mask leaves the device before it has been filtered.

Usage:
    gen = FastMaskGenerator(sam, points_per_side=32, encoder_dtype=torch.bfloat16)
    [result] = gen.generate([np.asarray(pil_rgb_image)])
    rles = masks_to_coco_rle(result.masks)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["FastMaskGenerator", "MaskSet", "masks_to_coco_rle", "is_oom"]

log = logging.getLogger("unimrg.segment")


_OOM_TYPES = tuple(
    t
    for t in (
        getattr(torch, "OutOfMemoryError", None),
        getattr(torch.cuda, "OutOfMemoryError", None),
    )
    if isinstance(t, type)
)


def is_oom(exc: BaseException) -> bool:
    """True for a device out-of-memory error: by type (torch.OutOfMemoryError, and
    torch.cuda.OutOfMemoryError where it is its own class) or, for backends that raise a plain
    RuntimeError (MPS, some cuBLAS/cuDNN paths), by message."""
    return isinstance(exc, _OOM_TYPES) or "out of memory" in str(exc).lower()


@dataclass
class _CropEdges:
    """segment-anything's `is_box_near_crop_edge` with its tensors built once per crop."""

    offset: torch.Tensor  # [1, 4] crop origin, to put crop-frame boxes in the image frame
    crop: torch.Tensor  # [1, 4] the crop box
    image: torch.Tensor  # [1, 4] the image box

    @classmethod
    def build(cls, crop_box: list[int], orig_size: tuple[int, ...], device) -> _CropEdges:
        x0, y0, _, _ = crop_box
        t = torch.tensor(
            [[x0, y0, x0, y0], crop_box, [0, 0, orig_size[1], orig_size[0]]],
            dtype=torch.float32,
            device=device,
        )
        return cls(t[0:1], t[1:2], t[2:3])

    def near(self, boxes: torch.Tensor, atol: float = 20.0) -> torch.Tensor:
        b = boxes.float() + self.offset
        near_crop = torch.isclose(b, self.crop, atol=atol, rtol=0)
        near_image = torch.isclose(b, self.image, atol=atol, rtol=0)
        return torch.any(near_crop & ~near_image, dim=1)


def _nms(ms: MaskSet, thresh: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    from torchvision.ops.boxes import batched_nms

    scores = ms.iou_preds if scores is None else scores
    return batched_nms(
        ms.boxes.float(),
        scores,
        torch.zeros(len(ms), device=ms.boxes.device),
        iou_threshold=thresh,
    )


@dataclass
class MaskSet:
    """The masks kept for one image, in the reference generator's order.

    masks: bool [N, H, W] at the size the image was given in; boxes: XYXY in that frame, with
    segment-anything's convention (x1, y1 are the last covered column and row).
    """

    masks: torch.Tensor
    iou_preds: torch.Tensor
    stability_score: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return int(self.masks.shape[0])


@contextmanager
def _tf32_matmuls():
    """Let CUDA fp32 matmuls use TF32 inside the block, then restore the previous setting."""
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has a per-backend setting; mixing it with the legacy flags is an error there.
    attr, value = (
        ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    )
    old = getattr(matmul, attr)
    setattr(matmul, attr, value)
    try:
        yield
    finally:
        setattr(matmul, attr, old)


class FastMaskGenerator:
    """Batched automatic mask generation with segment-anything's own model and math.

    Parameters mirror `SamAutomaticMaskGenerator` (same names, same defaults). Extra:
      encoder_batch_size: images (or crops) per image-encoder call.
      encoder_dtype: autocast dtype of the image encoder (torch.float32 disables autocast).
      decoder: "package" (segment-anything's own prompt encoder and mask decoder modules: with
        fp32 they give the reference's masks bit for bit) or "batched" (decoder.py beside this
        file: SDPA, the image broadcast over prompts, per-image work done once).
      decoder_precision: for "package": None (plain fp32 matmuls, exactly the reference math),
        "tf32" (fp32 tensors, TF32 matmuls) or "bfloat16" (autocast); for "batched": None
        (float32) or "bfloat16". The logits are always fp32 afterwards.
      compile: torch.compile the batched decoder with static shapes (the last prompt batch is
        padded to points_per_batch).
      map_fn: a `map` to resize images with (e.g. a thread pool's), default the builtin.
    On a device out-of-memory error, points_per_batch (decoder) or encoder_batch_size is halved
    and the failed step is retried; NMS, crop merging and small-region clean-up fall back to the
    CPU for that image. `self.backoffs` records each back-off.
    """

    def __init__(
        self,
        model: Any,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        min_mask_region_area: int = 0,
        encoder_batch_size: int = 8,
        encoder_dtype: torch.dtype = torch.float32,
        decoder_precision: str | None = None,
        decoder: str = "package",
        compile: bool = False,
        map_fn: Callable | None = None,
    ) -> None:
        from segment_anything.utils.amg import build_all_layer_point_grids
        from segment_anything.utils.transforms import ResizeLongestSide

        if decoder_precision not in (None, "tf32", "bfloat16"):
            raise ValueError(
                f"decoder_precision: expected None, 'tf32' or 'bfloat16', got {decoder_precision!r}"
            )
        if decoder not in ("package", "batched"):
            raise ValueError(f"decoder: expected 'package' or 'batched', got {decoder!r}")
        if decoder == "batched" and decoder_precision == "tf32":
            raise ValueError("decoder_precision 'tf32' is for the package decoder only")
        self.model = model
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.point_grids = build_all_layer_point_grids(
            points_per_side, crop_n_layers, crop_n_points_downscale_factor
        )
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.encoder_batch_size = encoder_batch_size
        self.encoder_dtype = encoder_dtype
        self.decoder_precision = decoder_precision
        self.map_fn = map_fn or map
        self._batched = None
        if decoder == "batched":
            from pipeline.stages.segment.decoder import BatchedDecoder

            self._batched = BatchedDecoder(
                model,
                dtype=torch.bfloat16 if decoder_precision == "bfloat16" else torch.float32,
                compile=compile,
                pad_to=points_per_batch if compile else None,
            )
        self.backoffs: list[str] = []
        self.timings: dict[str, float] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---------------------------------------------------------------- public

    @torch.inference_mode()
    def generate(self, images: list[np.ndarray]) -> list[MaskSet]:
        """Masks for each image (HWC uint8 RGB), as the reference `generate` would keep them."""
        from segment_anything.utils.amg import generate_crop_boxes

        jobs: list[tuple[int, list[int], int]] = []
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise ValueError(f"image {i}: expected HxWx3 uint8, got {im.shape} {im.dtype}")
            boxes, layers = generate_crop_boxes(
                im.shape[:2], self.crop_n_layers, self.crop_overlap_ratio
            )
            jobs += [(i, box, layer) for box, layer in zip(boxes, layers, strict=True)]

        crops = [images[i][b[1] : b[3], b[0] : b[2], :] for i, b, _ in jobs]
        with self._timed("encoder"):
            encoded = self._encode(crops)

        per_image: list[list[tuple[MaskSet, list[int]]]] = [[] for _ in images]
        with self._timed("decoder+filters"):
            for (i, box, layer), (features, input_size) in zip(jobs, encoded, strict=True):
                ms = self._process_crop(features, input_size, box, layer, images[i].shape[:2])
                per_image[i].append((ms, box))
            del encoded
            out = [
                self._merge_crops(parts, im.shape[:2])
                for parts, im in zip(per_image, images, strict=True)
            ]
        if self.min_mask_region_area > 0:
            with self._timed("small regions"):
                out = [self._remove_small_regions(ms) for ms in out]
        return out

    @contextmanager
    def _timed(self, what: str):
        """Accumulate seconds per phase into self.timings when it is a dict (benchmarks only:
        it synchronises the device around each phase)."""
        if self.timings is None:
            yield
            return
        device = self.device
        # synchronize() without a device waits only for the current device (not cuda:N's work).
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t0

    # ---------------------------------------------------------------- encoder

    def _encode(self, crops: list[np.ndarray]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Image embeddings [1, C, h, w] and the resized input size, for each crop."""
        # Resize exactly as SamPredictor.set_image does (PIL through torchvision), in parallel
        # when a map_fn (a thread pool's map) was given.
        resized = list(self.map_fn(self.transform.apply_image, crops))
        inputs = [torch.as_tensor(r).permute(2, 0, 1) for r in resized]
        out: list[tuple[torch.Tensor, tuple[int, int]]] = []
        start = 0
        while start < len(inputs):
            chunk = inputs[start : start + self.encoder_batch_size]
            try:
                feats = self._encode_batch(chunk)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc) or self.encoder_batch_size == 1:
                    raise
                self._back_off("encoder_batch_size")
                continue
            out += [(f[None], tuple(t.shape[-2:])) for f, t in zip(feats, chunk, strict=True)]
            start += len(chunk)
        return out

    def _encode_batch(self, chunk: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(
            [self.model.preprocess(t.to(self.device, non_blocking=True)[None]) for t in chunk]
        )
        if self.encoder_dtype == torch.float32:
            return self.model.image_encoder(x)
        with torch.autocast(self.device.type, dtype=self.encoder_dtype):
            return self.model.image_encoder(x).float()

    # ---------------------------------------------------------------- decoder

    def _process_crop(
        self,
        features: torch.Tensor,
        input_size: tuple[int, int],
        crop_box: list[int],
        layer_idx: int,
        orig_size: tuple[int, ...],
    ) -> MaskSet:
        x0, y0, x1, y1 = crop_box
        crop_size = (y1 - y0, x1 - x0)
        points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        # apply_coords is element-wise: transforming all points at once equals per batch.
        coords = torch.as_tensor(self.transform.apply_coords(points, crop_size), device=self.device)
        # Built once per crop on the device, so the per-batch filters copy nothing to it.
        edges = _CropEdges.build(crop_box, orig_size, self.device)
        ctx = self._batched.prepare(features) if self._batched is not None else None

        parts: list[MaskSet] = []
        start = 0
        while start < len(coords):
            n = self.points_per_batch
            try:
                parts.append(
                    self._process_points(
                        features, ctx, coords[start : start + n], input_size, crop_size, edges
                    )
                )
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc) or n == 1:
                    raise
                self._back_off("points_per_batch")
                continue
            start += n
        ms = _cat(parts, crop_size, self.device)
        return self._oom_to_cpu("box NMS", lambda m: _take(m, _nms(m, self.box_nms_thresh)), ms)

    def _decode(
        self, features: torch.Tensor, ctx: Any, coords: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits [B*3, h, w] and predicted IoU [B*3] (float32) for a batch of points."""
        if ctx is not None:
            low_res, iou_preds = self._batched(ctx, coords)
            return low_res.flatten(0, 1), iou_preds.flatten(0, 1)
        from pipeline.stages.segment.decoder import point_prompts

        model = self.model
        pe = model.prompt_encoder
        sparse = point_prompts(pe, coords)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            len(coords), -1, *pe.image_embedding_size
        )
        with self._decoder_context():
            low_res, iou_preds = model.mask_decoder(
                image_embeddings=features,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
        return low_res.float().flatten(0, 1), iou_preds.float().flatten(0, 1)

    def _process_points(
        self,
        features: torch.Tensor,
        ctx: Any,
        coords: torch.Tensor,
        input_size: tuple[int, int],
        crop_size: tuple[int, int],
        edges: _CropEdges,
    ) -> MaskSet:
        """Decode one batch of points and filter it: two `nonzero`s, no other host sync.

        The predicted-IoU filter compacts before upscaling (the filter is per mask, so the same
        masks survive as when the reference upscales all of them first); the stability and
        crop-edge filters are combined into one keep mask and compacted once.
        """
        from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score

        model = self.model
        low_res, iou_preds = self._decode(features, ctx, coords)
        if self.pred_iou_thresh > 0.0:
            idx = torch.nonzero(iou_preds > self.pred_iou_thresh).squeeze(1)
            low_res, iou_preds = low_res[idx], iou_preds[idx]
        logits = model.postprocess_masks(low_res[:, None], input_size, crop_size)[:, 0]
        del low_res

        stability = calculate_stability_score(
            logits, model.mask_threshold, self.stability_score_offset
        )
        masks = logits > model.mask_threshold
        del logits
        boxes = batched_mask_to_box(masks)
        keep = ~edges.near(boxes)
        if self.stability_score_thresh > 0.0:
            keep &= stability >= self.stability_score_thresh
        idx = torch.nonzero(keep).squeeze(1)
        return MaskSet(masks[idx], iou_preds[idx], stability[idx], boxes[idx])

    @contextmanager
    def _decoder_context(self):
        if self.decoder_precision == "bfloat16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        elif self.decoder_precision == "tf32":
            with _tf32_matmuls():
                yield
        else:
            yield

    # ---------------------------------------------------------------- crops and clean-up

    def _merge_crops(
        self, parts: list[tuple[MaskSet, list[int]]], orig_size: tuple[int, ...]
    ) -> MaskSet:
        """Uncrop every crop's masks into the image frame; NMS across crops when there are several."""
        if len(parts) == 1:
            return parts[0][0]
        return self._oom_to_cpu(
            "crop merging", lambda p: _merge(p, orig_size, self.crop_nms_thresh), parts
        )

    def _remove_small_regions(self, ms: MaskSet) -> MaskSet:
        """The reference's postprocess_small_regions (OpenCV, so on the CPU, after filtering)."""
        if len(ms) == 0:
            return ms
        thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
        return self._oom_to_cpu(
            "small-region clean-up",
            lambda m: _small_regions(m, self.min_mask_region_area, thresh),
            ms,
        )

    def _oom_to_cpu(self, what: str, fn: Callable, arg: Any) -> Any:
        """fn(arg) on the device; on out-of-memory, again with arg's tensors on the CPU (the
        result goes back to the device). The same math either way, so the same masks."""
        try:
            return fn(arg)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_oom(exc) or not _can_fall_back(self.device):
                raise
        msg = f"device out of memory in {what}; running it on the CPU for this image"
        log.warning(msg)
        self.backoffs.append(msg)
        _empty_cache()
        return _to(fn(_to(arg, torch.device("cpu"))), self.device)

    def _back_off(self, what: str) -> None:
        old = getattr(self, what)
        setattr(self, what, max(1, old // 2))
        if what == "points_per_batch" and self._batched is not None and self._batched.pad_to:
            self._batched.pad_to = self.points_per_batch
        msg = f"device out of memory with {what}={old}; retrying with {what}={getattr(self, what)}"
        log.warning(msg)
        self.backoffs.append(msg)
        _empty_cache()


def _can_fall_back(device: torch.device) -> bool:
    """Whether work that ran out of memory on `device` can be redone on the CPU."""
    return device.type != "cpu"


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _to(x: Any, device: torch.device) -> Any:
    """MaskSets, tensors and (nested) lists/tuples of them moved to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, MaskSet):
        return MaskSet(*(_to(getattr(x, f), device) for f in _FIELDS))
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _merge(
    parts: list[tuple[MaskSet, list[int]]], orig_size: tuple[int, ...], thresh: float
) -> MaskSet:
    from segment_anything.utils.amg import uncrop_boxes_xyxy, uncrop_masks
    from torchvision.ops.boxes import box_area

    h, w = orig_size[0], orig_size[1]
    device = parts[0][0].masks.device
    sets, crop_boxes = [], []
    for ms, box in parts:
        sets.append(
            MaskSet(
                uncrop_masks(ms.masks, box, h, w),
                ms.iou_preds,
                ms.stability_score,
                uncrop_boxes_xyxy(ms.boxes, box),
            )
        )
        crop_boxes.append(torch.tensor([box] * len(ms), dtype=torch.int64).reshape(-1, 4))
    merged = _cat(sets, (h, w), device)
    # Prefer masks from smaller crops, as the reference does.
    scores = (1 / box_area(torch.cat(crop_boxes))).to(device)
    return _take(merged, _nms(merged, thresh, scores))


def _small_regions(ms: MaskSet, area: int, thresh: float) -> MaskSet:
    from segment_anything.utils.amg import batched_mask_to_box, remove_small_regions

    device = ms.masks.device
    masks_np = ms.masks.cpu().numpy()
    new_masks, unchanged = [], []
    for m in masks_np:
        m, changed_holes = remove_small_regions(m, area, mode="holes")
        m, changed_islands = remove_small_regions(m, area, mode="islands")
        new_masks.append(torch.as_tensor(m))
        unchanged.append(float(not (changed_holes or changed_islands)))
    masks = torch.stack(new_masks)
    scores = torch.as_tensor(unchanged)
    new_boxes = batched_mask_to_box(masks)
    keep = _nms(MaskSet(masks, scores, scores, new_boxes), thresh)
    # The reference only replaces the box (and mask) of masks that changed.
    boxes = torch.where((scores == 0)[:, None], new_boxes, ms.boxes.cpu())
    kd = keep.to(device)
    return MaskSet(
        masks[keep].to(device), ms.iou_preds[kd], ms.stability_score[kd], boxes[keep].to(device)
    )


_FIELDS = ("masks", "iou_preds", "stability_score", "boxes")


def _cat(parts: list[MaskSet], size: tuple[int, int], device: torch.device) -> MaskSet:
    if not parts:
        return MaskSet(
            torch.zeros((0, *size), dtype=torch.bool, device=device),
            torch.zeros(0, device=device),
            torch.zeros(0, device=device),
            torch.zeros((0, 4), dtype=torch.int64, device=device),
        )
    return MaskSet(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS))


def _take(ms: MaskSet, keep: torch.Tensor) -> MaskSet:
    return MaskSet(ms.masks[keep], ms.iou_preds[keep], ms.stability_score[keep], ms.boxes[keep])


def masks_to_coco_rle(masks: torch.Tensor, chunk: int = 64) -> list[dict[str, Any]]:
    """COCO (compressed) RLE of bool masks [N, H, W], on the masks' device.

    Column-major run boundaries are found for all masks at once; only those boundaries go to the
    CPU, where pycocotools compresses them. Gives the same RLE as `mask_utils.encode` on the
    Fortran-ordered uint8 masks (and as the reference's `mask_to_rle_pytorch` + `coco_encode_rle`).
    """
    from pycocotools import mask as mask_utils

    n, h, w = masks.shape
    out: list[dict[str, Any]] = []
    for s in range(0, n, chunk):
        part = masks[s : s + chunk]
        flat = part.permute(0, 2, 1).reshape(part.shape[0], h * w)
        change = (flat[:, 1:] != flat[:, :-1]).nonzero().cpu().numpy()
        first = flat[:, 0].cpu().numpy()
        rows, cols = change[:, 0], change[:, 1] + 1
        bounds = np.split(cols, np.searchsorted(rows, np.arange(1, part.shape[0])))
        objs = []
        for i, b in enumerate(bounds):
            counts = np.diff(np.concatenate(([0], b, [h * w])))
            if first[i]:
                counts = np.concatenate(([0], counts))
            objs.append({"size": [h, w], "counts": counts.tolist()})
        for rle in mask_utils.frPyObjects(objs, h, w):
            rle["counts"] = rle["counts"].decode("ascii")
            out.append(rle)
    return out

"""The segment stage: Segment Anything automatic masks as segmentation pseudo-labels.

Per image it writes the kept masks as COCO RLE (with predicted IoU, stability score, box, area)
and the rendered training target (PNG at the image's original size):

- `render: edges` (default, the paper's released recipe): the union of every mask's boundary,
  `cv2.Canny` on each mask, white on black;
- `render: colors`: a filled map, one deterministic colour per mask, largest masks drawn first
  so that small ones stay visible, unlabelled pixels black.

Two implementations give the same masks: `impl: fast` (fast.py in this package, batched on the
device) and `impl: reference` (segment-anything's own `SamAutomaticMaskGenerator`). Images longer
than `max_size` are downscaled before SAM; masks are resized back to the original size
(nearest neighbour) before run-length encoding, and the target is rendered at the SAM size and
resized back the same way. See docs/segment.md.

Usage:
    from pipeline.stage import build_stage, run_stage
    run_stage(build_stage("segment", manifest), Layout(manifest.out))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.config import PosInt, StrictConfig, resolve_path
from pipeline.fingerprint import fingerprint, hash_files
from pipeline.shards import image_field, label_table, with_hf_features, write_parquet_atomic
from pipeline.stage import LabelStage, Progress
from pipeline.stages.segment.model import load_sam, tiny_sam_checkpoint
from pipeline.stages.segment.render import (
    render_colors,
    render_edges,
    resize_masks,
    resize_nearest,
    target_png,
)

if TYPE_CHECKING:
    pass

__all__ = ["MASK_TYPE", "SegmentConfig", "SegmentStage", "segment_schema"]

log = logging.getLogger("unimrg.segment")

MASK_TYPE = pa.struct(
    [
        ("counts", pa.string()),
        ("size", pa.list_(pa.int32())),
        ("predicted_iou", pa.float32()),
        ("stability_score", pa.float32()),
        ("bbox", pa.list_(pa.float32())),
        ("area", pa.int64()),
    ]
)

#: Parameters that change the masks (all go into the fingerprint).
_AMG_PARAMS = (
    "points_per_side",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
)

#: Masks resized back to a downscaled image's original size at once hold about this many pixels
#: (a few masks of a huge photo, not all of them).
RESIZE_PIXELS = 1 << 26


def segment_schema(render: str, random_weights: bool) -> pa.Schema:
    """The segment label shard's schema; `target` an image cell (PNG bytes) that `datasets`
    decodes as `Image`. Also used by writers of exact labels (experiments/miniature/labels.py)."""
    return with_hf_features(
        pa.schema(
            [
                pa.field("image_id", pa.string(), nullable=False),
                pa.field("error", pa.string()),
                pa.field("masks", pa.list_(MASK_TYPE)),
                image_field("target"),
                pa.field("width", pa.int32()),
                pa.field("height", pa.int32()),
                pa.field("n_masks", pa.int32()),
            ],
            metadata={
                b"unimrg.render": render.encode(),
                b"unimrg.random_weights": str(bool(random_weights)).lower().encode(),
            },
        )
    )


class SegmentConfig(StrictConfig):
    """Segment Anything automatic-mask pseudo-labels (segment-anything package)."""

    #: What docs/manifest.md says of the whole `stages.segment` section.
    section_description: ClassVar[str] = "Segmentation stage settings."

    model_type: Literal["vit_b", "vit_l", "vit_h", "tiny-random"] = Field(
        "vit_h", description="SAM backbone, or `tiny-random` (random weights: output is noise)."
    )
    checkpoint: str | None = Field(
        None,
        description="Path to the SAM checkpoint `.pth` (relative to the manifest); not used "
        "with `tiny-random`.",
    )
    impl: Literal["fast", "reference"] = Field(
        "fast",
        description="`fast`: batched GPU mask generation; `reference`: segment-anything's own "
        "`SamAutomaticMaskGenerator`.",
    )
    points_per_side: PosInt = Field(32, description="Point grid is points_per_side^2 prompts.")
    points_per_batch: PosInt | None = Field(
        None,
        description="Point prompts per decoder call, halved on device OOM (unset: 1024 with "
        "`precision: fast` on CUDA, else 64 as the reference).",
    )
    pred_iou_thresh: float = Field(
        0.88, ge=0, le=1, description="Keep masks with predicted IoU above this, in [0, 1]."
    )
    stability_score_thresh: float = Field(
        0.95, ge=0, le=1, description="Keep masks with stability above this, in [0, 1]."
    )
    stability_score_offset: float = Field(1.0, description="Logit offset for the stability score.")
    box_nms_thresh: float = Field(
        0.7, gt=0, le=1, description="Box IoU for NMS within one crop, in (0, 1]."
    )
    crop_n_layers: int = Field(0, ge=0, description="Extra layers of image crops.")
    crop_nms_thresh: float = Field(
        0.7, gt=0, le=1, description="Box IoU for NMS across crops, in (0, 1]."
    )
    crop_overlap_ratio: float = Field(
        512 / 1500, ge=0, lt=1, description="Crop overlap, fraction of length, in [0, 1)."
    )
    crop_n_points_downscale_factor: PosInt = Field(
        1, description="Point grid downscale per crop layer."
    )
    min_mask_region_area: int = Field(
        0, ge=0, description="Remove holes and islands smaller than this, in pixels (0: off)."
    )
    render: Literal["edges", "colors"] = Field(
        "edges",
        description="Training target: `edges` (union of mask boundaries, white on black, as the "
        "released code) or `colors` (filled, coloured map).",
    )
    max_size: PosInt = Field(
        2048,
        description="Images longer than this on the long side (pixels) are "
        "downscaled before SAM; the map is resized back.",
    )
    batch_size: PosInt = Field(8, description="Images per image-encoder batch.")
    precision: Literal["auto", "exact", "fast"] = Field(
        "auto",
        description="`exact`: float32 everywhere, masks identical to segment-anything's "
        "generator; `fast`: bfloat16 encoder and batched SDPA decoder (masks close, not "
        "identical); `auto`: fast on CUDA, exact on CPU.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the fast decoder (static shapes; first batches are slow).",
    )
    device: str = Field("auto", description="`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`.")


@dataclass
class SegmentStage(LabelStage):
    """SAM automatic-mask pseudo-labels. Fields are the manifest's `stages.segment` settings."""

    name: ClassVar[str] = "segment"
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = (
        "torch",
        "torchvision",
        "segment-anything",
        "pycocotools",
        "opencv-python-headless",
        "numpy",
        "pillow",
        "pyarrow",
    )

    model_type: str = "vit_h"
    checkpoint: str | None = None
    impl: str = "fast"
    points_per_side: int = 32
    points_per_batch: int | None = None
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    render: str = "edges"
    max_size: int = 2048
    batch_size: int = 8
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"

    _model: Any = field(default=None, init=False, repr=False)
    _generator: Any = field(default=None, init=False, repr=False)
    _pool: Any = field(default=None, init=False, repr=False)
    #: One line per out-of-memory halving (also logged).
    backoffs: list[str] = field(default_factory=list, init=False, repr=False)
    _gen_backoffs_seen: int = field(default=0, init=False, repr=False)
    _resize_pool: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.impl not in ("fast", "reference"):
            raise ValueError(
                f"stages.segment.impl: expected 'fast' or 'reference', got {self.impl!r}"
            )
        if self.render not in ("edges", "colors"):
            raise ValueError(
                f"stages.segment.render: expected 'edges' or 'colors', got {self.render!r}"
            )
        if self.precision not in ("auto", "exact", "fast"):
            raise ValueError(
                f"stages.segment.precision: expected 'auto', 'exact' or 'fast', "
                f"got {self.precision!r}"
            )
        if self.model_type not in ("vit_b", "vit_l", "vit_h", "tiny-random"):
            raise ValueError(f"stages.segment.model_type: unknown {self.model_type!r}")
        if self.model_type != "tiny-random" and not self.checkpoint:
            raise ValueError(
                f"stages.segment.checkpoint: required for model_type {self.model_type} "
                "(path to the SAM .pth file)"
            )

    def __getstate__(self) -> dict[str, Any]:
        # Ship parameters only (Dask, Prefect): each worker loads its own model in setup().
        state = dict(self.__dict__)
        state.update(_model=None, _generator=None, _pool=None, _resize_pool=None)
        return state

    @classmethod
    def from_config(cls, cfg: SegmentConfig, base_dir: Path | None) -> SegmentStage:
        values = cfg.model_dump()
        if values.get("checkpoint"):
            values["checkpoint"] = str(resolve_path(values["checkpoint"], base_dir))
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in values.items() if k in names})

    # ------------------------------------------------------------ identity

    def uses_random_weights(self) -> bool:
        return self.model_type == "tiny-random"

    def checkpoint_path(self) -> Path:
        """The weights file that is loaded (built and cached for `tiny-random`)."""
        if self.model_type == "tiny-random":
            return tiny_sam_checkpoint()
        path = Path(self.checkpoint or "")
        if not path.is_file():
            raise FileNotFoundError(f"stages.segment.checkpoint: {path} not found")
        return path

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_precision(self) -> str:
        """`exact` or `fast` (the reference generator is always exact)."""
        if self.impl == "reference":
            return "exact"
        if self.precision != "auto":
            return self.precision
        return "fast" if self.resolved_device().startswith("cuda") else "exact"

    def resolved_points_per_batch(self) -> int:
        if self.points_per_batch is not None:
            return self.points_per_batch
        fast_cuda = self.resolved_precision() == "fast" and self.resolved_device().startswith(
            "cuda"
        )
        return 1024 if fast_cuda else 64

    def fingerprint(self) -> str:
        return fingerprint(self.fingerprint_parts())

    def fingerprint_parts(self) -> dict[str, Any]:
        return {
            "stage": self.name,
            "version": self.version,
            "impl": self.impl,
            "model_type": self.model_type,
            "weights": self.model_lineage()["weights"],
            "amg": {k: getattr(self, k) for k in _AMG_PARAMS},
            "render": self.render,
            "max_size": self.max_size,
            # `exact` keeps the key this stage had before precision modes existed, so exact
            # outputs keep their fingerprint; `fast` masks differ, so it says so.
            **(
                {"dtype": "float32"}
                if self.resolved_precision() == "exact"
                else {"dtype": "bfloat16", "precision": "fast"}
            ),
        }

    def model_lineage(self) -> dict[str, Any]:
        ckpt = self.checkpoint_path()
        return {
            "spec": self.model_type,
            "source": "tiny-random" if self.uses_random_weights() else "local",
            "path": str(ckpt),
            "revision": None,
            "weights": hash_files([ckpt]),
        }

    def key_parameters(self) -> dict[str, Any]:
        return {
            "points_per_side": self.points_per_side,
            "render": self.render,
            "impl": self.impl,
            "precision": self.resolved_precision(),
        }

    def schema(self) -> pa.Schema:
        return segment_schema(self.render, self.uses_random_weights())

    # ------------------------------------------------------------ model

    def setup(self, model: Any = None) -> None:
        """Load the model once per worker. `model`: an already built `Sam` (benchmarks)."""
        import torch

        device = torch.device(self.resolved_device())
        if model is None:
            model = load_sam(self.model_type, self.checkpoint_path())
        self._model = model.to(device).eval()
        common = {k: getattr(self, k) for k in _AMG_PARAMS}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        if self._resize_pool is None:
            # The resize before the encoder has its own threads, so the device never waits for
            # it behind decoding and finishing work queued on the main pool.
            self._resize_pool = ThreadPoolExecutor(
                max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="sam-resize"
            )
        self.points_per_batch = self.resolved_points_per_batch()
        if self.impl == "fast":
            from pipeline.stages.segment.fast import FastMaskGenerator

            fast = self.resolved_precision() == "fast"
            self._generator = FastMaskGenerator(
                self._model,
                points_per_batch=self.points_per_batch,
                encoder_batch_size=self.batch_size,
                encoder_dtype=torch.bfloat16 if fast else torch.float32,
                decoder="batched" if fast else "package",
                decoder_precision="bfloat16" if fast else None,
                compile=self.compile and fast,
                map_fn=self._resize_pool.map,
                **common,
            )
        else:
            from segment_anything import SamAutomaticMaskGenerator

            self._generator = SamAutomaticMaskGenerator(
                self._model,
                points_per_batch=self.points_per_batch,
                output_mode="binary_mask",
                **common,
            )

    # ------------------------------------------------------------ labelling

    def process(self, batch: pa.RecordBatch) -> list[dict[str, Any]]:
        if self._generator is None:
            self.setup()
        return _collect(self._label(self._submit_loads(batch)))

    def run_shard(
        self,
        image_shard: Path,
        out_path: Path,
        progress: Progress | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[int, list[dict]]:
        """Like the base runner, with the CPU work overlapped with the device: while batch k is
        on the device, worker threads decode batch k+1 and encode/render batch k-1."""
        if self._generator is None:
            self.setup()
        batches = pq.ParquetFile(image_shard).iter_batches(
            batch_size=self.batch_size, columns=["image_id", "image"]
        )
        rows: list[dict[str, Any]] = []
        upcoming = self._submit_loads(next(batches, None))
        pending: list[Any] | None = None
        while upcoming is not None:
            current, upcoming = upcoming, self._submit_loads(next(batches, None))
            labelled = self._label(current)
            if pending is not None:
                rows += _collect(pending)
                if progress:
                    progress(len(pending))
            pending = labelled
        if pending is not None:
            rows += _collect(pending)
            if progress:
                progress(len(pending))
        write_parquet_atomic(label_table(rows, self.output_schema(metadata)), out_path)
        return len(rows), [r for r in rows if r.get("error")]

    def _submit_loads(
        self, batch: pa.RecordBatch | None
    ) -> tuple[list[str], list[str], list[Future]] | None:
        """Start decoding a batch's images on the worker threads."""
        if batch is None:
            return None
        ids = batch.column("image_id").to_pylist()
        images = batch.column("image").to_pylist()
        paths = [(im or {}).get("path") or "<no path>" for im in images]
        return ids, paths, [self._pool.submit(self._load, im) for im in images]

    def _label(self, loads: tuple[list[str], list[str], list[Future]]) -> list[Any]:
        """Masks for a batch on the device; returns per row an error row or a Future of the row."""
        ids, paths, futures = loads
        loaded = [f.result() for f in futures]
        out: list[Any] = [None] * len(ids)
        good = []
        for i, item in enumerate(loaded):
            if isinstance(item, str):
                out[i] = _error_row(ids[i], f"{paths[i]}: {item}")
            else:
                good.append(i)
        results = self._generate([loaded[i][0] for i in good], [ids[i] for i in good])
        for i, res in zip(good, results, strict=True):
            if isinstance(res, str):
                out[i] = _error_row(ids[i], f"{paths[i]}: {res}")
            else:
                out[i] = self._pool.submit(self._finish, ids[i], res, loaded[i][1])
        return out

    def _load(self, image: dict | None) -> tuple[np.ndarray, tuple[int, int]] | str:
        """Decoded RGB at the size SAM sees (downscaled past max_size) and the original (h, w)."""
        from PIL import Image

        from pipeline.images import UnusableImage, decode_rgb

        try:
            if not image or not image.get("bytes"):
                raise UnusableImage("no image bytes")
            data = image["bytes"]
            # `fast`: a JPEG above max_size decodes at a reduced DCT scale (PIL draft, long side
            # still >= max_size) before the resize: several times cheaper, slightly different
            # pixels; `exact` decodes at full size as before.
            draft = self.resolved_precision() == "fast"
            img = decode_rgb(data, long_side=self.max_size if draft else None)
            w, h = _oriented_size(data) if draft else img.size
        except UnusableImage as exc:
            return str(exc)
        if max(w, h) > self.max_size:
            # The SAM size comes from the original size (a drafted decode is only a shortcut).
            scale = self.max_size / max(w, h)
            size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
            if img.size != size:
                img = img.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(img), (h, w)

    def _generate(self, arrays: list[np.ndarray], ids: list[str]) -> list[Any]:
        """MaskSets per image (or an error string); a failing batch is retried image by image."""
        if not arrays:
            return []
        try:
            return self._generate_batch(arrays)
        except Exception as exc:
            if len(arrays) == 1:
                log.warning("segment: image %s failed: %s", ids[0], exc)
                return [f"{type(exc).__name__}: {exc}"]
        return [self._generate([a], [i])[0] for a, i in zip(arrays, ids, strict=True)]

    def _generate_batch(self, arrays: list[np.ndarray]) -> list[Any]:
        from pipeline.stages.segment.fast import MaskSet

        if self.impl == "fast":
            res = self._generator.generate(arrays)
            self._sync_backoffs()
            return res
        import torch

        out = []
        for a in arrays:
            while True:
                try:
                    anns = self._generator.generate(a)
                    break
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    self._reference_back_off(exc)
            h, w = a.shape[:2]
            masks = (
                torch.as_tensor(np.stack([x["segmentation"] for x in anns]))
                if anns
                else torch.zeros((0, h, w), dtype=torch.bool)
            )
            boxes = torch.tensor([x["bbox"] for x in anns], dtype=torch.int64).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            out.append(
                MaskSet(
                    masks,
                    torch.tensor([x["predicted_iou"] for x in anns], dtype=torch.float32),
                    torch.tensor([x["stability_score"] for x in anns], dtype=torch.float32),
                    boxes,
                )
            )
        return out

    def _reference_back_off(self, exc: BaseException) -> None:
        from pipeline.stages.segment.fast import is_oom

        gen = self._generator
        if not is_oom(exc) or gen.points_per_batch == 1:
            raise exc
        old = gen.points_per_batch
        gen.points_per_batch = max(1, old // 2)
        self.points_per_batch = gen.points_per_batch
        msg = f"device out of memory with points_per_batch={old}; retrying with {gen.points_per_batch}"
        log.warning(msg)
        self.backoffs.append(msg)
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _sync_backoffs(self) -> None:
        gen = self._generator
        self.backoffs.extend(gen.backoffs[self._gen_backoffs_seen :])
        self._gen_backoffs_seen = len(gen.backoffs)
        self.points_per_batch = gen.points_per_batch

    def _finish(self, image_id: str, ms: Any, orig_size: tuple[int, int]) -> dict[str, Any]:
        """RLE at the original size, the rendered target, the row. Out of device memory (up to
        8 images finish at once), the image is finished again on the CPU."""
        import torch

        import pipeline.stages.segment.fast as sam_fast

        try:
            try:
                return self._finish_row(image_id, ms, orig_size)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not sam_fast.is_oom(exc) or not sam_fast._can_fall_back(ms.masks.device):
                    raise
                msg = f"device out of memory finishing image {image_id}; finishing it on the CPU"
                log.warning(msg)
                self.backoffs.append(msg)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return self._finish_row(image_id, sam_fast._to(ms, torch.device("cpu")), orig_size)
        except Exception as exc:  # one bad image must not sink the shard
            log.warning("segment: image %s failed while encoding: %s", image_id, exc)
            return _error_row(image_id, f"{type(exc).__name__}: {exc}")

    def _finish_row(self, image_id: str, ms: Any, orig_size: tuple[int, int]) -> dict[str, Any]:
        import torch

        from pipeline.stages.segment.fast import masks_to_coco_rle

        h, w = orig_size
        masks = ms.masks
        target = render_edges(masks) if self.render == "edges" else render_colors(masks)
        if tuple(masks.shape[-2:]) == (h, w):
            rles = masks_to_coco_rle(masks)
            areas = masks.sum(dim=(1, 2), dtype=torch.int64).cpu().tolist()
            boxes = ms.boxes.cpu().float()
        else:
            # Downscaled for SAM: resize the masks and the map back (nearest neighbour), so every
            # RLE has the image's own size; boxes come from the resized masks. A few masks at a
            # time (about 2^26 pixels), so a huge original never needs [N, H, W] at once.
            from segment_anything.utils.amg import batched_mask_to_box

            step = max(1, RESIZE_PIXELS // (h * w))
            rles, areas, parts = [], [], []
            for s in range(0, len(masks), step):
                big = resize_masks(masks[s : s + step], (h, w))
                rles += masks_to_coco_rle(big)
                areas += big.sum(dim=(1, 2), dtype=torch.int64).cpu().tolist()
                parts.append(batched_mask_to_box(big).cpu().float())
                del big
            boxes = torch.cat(parts) if parts else torch.zeros((0, 4))
            target = resize_nearest(target, (h, w))
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        iou = ms.iou_preds.float().cpu().tolist()
        stab = ms.stability_score.float().cpu().tolist()
        rows = [
            {
                "counts": r["counts"],
                "size": [int(s) for s in r["size"]],
                "predicted_iou": iou[k],
                "stability_score": stab[k],
                "bbox": xywh[k],
                "area": areas[k],
            }
            for k, r in enumerate(rles)
        ]
        return {
            "image_id": image_id,
            "error": None,
            "masks": rows,
            "target": target_png(target),
            "width": w,
            "height": h,
            "n_masks": len(rows),
        }


# ---------------------------------------------------------------- helpers


def _oriented_size(data: bytes) -> tuple[int, int]:
    """(w, h) of the image as decoded (EXIF orientation applied), from its header only."""
    import io

    from PIL import Image

    from pipeline.images import exif_orientation

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return (h, w) if exif_orientation(data) in (5, 6, 7, 8) else (w, h)


def _collect(items: list[Any]) -> list[dict[str, Any]]:
    return [x.result() if isinstance(x, Future) else x for x in items]


def _error_row(image_id: str, reason: str) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "error": reason,
        "masks": None,
        "target": None,
        "width": None,
        "height": None,
        "n_masks": None,
    }

"""Depth pseudo-labels: Depth Anything (V2) through transformers, batched and overlapped on GPU.

`DepthStage` turns an image shard into `labels/depth/<fingerprint>/shard-NNNNN.parquet`, one row
per image row, in the same order (columns: see `DEPTH_SCHEMA` and docs/depth.md):

    image_id       the image row's id
    error          null, or why this row has no depth (it also goes to the quarantine)
    depth_png16    relative depth (inverse depth: larger = nearer) at the original image size,
                   min-max scaled to 0..65535, as a 16-bit grayscale PNG
    depth_min/max  float32 range that undoes the scaling: d = png / 65535 * (max - min) + min
    target         the training target as the UniMRG/Depth Anything code makes it: per-image
                   min-max scaled to 0..255 (truncated, as numpy `astype(uint8)`), near is bright,
                   8-bit grayscale ("L") PNG; the trainer converts it to RGB
    width/height   the size of the image the depth belongs to (as decoded)

Model spec (`model`): a hub id (+ `revision`; must already be in the local Hugging Face cache,
no machine here reaches the hub), a local directory, or `tiny-random` (the real class at tiny
size, fixed seed, loaded back through the same `from_pretrained` code; its output is noise):
pipeline/stages/depth/model.py. The PNG codecs (the trainer reads them too): pipeline/depth_png.py.

Speed (see docs/depth.md, benchmarks/depth_throughput.py): `run_shard` overlaps a reader thread
(Parquet read, JPEG decode with nvjpeg on CUDA, resize and normalise on the device, on its own
CUDA stream) with the forward pass in the calling thread and a writer thread (PNG encoding in a
thread pool, in-order row groups streamed to the temporary shard file). Images are bucketed by
their resized shape, so nothing is padded: a row's depth does not depend on its neighbours
beyond floating-point summation order. The threads are the stage's base class
`OverlappedShards` (pipeline/stages/depth/overlap.py); the steps they run are defined here.

Usage:
    from pipeline.stages.depth.stage import DepthStage
    stage = DepthStage(model="tiny-random", input_size=70)
    stage.setup()
    stage.run_shard(Path("out/images/shard-00000.parquet"), Path("/tmp/depth-00000.parquet"))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.config import PosInt, StrictConfig
from pipeline.depth_png import quantize_depth
from pipeline.fingerprint import fingerprint, hash_files
from pipeline.images import exif_orientation, is_jpeg
from pipeline.shards import image_field, with_hf_features
from pipeline.stage import LabelStage
from pipeline.stages.depth.model import (
    MODEL_CONFIG_FILES,
    PATCH,
    TINY_RANDOM,
    WEIGHT_SUFFIXES,
    ModelNotFoundError,
    is_hub_model,
    local_model_path,
    resolve_model_dir,
)
from pipeline.stages.depth.overlap import (
    Decoded,
    DepthResult,
    OverlappedShards,
    Prepared,
    result_rows,
)

if TYPE_CHECKING:
    import torch


__all__ = ["DEPTH_SCHEMA", "RENDER", "DepthConfig", "DepthStage", "resized_shape"]

# Named for where it logged from before the split (pipeline/depth.py), so log filters keep working.
log = logging.getLogger("pipeline.depth")

#: Everything about rendering that changes output bytes; bump a value when its code changes.
RENDER = {
    "input_resize": "bicubic-antialias, short side = input_size (multiple of 14)",
    "output_resize": "bilinear-align_corners to the decoded size",
    "depth_png16": "minmax round to 0..65535, png level 0 filter none",
    "target": "minmax floor to 0..255, L png level 1 filter up",
}

#: `depth_png16` and `target` are image cells (`{"bytes", "path"}`, PNG bytes) that Hugging
#: Face `datasets` decodes as `Image` (16-bit grayscale and 8-bit grayscale) without a cast.
DEPTH_SCHEMA = with_hf_features(
    pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            image_field("depth_png16"),
            pa.field("depth_min", pa.float32()),
            pa.field("depth_max", pa.float32()),
            image_field("target"),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
        ]
    )
)


def resized_shape(height: int, width: int, input_size: int) -> tuple[int, int]:
    """Model input (height, width): short side = input_size rounded to a multiple of 14, the
    long side scaled by the same factor and rounded to a multiple of 14 (aspect ratio kept, as
    Depth Anything's own `lower_bound` resize)."""
    short = max(PATCH, round(input_size / PATCH) * PATCH)
    scale = short / min(height, width)

    def snap(v: int) -> int:
        return max(PATCH, round(v * scale / PATCH) * PATCH)

    return (short, snap(width)) if height <= width else (snap(height), short)


# ----------------------------------------------------------------------------- the stage


class DepthConfig(StrictConfig):
    """Depth Anything V2 pseudo-labels (transformers `DepthAnythingForDepthEstimation`)."""

    #: What docs/manifest.md says of the whole `stages.depth` section.
    section_description: ClassVar[str] = "Depth stage settings."

    model: str = Field(
        "depth-anything/Depth-Anything-V2-Large-hf",
        description="Hub id, local directory (relative to the manifest), or `tiny-random` "
        "(real class at tiny size, random weights: output is noise).",
    )
    revision: str | None = Field(None, description="Hub revision (commit or tag) for a hub id.")
    batch_size: PosInt = Field(32, description="Images per forward pass (halved on CUDA OOM).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype: `auto` is bfloat16 on CUDA and float32 on CPU."
    )
    input_size: PosInt = Field(
        518,
        description="Short side fed to the model, in pixels; rounded to a multiple of 14, "
        "aspect ratio kept.",
    )
    device: str = Field("auto", description="`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`.")


@dataclass
class DepthStage(OverlappedShards, LabelStage):
    """Depth Anything relative depth at the original size, plus the UniMRG training target."""

    name: ClassVar[str] = "depth"
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = (
        "torch",
        "torchvision",
        "transformers",
        "numpy",
        "pillow",
        "pyarrow",
    )

    #: Hub id, local directory (relative to `base_dir`), or `tiny-random`.
    model: str = "depth-anything/Depth-Anything-V2-Large-hf"
    #: Hub revision (commit or tag) for a hub id; none: the cached `main`.
    revision: str | None = None
    #: Images per forward pass (halved on CUDA OOM). Does not change the fingerprint.
    batch_size: int = 32
    #: `auto` (bfloat16 on CUDA, float32 on CPU), `bfloat16`, `float16`, `float32`.
    dtype: str = "auto"
    #: Short side fed to the model, pixels (rounded to a multiple of 14).
    input_size: int = 518
    #: `auto`, `cpu`, `cuda`, `cuda:N`. Only through the dtype does it change the fingerprint.
    device: str = "auto"
    #: Folder a relative local model directory is resolved against (the manifest's folder).
    base_dir: Path | None = None

    _model: Any = field(default=None, init=False, repr=False, compare=False)
    _mean: Any = field(default=None, init=False, repr=False, compare=False)
    _std: Any = field(default=None, init=False, repr=False, compare=False)
    _rescale: float = field(default=1 / 255, init=False, repr=False, compare=False)
    _max_batch: int = field(default=0, init=False, repr=False, compare=False)
    _decode_pool: Any = field(default=None, init=False, repr=False, compare=False)
    #: Where `run_shard`'s calling (compute) thread spent its time, seconds, summed over
    #: shards: waiting for decoded input, launching compute, waiting for the writer, and the
    #: tail from the last batch to the renamed file. For benchmarks/depth_throughput.py.
    stats: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: DepthConfig, base_dir: Path | None) -> DepthStage:
        return cls(
            model=cfg.model,
            revision=cfg.revision,
            batch_size=cfg.batch_size,
            dtype=cfg.dtype,
            input_size=cfg.input_size,
            device=cfg.device,
            base_dir=base_dir,
        )

    # --- identity ----------------------------------------------------------------------

    def uses_random_weights(self) -> bool:
        return self.model == TINY_RANDOM

    def _local_path(self) -> Path:
        return local_model_path(self.model, self.base_dir)

    def is_hub_model(self) -> bool:
        return is_hub_model(self.model, self.base_dir)

    def model_dir(self) -> Path:
        """The local folder the model is loaded from (tiny-random is built on first use)."""
        return resolve_model_dir(self.model, self.revision, self.base_dir)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        """The concrete compute dtype (`auto` resolved for the device; it changes the output)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device().startswith("cuda") else "float32"

    def effective_input_size(self) -> int:
        return max(PATCH, round(self.input_size / PATCH) * PATCH)

    def fingerprint(self) -> str:
        """Hash of what changes the output; computed from files, without loading the model.

        Not included: `batch_size` (buckets never pad) and the device index. CPU vs CUDA
        changes the fingerprint through the resolved dtype under `dtype: auto`.
        """
        return fingerprint(self.fingerprint_parts())

    def fingerprint_parts(self) -> dict[str, Any]:
        model = self.model_lineage()
        return {
            "stage": self.name,
            "version": self.version,
            "model": self.model,
            "revision": model["revision"],
            "weights": model["weights"],
            "input_size": self.effective_input_size(),
            "dtype": self.resolved_dtype(),
            "render": RENDER,
        }

    def model_lineage(self) -> dict[str, Any]:
        mdir = self.model_dir()
        files = [
            p for p in mdir.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_CONFIG_FILES
        ]
        if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
            raise ModelNotFoundError(f"stages.depth.model: no weight files in {mdir}")
        # A hub snapshot folder is named by its commit: record that, not a moving tag.
        hub = self.is_hub_model()
        return {
            "spec": self.model,
            "source": "tiny-random" if self.uses_random_weights() else "hub" if hub else "local",
            "path": str(mdir),
            "revision": mdir.name if hub else self.revision,
            "weights": hash_files(files),
        }

    def key_parameters(self) -> dict[str, Any]:
        return {"input_size": self.effective_input_size(), "dtype": self.resolved_dtype()}

    def schema(self) -> pa.Schema:
        return DEPTH_SCHEMA

    # --- model ---------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # A thread pool does not pickle (Dask, Prefect); each worker makes its own in setup().
        return {**self.__dict__, "_decode_pool": None}

    def setup(self) -> None:
        """Load the model and its processor's normalisation once (idempotent)."""
        if self._model is not None:
            return
        import torch
        from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

        from pipeline.pretrained import from_pretrained

        mdir = self.model_dir()
        device = torch.device(self.resolved_device())
        dtype = getattr(torch, self.resolved_dtype())
        model = from_pretrained(DepthAnythingForDepthEstimation, mdir, dtype=dtype)
        self._model = model.to(device).eval()
        processor = from_pretrained(AutoImageProcessor, mdir)
        self._mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device).view(
            1, 3, 1, 1
        )
        self._std = torch.tensor(processor.image_std, dtype=torch.float32, device=device).view(
            1, 3, 1, 1
        )
        self._rescale = float(getattr(processor, "rescale_factor", 1 / 255))
        self._max_batch = self.batch_size
        if self._decode_pool is None:
            import os
            from concurrent.futures import ThreadPoolExecutor

            self._decode_pool = ThreadPoolExecutor(
                max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="depth-decode"
            )

    @property
    def _device(self) -> torch.device:
        return self._model.device

    @property
    def _on_cuda(self) -> bool:
        return self._model.device.type == "cuda"

    def _batch_decode_jpegs(self) -> bool:
        """Decode JPEGs as one batched nvjpeg call (on CUDA; CPU decodes them one by one)."""
        return self._on_cuda

    def _model_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, h, w) relative inverse depth, in the model dtype.

        On CPU one image at a time: CPU matmul kernels pick their blocking by problem size, so a
        batched forward changes the last bits with the batch size (and it is not faster there:
        one image is already ~1800 tokens). This keeps CPU bytes independent of `batch_size`.
        """
        if self._on_cuda or pixel_values.shape[0] == 1:
            return self._model(pixel_values=pixel_values).predicted_depth
        import torch

        return torch.cat([self._model(pixel_values=x[None]).predicted_depth for x in pixel_values])

    # --- the steps (used by both `process` and the overlapped `run_shard`) ---------------

    def _plan(self, widths: list[int], heights: list[int]) -> list[list[int]]:
        """Row indices grouped by resized shape, in chunks of `batch_size`, in order of first row."""
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, (w, h) in enumerate(zip(widths, heights, strict=True)):
            key = resized_shape(h, w, self.input_size) if w and h else (0, 0)
            buckets.setdefault(key, []).append(i)
        chunks = [
            rows[k : k + self.batch_size]
            for rows in buckets.values()
            for k in range(0, len(rows), self.batch_size)
        ]
        return sorted(chunks, key=lambda c: c[0])

    def _decode(
        self, indices: list[int], blobs: list[bytes | None]
    ) -> tuple[dict[int, Any], dict[int, str]]:
        """Decode rows to uint8 (3, H, W) RGB tensors on the device, EXIF orientation applied
        (so the depth's size is the image row's width x height, as `pipeline.images` rules).
        Rows that cannot be decoded go to `errors`."""
        import torch
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        from pipeline.images import UnusableImage

        images: dict[int, Any] = {}
        errors: dict[int, str] = {}
        oriented: set[int] = set()  # decoded by PIL, orientation already applied
        todo = []
        for i in indices:
            if not blobs[i]:
                errors[i] = "depth: image row has no bytes"
            else:
                todo.append(i)
        if self._batch_decode_jpegs():
            jpegs = [i for i in todo if is_jpeg(blobs[i])]
            if jpegs:
                datas = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs]
                try:
                    out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self._device)
                    images.update(zip(jpegs, out, strict=True))
                except RuntimeError:  # one bad file fails the batch: find it, one by one
                    for i, d in zip(jpegs, datas, strict=True):
                        try:
                            images[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=self._device)
                        except RuntimeError:
                            pass  # retried on the CPU below (CMYK, progressive oddities, ...)
            todo = [i for i in todo if i not in images]

        def one(i: int) -> tuple[Any, str | None]:
            """(image, error): CPU decoding of one row, EXIF orientation applied."""
            try:
                data = torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8)
                img = decode_image(data, mode=ImageReadMode.RGB)
                if img.ndim != 3 or img.dtype != torch.uint8:  # animations, 16-bit PNG
                    raise RuntimeError("not 8-bit single frame")
            except RuntimeError:
                try:
                    return _pil_decode(blobs[i]), None
                except UnusableImage as exc:
                    return None, f"depth: undecodable image ({exc})"
            orientation = exif_orientation(blobs[i])
            return (_orient(img, orientation) if orientation != 1 else img), None

        # torchvision's decoders and PIL release the GIL: decode on the pool's threads.
        decoded = self._decode_pool.map(one, todo) if len(todo) > 1 else map(one, todo)
        for i, (img, err) in zip(todo, decoded, strict=True):
            if err is not None:
                errors[i] = err
            else:
                images[i] = img.to(self._device, non_blocking=True)
                oriented.add(i)
        for i in images.keys() - oriented:
            orientation = exif_orientation(blobs[i])
            if orientation != 1:
                images[i] = _orient(images[i], orientation)
        return images, errors

    def _prepare(self, images: dict[int, Any]) -> list[Prepared]:
        """Resize (bicubic, antialiased) and normalise on the device, one batch per input shape."""
        import torch
        import torch.nn.functional as F

        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in images.items():
            by_size.setdefault(tuple(img.shape[-2:]), []).append(i)

        def resize(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
            return F.interpolate(x, size=shape, mode="bicubic", align_corners=False, antialias=True)

        def one(i: int) -> torch.Tensor:
            # One image: its full-size float copy lives only inside this worker call.
            img = images[i]
            return resize(img[None].float(), resized_shape(*img.shape[-2:], self.input_size))[0]

        small: dict[int, torch.Tensor] = {}
        if not self._on_cuda and len(images) > 1:
            # CPU: convert and resize image by image on the decode threads (torch releases the
            # GIL; the resize is per image, so the values are the batched call's).
            small = dict(zip(images, self._decode_pool.map(one, images), strict=True))
        by_shape: dict[tuple[int, int], list[tuple[list[int], Any]]] = {}
        for (h, w), idx in by_size.items():
            shape = resized_shape(h, w, self.input_size)
            if small:
                x = torch.stack([small.pop(i) for i in idx])
            else:
                # One pass from uint8 to float (stack-then-float would copy the images twice).
                x = torch.empty((len(idx), 3, h, w), dtype=torch.float32, device=self._device)
                for k, i in enumerate(idx):
                    x[k].copy_(images[i])
                x = resize(x, shape)
            x = (x * self._rescale - self._mean) / self._std
            by_shape.setdefault(shape, []).append((idx, x.to(self._model.dtype)))
        out = []
        for parts in by_shape.values():
            idx = [i for ids, _ in parts for i in ids]
            pixels = parts[0][1] if len(parts) == 1 else torch.cat([x for _, x in parts])
            out.append(Prepared(idx, [tuple(images[i].shape[-2:]) for i in idx], pixels))
        return out

    def _infer(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
        """Forward with CUDA OOM back-off: halve the batch and retry (and keep the smaller size).

        Returns (depth (B, h, w), None), or (None, reason) when even one image does not fit.
        """
        import torch

        n = pixel_values.shape[0]
        if n > self._max_batch:
            parts = [
                self._infer(pixel_values[k : k + self._max_batch])
                for k in range(0, n, self._max_batch)
            ]
            if any(p is None for p, _ in parts):
                return None, next(r for _, r in parts if r)
            return torch.cat([p for p, _ in parts]), None
        try:
            with torch.inference_mode():
                return self._model_forward(pixel_values), None
        except torch.cuda.OutOfMemoryError:
            pass  # retried below, outside the handler: its traceback pins the activations
        shape = "x".join(str(s) for s in pixel_values.shape[-2:])
        if self._on_cuda:
            torch.cuda.empty_cache()
        if n == 1:
            log.warning("depth: CUDA out of memory on a single %s image; row skipped", shape)
            return None, f"depth: CUDA out of memory at batch size 1 (input {shape})"
        self._max_batch = max(1, n // 2)
        log.warning(
            "depth: CUDA out of memory at batch size %d (input %s); halving the batch to %d "
            "and retrying",
            n,
            shape,
            self._max_batch,
        )
        return self._infer(pixel_values)

    def _postprocess(self, batch: Prepared, depth: torch.Tensor) -> DepthResult:
        """Resize predictions back to each image's size and quantise, on the device; start the copy."""
        import torch
        import torch.nn.functional as F

        d = depth.float()
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, size in enumerate(batch.sizes):
            by_size.setdefault(size, []).append(k)
        u16s, u8s, mms = (
            [None] * len(batch.sizes),
            [None] * len(batch.sizes),
            [None] * len(batch.sizes),
        )
        for size, ks in by_size.items():
            sel = d[ks] if len(ks) < d.shape[0] else d
            full = F.interpolate(sel[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
            u16, u8, mn, mx = quantize_depth(full, inplace=True)
            if len(ks) == len(batch.sizes):  # one size (the usual case): no per-image copies
                u16s, u8s, mm = [u16.flatten()], [u8.flatten()], torch.stack([mn, mx], 1)
                break
            for j, k in enumerate(ks):
                u16s[k], u8s[k], mms[k] = (
                    u16[j].flatten(),
                    u8[j].flatten(),
                    torch.stack([mn[j], mx[j]]),
                )
        else:
            mm = torch.stack(mms)
        u16 = u16s[0] if len(u16s) == 1 else torch.cat(u16s)
        u8 = u8s[0] if len(u8s) == 1 else torch.cat(u8s)
        if not self._on_cuda:
            return DepthResult(batch.indices, batch.sizes, u16, u8, mm)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (u16, u8, mm)]
        for h, t in zip(host, (u16, u8, mm), strict=True):
            h.copy_(t, non_blocking=True)
        # Record on the stream that issued the copies: `record()` alone would use the current
        # stream of the thread's current device, which is not this one under `device: cuda:N`.
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        return DepthResult(batch.indices, batch.sizes, *host, event=event)

    def _compute(self, decoded: Decoded) -> list[DepthResult]:
        results = []
        for batch in decoded.batches:
            depth, reason = self._infer(batch.pixel_values)
            if depth is None:
                results.append(
                    DepthResult(
                        [], [], None, None, None, errors=dict.fromkeys(batch.indices, reason)
                    )
                )
            else:
                results.append(self._postprocess(batch, depth))
        if decoded.errors:
            results.append(DepthResult([], [], None, None, None, errors=dict(decoded.errors)))
        return results

    def _read(self, table: pa.Table | pa.RecordBatch, indices: list[int]) -> Decoded:
        blobs = _image_bytes(table)
        images, errors = self._decode(indices, blobs)
        return Decoded(self._prepare(images), errors)

    def predict(self, images: list[bytes]) -> list[np.ndarray | None]:
        """Float32 relative depth at each image's decoded size, before any quantisation
        (None for an undecodable image). For notebooks and tests; the label rows hold the same
        maps as 16-bit PNGs."""
        import torch.nn.functional as F

        self.setup()
        out: list[np.ndarray | None] = [None] * len(images)
        decoded, _ = self._decode(list(range(len(images))), images)
        for batch in self._prepare(decoded):
            depth, _ = self._infer(batch.pixel_values)
            if depth is None:
                continue
            for k, (i, size) in enumerate(zip(batch.indices, batch.sizes, strict=True)):
                full = F.interpolate(
                    depth[k : k + 1, None].float(), size=size, mode="bilinear", align_corners=True
                )
                out[i] = full[0, 0].cpu().numpy()
        return out

    # --- the contract ----------------------------------------------------------------------

    def process(self, batch: pa.RecordBatch) -> list[dict[str, Any]]:
        """Label a batch of image rows (synchronously); one output row per input row, in order."""
        self.setup()
        ids = batch.column("image_id").to_pylist()
        rows: list[dict[str, Any] | None] = [None] * len(ids)
        widths, heights = batch.column("width").to_pylist(), batch.column("height").to_pylist()
        for chunk in self._plan(widths, heights):
            for res in self._compute(self._read(batch, chunk)):
                for i, row in result_rows(res, ids):
                    rows[i] = row
        return rows  # type: ignore[return-value]

    # `run_shard` (reading, compute and writing overlapped) is `OverlappedShards.run_shard`.


# ----------------------------------------------------------------------------- decoding


def _image_bytes(table: pa.Table | pa.RecordBatch) -> list[bytes | None]:
    col = table.column("image")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.field("bytes").to_pylist()


def _pil_decode(data: bytes) -> Any:
    """What torchvision cannot decode (BMP, TIFF, 16-bit, animations): `pipeline.images`'s
    PIL decoding (EXIF orientation applied there), as a uint8 (3, H, W) tensor."""
    import torch

    from pipeline.images import decode_rgb

    arr = np.asarray(decode_rgb(data))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _orient(img: Any, orientation: int) -> Any:
    """Apply an EXIF orientation to a (C, H, W) tensor, as PIL's `ImageOps.exif_transpose`."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2).contiguous()
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1)).contiguous()
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2).contiguous()
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1)).contiguous()
    return img

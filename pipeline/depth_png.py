"""Depth maps to and from the label shard's PNG bytes (docs/depth.md, "Label shards").

    quantize_depth       float depth maps -> uint16 depth (0..65535), uint8 target, min, max
    depth_target         the same training target from one map, in numpy
    encode_pngs          (16-bit depth PNG, 8-bit target PNG) bytes for one row
    decode_depth_png16   a row's 16-bit PNG + range -> float32 relative depth

Usage:
    from pipeline.depth_png import decode_depth_png16
    from pipeline.shards import image_bytes   # the column is an image cell {bytes, path}
    depth = decode_depth_png16(image_bytes(row["depth_png16"]), row["depth_min"], row["depth_max"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["decode_depth_png16", "depth_target", "encode_pngs", "quantize_depth"]


def quantize_depth(
    depth: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image min-max scaling of float depth maps (N, H, W), on their device.

    Returns (uint16 depth 0..65535 rounded, uint8 target 0..255 truncated, min (N,), max (N,)).
    The target follows the released code: `((d - d.min()) / (d.max() - d.min()) * 255).astype(uint8)`.
    A flat map (max == min) gives zeros. `inplace=True` uses a float32 `depth` as scratch space
    (it is overwritten): the same values with two full-size temporaries fewer.
    """
    import torch

    d = depth.float()
    mn = d.amin(dim=(1, 2), keepdim=True)
    mx = d.amax(dim=(1, 2), keepdim=True)
    rng = mx - mn
    den = torch.where(rng > 0, rng, torch.ones_like(rng))
    # The same operations in the same order as (d - mn) / den, round(norm * 65535),
    # floor(norm * 255); only where the results are stored changes.
    norm = d.sub_(mn) if inplace and d.dtype == depth.dtype else d - mn
    norm.div_(den)
    u16 = (norm * 65535.0).round_().to(torch.int32).to(torch.uint16)
    u8 = norm.mul_(255.0).floor_().to(torch.uint8)
    return u16, u8, mn.flatten(), mx.flatten()


def depth_target(depth: np.ndarray) -> np.ndarray:
    """The training target from one float depth map (H, W), in numpy: what `quantize_depth` does."""
    d = depth.astype(np.float32)
    rng = d.max() - d.min()
    if rng <= 0:
        return np.zeros(d.shape, np.uint8)
    return ((d - d.min()) / rng * 255.0).astype(np.uint8)


def decode_depth_png16(png: bytes | dict, depth_min: float, depth_max: float) -> np.ndarray:
    """Undo the 16-bit scaling: float32 relative depth (H, W) from a label row (`png`: the
    PNG bytes or the shard's `{bytes, path}` image cell)."""
    import cv2

    from pipeline.shards import image_bytes

    png = image_bytes(png)
    q = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if q is None or q.dtype != np.uint16:
        raise ValueError("depth_png16: not a 16-bit grayscale PNG")
    return (q.astype(np.float32) / 65535.0) * np.float32(depth_max - depth_min) + np.float32(
        depth_min
    )


def encode_pngs(u16: np.ndarray, u8: np.ndarray) -> tuple[bytes, bytes]:
    """(16-bit depth PNG, 8-bit target PNG). cv2 releases the GIL, so a thread pool scales.

    The 16-bit map is stored uncompressed: its low byte is noise to zlib (level 1 saves ~15% and
    costs ~15x the time); the 8-bit target compresses ~2.5x with the `up` filter."""
    import cv2

    ok16, b16 = cv2.imencode(
        ".png",
        u16,
        [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE],
    )
    ok8, b8 = cv2.imencode(
        ".png",
        u8,
        [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP],
    )
    if not (ok16 and ok8):
        raise RuntimeError("PNG encoding failed")
    return b16.tobytes(), b8.tobytes()

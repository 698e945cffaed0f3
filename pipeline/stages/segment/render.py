"""Training targets from SAM masks: the edge map (the released recipe) and the filled colour map.

    render_edges    union of each mask's `cv2.Canny` boundary, white on black (HxW uint8)
    render_colors   one deterministic colour per mask, largest drawn first (HxWx3 uint8)

Used by the segment stage (pipeline/stages/segment/stage.py); pure functions of bool masks
[N, H, W] on any device.

Usage:
    from pipeline.stages.segment.render import render_edges
    target = render_edges(masks)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "CANNY_HIGH",
    "CANNY_LOW",
    "draw_order",
    "mask_colors",
    "render_colors",
    "render_edges",
    "resize_masks",
    "resize_nearest",
    "target_png",
]

#: Canny thresholds for the edge render. Masks are 0/255 images, so every boundary gradient is far
#: above both; the values only have to be below it.
CANNY_LOW, CANNY_HIGH = 100, 200


def mask_colors(n: int) -> np.ndarray:
    """Deterministic RGB colours [n+1, 3] uint8: row 0 is black (unlabelled), row k the k-th mask
    drawn. Golden-ratio hue steps keep neighbours in draw order far apart in hue."""
    import colorsys

    out = np.zeros((n + 1, 3), dtype=np.uint8)
    for k in range(1, n + 1):
        hue = (k * 0.618033988749895) % 1.0
        sat = 0.55 + 0.35 * ((k * 0.381966) % 1.0)
        out[k] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, 0.95)]
    return out


def draw_order(masks: torch.Tensor) -> torch.Tensor:
    """Indices of masks, largest area first (stable: ties keep their order)."""
    import torch

    areas = masks.sum(dim=(1, 2), dtype=torch.int64)
    return torch.sort(areas, descending=True, stable=True).indices


def render_colors(masks: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """Filled colour map HxWx3 uint8: masks painted largest first, so each pixel takes the colour
    of the last (smallest) mask covering it; unlabelled pixels stay black."""
    import torch

    n, h, w = masks.shape
    label = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
    order = draw_order(masks)
    for s in range(0, n, chunk):
        idx = order[s : s + chunk]
        rank = torch.arange(s + 1, s + 1 + len(idx), dtype=torch.int32, device=masks.device)
        label = torch.maximum(label, (masks[idx].to(torch.int32) * rank[:, None, None]).amax(0))
    return mask_colors(n)[label.cpu().numpy()]


def render_edges(
    masks: torch.Tensor, pad: int = 4, chunk: int = 64, pack: bool | None = None
) -> np.ndarray:
    """Union of each mask's boundary, HxW uint8, 255 on 0: `cv2.Canny` on each mask x 255.

    Canny runs on the mask's box plus `pad` pixels (clipped to the image), which gives the same
    pixels as running it on the whole image: outside the box the mask is 0, and Canny only looks
    at a 3x3 neighbourhood (Sobel, non-maximum suppression); every boundary pixel is a strong edge.
    Masks on a GPU come to the host packed 8 pixels to a byte, `chunk` masks at a time, and only
    each box's rows and bytes are unpacked; masks on the CPU are read in place (`pack`
    overrides the choice).
    """
    import cv2

    n, h, w = masks.shape
    out = np.zeros((h, w), dtype=np.uint8)
    if n == 0:
        return out
    from segment_anything.utils.amg import batched_mask_to_box

    boxes = batched_mask_to_box(masks).cpu().numpy()
    for s in range(0, n, chunk):
        part = masks[s : s + chunk]
        if not (part.device.type != "cpu" if pack is None else pack):
            host = part.contiguous().numpy().view(np.uint8)
            packed = None
        else:
            packed = _pack_bits(part).cpu().numpy()
        for k, (x0, y0, x1, y1) in enumerate(boxes[s : s + chunk]):
            ya, yb = max(0, y0 - pad), min(h, y1 + 1 + pad)
            xa, xb = max(0, x0 - pad), min(w, x1 + 1 + pad)
            if packed is None:
                m = host[k, ya:yb, xa:xb]
            else:
                bits = np.unpackbits(packed[k, ya:yb, xa // 8 : (xb + 7) // 8], axis=-1)
                m = bits[:, xa % 8 : xa % 8 + (xb - xa)]
            if not m.any():
                continue  # empty mask: no boundary
            edges = cv2.Canny(np.ascontiguousarray(m) * 255, CANNY_LOW, CANNY_HIGH)
            np.maximum(out[ya:yb, xa:xb], edges, out=out[ya:yb, xa:xb])
        del part
    return out


def _pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """bool [N, H, W] -> uint8 [N, H, ceil(W/8)], big-endian bits per byte (np.unpackbits')."""
    import torch
    import torch.nn.functional as F

    n, h, w = masks.shape
    m = F.pad(masks.to(torch.uint8), (0, (-w) % 8)).view(n, h, -1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=masks.device)
    return (m * weights).sum(-1, dtype=torch.uint8)


def resize_masks(masks: torch.Tensor, size: tuple[int, int], chunk: int = 32) -> torch.Tensor:
    """`masks` (N, h, w) bool resized to `size` with nearest neighbour, `chunk` masks at a time."""
    import torch
    import torch.nn.functional as F

    parts = [
        F.interpolate(masks[s : s + chunk, None].to(torch.uint8), size=size, mode="nearest-exact")[
            :, 0
        ]
        > 0
        for s in range(0, masks.shape[0], chunk)
    ]
    return (
        torch.cat(parts)
        if parts
        else torch.zeros((0, *size), dtype=torch.bool, device=masks.device)
    )


def resize_nearest(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def target_png(img: np.ndarray) -> bytes:
    import cv2

    bgr = img if img.ndim == 2 else img[..., ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()

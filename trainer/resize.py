"""Images to the square: decode, then fit and pad or stretch to `size`, with the chosen resampling.

`square_image` is what `TaskDataset` (trainer/data.py) and the evaluation
probes run on every image and target; `RELEASED_RESIZE` / `RELEASED_RESAMPLE` are the released
recipe's defaults for the `trainer.*_resize` and `trainer.*resample` options.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.images import decode_rgb

#: Released recipe: understanding padded, generation stretched; images and depth bicubic,
#: segmentation edges nearest.
RELEASED_RESIZE = {"understanding": "pad", "generation": "stretch"}
RELEASED_RESAMPLE = {"image": "bicubic", "depth": "bicubic", "segmentation": "nearest"}
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def square_image(
    data: bytes,
    size: int,
    fill: tuple[int, int, int],
    mode: str = "pad",
    resample: str = "bicubic",
) -> np.ndarray:
    """Decode and make a `size` square: uint8 (3, size, size).

    `pad`: fit the long side to `size`, pad with `fill` (centred); `stretch`: resize both sides
    to `size` (aspect ratio not kept, no padding). `resample`: nearest, bilinear or bicubic.
    JPEGs decode at reduced scale when much larger than `size` (`draft`, bicubic and bilinear
    only: nearest must keep exact values).
    """
    img = decode_rgb(data, draft=(size, size) if resample != "nearest" else None)
    how = _RESAMPLE[resample]
    w, h = img.size
    if mode == "stretch":
        if (w, h) != (size, size):
            img = img.resize((size, size), how)
        return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
    if mode != "pad":
        raise ValueError(f"resize mode: expected pad or stretch, got {mode!r}")
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), how)
    if (nw, nh) != (size, size):
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))

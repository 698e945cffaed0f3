"""Emu3's image preprocessing as a saved folder holds it: `preprocessor_config.json`.

`write_preprocessor` writes the `Emu3ImageProcessor` config (aspect kept, area between
`min_pixels` and `max_pixels`, sides multiples of 8, normalised by `VQ_MEAN` / `VQ_STD`) that
`AutoImageProcessor.from_pretrained` opens: for the adapter's checkpoints (adapter.py) and the
tiny-random model (tiny.py).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["VQ_MEAN", "VQ_STD", "write_preprocessor"]

#: Emu3's VQ (SBER-MoVQGAN style) works on [-1, 1] pixels.
VQ_MEAN = VQ_STD = (0.5, 0.5, 0.5)


def write_preprocessor(path: Path, mean, std, min_pixels: int, max_pixels: int) -> None:
    """`path/preprocessor_config.json` for an Emu3ImageProcessor with this normalisation and
    pixel range."""
    cfg = {
        "image_processor_type": "Emu3ImageProcessor",
        "image_mean": list(mean),
        "image_std": list(std),
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
        "spatial_factor": 8,
        "do_resize": True,
        "do_pad": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "resample": 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))

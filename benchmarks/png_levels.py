"""PNG compression level and filter sweep for the depth stage's two PNGs (docs/depth.md).

Smooth synthetic 640x480 depth maps (a blurred random field over a slope, a few nearer discs),
quantised as the stage does (16-bit rounded, 8-bit target truncated); OpenCV encodes each with
every level/filter pair; prints ms per image and KiB per image. One thread, seeded.

    python benchmarks/png_levels.py
"""

from __future__ import annotations

import time

import cv2
import numpy as np

FILTERS = {
    "none": cv2.IMWRITE_PNG_FILTER_NONE,
    "up": cv2.IMWRITE_PNG_FILTER_UP,
    "sub": cv2.IMWRITE_PNG_FILTER_SUB,
    "paeth": cv2.IMWRITE_PNG_FILTER_PAETH,
}


def depth_maps(n: int = 8, h: int = 480, w: int = 640) -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint16 depth, uint8 target) pairs, seeded."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        field = rng.standard_normal((h // 16, w // 16)).astype(np.float32)
        d = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC) * 0.3
        d = d + yy / h * 2 + (xx / w) * 0.5 * (i % 3)
        for _ in range(5):
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(20, 120)
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            d[disc] += rng.uniform(0.5, 2)
        d = cv2.GaussianBlur(d.astype(np.float32), (0, 0), 1.0)
        norm = (d - d.min()) / (d.max() - d.min())
        out.append(
            (np.round(norm * 65535).astype(np.uint16), np.floor(norm * 255).astype(np.uint8))
        )
    return out


def sweep(maps: list[tuple[np.ndarray, np.ndarray]], repeats: int = 3) -> list[tuple]:
    rows = []
    for kind, idx in (("16-bit", 0), ("8-bit", 1)):
        for name, flt in FILTERS.items():
            for level in (0, 1, 2, 3, 6):
                if level == 0 and name != "none":
                    continue  # stored: the filter only costs time
                params = [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_FILTER, flt]
                size, t0 = 0, time.perf_counter()
                for _ in range(repeats):
                    for m in maps:
                        ok, buf = cv2.imencode(".png", m[idx], params)
                        assert ok
                        size += len(buf)
                n = repeats * len(maps)
                rows.append(
                    (kind, level, name, (time.perf_counter() - t0) / n * 1e3, size / n / 1024)
                )
    return rows


def main() -> None:
    cv2.setNumThreads(1)
    for kind, level, name, ms, kib in sweep(depth_maps()):
        print(f"{kind:>6} level {level} filter {name:<5}: {ms:7.2f} ms/img {kib:7.1f} KiB/img")


if __name__ == "__main__":
    main()

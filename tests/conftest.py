"""Shared fixtures: tiny images and image shards built in tmp_path, seeded, no downloads."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.shards import IMAGE_SCHEMA, Layout, write_parquet_atomic


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """tiny-random models and the file-hash memo go to one per-session temp folder."""
    cache = tmp_path_factory.getbasetemp() / "unimrg-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("UNIMRG_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def synthetic_image(seed: int, size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """A seeded image with smooth structure and a few flat shapes (so SAM and depth see edges)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [(xx * (1 + seed % 3) + yy) % 256, (yy * 2 + seed * 17) % 256, (xx + yy * 3) % 256], -1
    ).astype(np.float32)
    for _ in range(3):
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(max(2, min(w, h) // 8), max(3, min(w, h) // 3))
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        base[mask] = rng.integers(0, 256, 3)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    return img.convert(mode) if mode != "RGB" else img


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_image_shard(layout: Layout, n: int, images: list[Image.Image], fmt: str = "JPEG") -> Path:
    """An image shard following the data contract, without going through ingest."""
    import hashlib

    rows = []
    for i, img in enumerate(images):
        data = encode(img, fmt)
        rows.append(
            {
                "image_id": hashlib.sha256(data).hexdigest(),
                "image": {"bytes": data, "path": f"img{n}_{i}.{fmt.lower()}"},
                "width": img.width,
                "height": img.height,
                "source": "test",
            }
        )
    path = layout.image_shard(n)
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), path)
    return path


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path / "out")


@pytest.fixture
def image_shards(layout) -> Layout:
    """Two image shards of mixed sizes (3 + 2 images)."""
    write_image_shard(
        layout, 0, [synthetic_image(i, s) for i, s in enumerate([(96, 64), (64, 96), (80, 80)])]
    )
    write_image_shard(layout, 1, [synthetic_image(10 + i, (72, 56)) for i in range(2)])
    return layout


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return os.environ


def fake_hub_cache(monkeypatch, root: Path, repo_id: str, files_from: Path) -> Path:
    """A Hugging Face cache under `root` holding `repo_id` at a fixed commit (refs/main points at
    it), its files copied from `files_from`. Returns the snapshot folder. Offline, as everywhere
    here: `snapshot_download(local_files_only=True)` finds it like a real download."""
    import shutil

    import huggingface_hub.constants as hf_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    return snapshot

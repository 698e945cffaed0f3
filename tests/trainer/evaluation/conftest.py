"""Eval fixtures: a tiny ingested dataset whose label shards carry what the probes read (16-bit
depth with its range, COCO RLE masks, rendered targets), a tiny TSV benchmark with base64
images, and checkpoints made by saving tiny-random Janus with changed weights."""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.shards import Layout, image_field, label_table, write_parquet_atomic
from tests.trainer.conftest import LABEL_FPS

DEPTH_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("error", pa.string()),
        image_field("depth_png16"),
        ("depth_min", pa.float32()),
        ("depth_max", pa.float32()),
        image_field("target"),
    ]
)
MASK = pa.struct([("counts", pa.string()), ("size", pa.list_(pa.int32())), ("area", pa.int64())])
SEG_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("error", pa.string()),
        ("masks", pa.list_(MASK)),
        image_field("target"),
    ]
)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "counts": r["counts"].decode(),
        "size": [int(x) for x in r["size"]],
        "area": int(mask.sum()),
    }


def write_probe_labels(layout: Layout) -> None:
    """Depth rises left to right (right is near); two boxes: one left (far), one right (near)."""
    import cv2

    for shard in layout.image_shards():
        t = pq.read_table(shard, columns=["image_id", "width", "height"])
        depth_rows, seg_rows = [], []
        for iid, w, h in zip(*(t.column(c).to_pylist() for c in ("image_id", "width", "height"))):
            depth = np.tile(np.linspace(1.0, 5.0, w, dtype=np.float32), (h, 1))
            u16 = np.round((depth - 1.0) / 4.0 * 65535).astype(np.uint16)
            ok, png16 = cv2.imencode(".png", u16)
            target = ((depth - 1.0) / 4.0 * 255).astype(np.uint8)
            depth_rows.append(
                {
                    "image_id": iid,
                    "error": None,
                    "depth_png16": png16.tobytes(),
                    "depth_min": 1.0,
                    "depth_max": 5.0,
                    "target": _png(target),
                }
            )
            left = np.zeros((h, w), bool)
            left[h // 4 : 3 * h // 4, 2 : w // 4] = True
            right = np.zeros((h, w), bool)
            right[h // 4 : 3 * h // 4, 3 * w // 4 : w - 2] = True
            edges = np.zeros((h, w), np.uint8)
            for m in (left, right):
                edges |= cv2.Canny(m.astype(np.uint8) * 255, 100, 200)
            seg_rows.append(
                {
                    "image_id": iid,
                    "error": None,
                    "masks": [_rle(left), _rle(right)],
                    "target": _png(edges),
                }
            )
        write_parquet_atomic(
            label_table(depth_rows, DEPTH_SCHEMA),  # image cells, as the stages write
            layout.label_dir("depth", LABEL_FPS["depth"]) / shard.name,
        )
        write_parquet_atomic(
            label_table(seg_rows, SEG_SCHEMA),
            layout.label_dir("segment", LABEL_FPS["segment"]) / shard.name,
        )


def b64_image(seed: int, size=(24, 16)) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_mcq_tsv(path, n: int = 6) -> None:
    header = ["index", "image", "question", "A", "B", "C", "answer", "category"]
    rows = [
        [
            str(i),
            b64_image(i) if i == 0 or i % 2 else "0",
            f"Question {i}?",
            "cat",
            "dog",
            "red",
            "ABC"[i % 3],
            "animals" if i < 3 else "colours",
        ]
        for i in range(n)
    ]
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")


def write_pope_tsv(path, n: int = 4) -> None:
    header = ["index", "image", "question", "answer", "category"]
    rows = [
        [str(i), b64_image(10 + i), f"Is there a cat {i}?", "yes" if i % 2 else "no", "random"]
        for i in range(n)
    ]
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")


def save_checkpoint(manifest, step: int, seed: int):
    """A fake post-trained checkpoint: tiny-random Janus with its weights nudged by `seed`."""
    from trainer.adapters.janus.adapter import JanusAdapter
    from trainer.checkpoints import step_dir
    from trainer.run_folder import train_output_dir

    a = JanusAdapter.load("tiny-random")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = step_dir(train_output_dir(manifest), step)
    a.save(path)
    return path


@pytest.fixture
def eval_manifest(train_manifest, tmp_path):
    """Factory: eval section overrides -> manifest with benchmarks, labels for the probes."""
    from pipeline.manifest import parse_manifest

    def make(**eval_cfg):
        bench = tmp_path / "bench"
        bench.mkdir(exist_ok=True)
        write_mcq_tsv(bench / "mini_mcq.tsv")
        write_pope_tsv(bench / "mini_pope.tsv")
        cfg = {
            "benchmarks": [
                {"name": "mini-mcq", "path": "bench/mini_mcq.tsv", "kind": "mcq"},
                {"name": "mini-pope", "path": "bench/mini_pope.tsv", "kind": "pope"},
            ],
            "held_out_images": 2,
            "batch_size": 4,
            "max_new_tokens": 3,
            **eval_cfg,
        }
        m = train_manifest(n_images=6, extra={"eval": cfg})
        write_probe_labels(Layout(m.out))
        data = m.model_dump(mode="json", exclude={"base_dir"})
        return parse_manifest(data, base_dir=m.base_dir)

    return make

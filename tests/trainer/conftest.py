"""Trainer fixtures: a tiny ingested dataset with depth and segment label shards, no models.

`train_manifest(**trainer_overrides)` writes four synthetic images to a folder, LLaVA
conversations about them (plus one whose image is missing and one whose file is not an image),
runs the real ingest, writes label shards under fixed fingerprints, and points the data layer at
them (the label stages themselves are other modules' business).

The adapter tests share `CONVS`, `random_images`, `understanding_batch` and `generation_batch`:
the batches `trainer.data.collate` makes, built from an adapter's own text encoder.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.manifest import parse_manifest
from pipeline.shards import Layout, write_parquet_atomic
from tests.conftest import synthetic_image
from trainer.data import collate

LABEL_FPS = {"depth": "fp-depth-test", "segment": "fp-segment-test"}
LABEL_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("error", pa.string()), ("target", pa.binary())]
)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_labels(layout: Layout, n_bad: int = 0) -> None:
    """Row-aligned depth (grayscale) and segment (edges) targets for every image shard."""
    for shard in layout.image_shards():
        t = pq.read_table(shard, columns=["image_id", "image"])
        depth_rows, seg_rows = [], []
        for i, (iid, img) in enumerate(zip(t.column(0).to_pylist(), t.column(1).to_pylist())):
            im = Image.open(io.BytesIO(img["bytes"])).convert("L")
            a = np.asarray(im)
            bad = i < n_bad
            depth_rows.append(
                {
                    "image_id": iid,
                    "error": "boom" if bad else None,
                    "target": None if bad else _png(255 - a),
                }
            )
            edges = (np.abs(np.diff(a.astype(int), axis=1, prepend=0)) > 20).astype(np.uint8) * 255
            seg_rows.append({"image_id": iid, "error": None, "target": _png(edges)})
        n = shard.name
        write_parquet_atomic(
            pa.Table.from_pylist(depth_rows, schema=LABEL_SCHEMA),
            layout.label_dir("depth", LABEL_FPS["depth"]) / n,
        )
        write_parquet_atomic(
            pa.Table.from_pylist(seg_rows, schema=LABEL_SCHEMA),
            layout.label_dir("segment", LABEL_FPS["segment"]) / n,
        )


CONVS = [
    [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}],
    [
        {"from": "human", "value": "Look <image> here"},
        {"from": "gpt", "value": "Stripes, many."},
        {"from": "human", "value": "And?"},
        {"from": "gpt", "value": "Nothing."},
    ],
]


def random_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """(n, 3, size, size) uint8 noise, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def understanding_batch(adapter) -> dict:
    """A collated batch of the two CONVS, each with its own random image."""
    enc = adapter.text_encoder()
    samples = []
    for i, conv in enumerate(CONVS):
        ids, labels = enc.understanding(conv)
        samples.append(
            {
                "task": "understanding",
                "batch": 0,
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "image": random_images(1, i, adapter.image_size)[0],
            }
        )
    return collate(samples, enc.pad_id)


def generation_batch(adapter, prompts=("Generate the depth map of this image.", "")) -> dict:
    """A collated depth batch, one row per prompt (the default two differ in length)."""
    enc = adapter.text_encoder()
    samples = [
        {
            "task": "depth",
            "batch": 0,
            "input_ids": torch.tensor(enc.generation(p)),
            "image": random_images(1, i, adapter.image_size)[0],
            "target": random_images(1, 10 + i, adapter.image_size)[0],
        }
        for i, p in enumerate(prompts)
    ]
    return collate(samples, enc.pad_id)


QUESTIONS = ["What is this?", "Describe the picture.", "What colour dominates?", "Any shapes?"]
ANSWERS = ["Stripes and a disc.", "A gradient.", "Mostly blue.", "Two circles."]


@pytest.fixture
def train_manifest(tmp_path, monkeypatch):
    """Factory: (trainer overrides, n_images) -> Manifest over an ingested tiny dataset."""
    from pipeline.ingest import ingest

    monkeypatch.setattr("trainer.data.resolve_label_fingerprints", lambda m: dict(LABEL_FPS))

    def make(n_images: int = 4, extra: dict | None = None, **trainer):
        root = tmp_path / "data"
        imgs = root / "images"
        imgs.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n_images):
            synthetic_image(i, (48 + 8 * (i % 3), 40)).save(imgs / f"img{i}.png")
            rows.append(
                {
                    "id": str(i),
                    "image": f"img{i}.png",
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{QUESTIONS[i % 4]}"},
                        {"from": "gpt", "value": ANSWERS[i % 4]},
                    ],
                }
            )
        (imgs / "broken.jpg").write_bytes(b"not an image at all")
        rows.append(
            {"id": "m", "image": "not_there.png", "conversations": rows[0]["conversations"]}
        )
        rows.append({"id": "q", "image": "broken.jpg", "conversations": rows[0]["conversations"]})
        (root / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        cfg = {
            "adapter": "janus",
            "model": "tiny-random",
            "batch_size": 4,
            "max_steps": 4,
            "save_every": 2,
            "eval_every": 2,
            "log_every": 1,
            "lr": 2e-3,
            "warmup_ratio": 0.0,
            **trainer,
        }
        m = parse_manifest(
            {
                "output_dir": "out",
                "shard_size": 3,
                "sources": [],
                "understanding": [{"path": "data/conv.jsonl", "image_root": "data/images"}],
                # Configured so that depth and segmentation may train; their label
                # fingerprints are patched to LABEL_FPS (no stage model is built).
                "stages": {
                    "depth": {"model": "tiny-random"},
                    "segment": {"model_type": "tiny-random"},
                },
                "trainer": cfg,
                **(extra or {}),
            },
            base_dir=tmp_path,
        )
        if not Layout(m.out).image_shards():
            ingest(m, progress=False)
            write_labels(Layout(m.out))
        return m

    return make


def manifest_file(m, path, **trainer):
    """`m` (made by `train_manifest`) as a manifest file at `path` for the CLI, with an empty
    eval section and these trainer overrides; the label stages are configured as in `m`."""
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": "out",
                "shard_size": 3,
                "sources": [],
                "understanding": [{"path": "data/conv.jsonl", "image_root": "data/images"}],
                "stages": {
                    "depth": {"model": "tiny-random"},
                    "segment": {"model_type": "tiny-random"},
                },
                "trainer": {**m.trainer.model_dump(mode="json"), "num_workers": 0, **trainer},
                "eval": {"benchmarks": [], "held_out_images": 0},
            }
        )
    )
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription
    stalls (seconds per step instead of milliseconds when other processes are busy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

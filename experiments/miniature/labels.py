"""The miniature's data in the project's contract: scenes, conversations, captions, label shards,
and the held-out test set.

Under `root`:

    scenes/scene_NNNNN.png    training scenes (the understanding and captions image root)
    conversations.jsonl       LLaVA-style: a depth-order question, then generic ones, per scene
    captions.jsonl            {"image", "caption"} per scene (the text_to_image task's data)
    test/test_NNNNN.png       held-out scenes (another random stream)
    test/test.tsv             their questions in the evaluation's `mcq` layout (options A-E are
                              the words a category can answer; `category`, `objects` columns)
    test/targets.npz          their images, depth and edge targets and captions (the gates)
    out/images/...            ingested by `pipeline.ingest`
    out/labels/depth/miniature-exact-depth-v2/, out/labels/segment/miniature-exact-edges-v2/
                              row-aligned label shards with the renderer's exact targets,
                              rendered as the real stages render them

Depth is relative inverse depth (what Depth Anything predicts; near is bright), min-max scaled
per image by `pipeline.depth_png.quantize_depth`; segments are COCO RLE masks plus the union of
their Canny boundaries (`pipeline.stages.segment.render.render_edges`), in the stage's own schema.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from experiments.miniature.scenes import (
    Scene,
    caption,
    conversation,
    render_scene,
    scene_questions,
)

__all__ = ["LABEL_FP", "TSV_HEADER", "rendered_targets", "write_dataset", "write_labels"]

LABEL_FP = {"depth": "miniature-exact-depth-v2", "segment": "miniature-exact-edges-v2"}
LETTERS = "ABCDE"
TSV_HEADER = ["index", "image_path", "question", *LETTERS, "answer", "category", "objects"]


def _write(path: Path, data: bytes) -> None:
    """Write unless identical (a rerun leaves files and their mtimes alone, so ingest skips
    them)."""
    if not (path.exists() and path.read_bytes() == data):
        path.write_bytes(data)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rendered_targets(sc: Scene) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """(16-bit depth map, 8-bit depth target, range min, range max, edge target) of a scene, as
    the real stages render them: Depth Anything's relative inverse depth (1/z, near bright)
    min-max quantised by `quantize_depth`, and the union of the masks' Canny boundaries."""
    import torch

    from pipeline.depth_png import quantize_depth
    from pipeline.stages.segment.render import render_edges

    u16, u8, mn, mx = quantize_depth(torch.from_numpy(1.0 / sc.depth)[None])
    edges = render_edges(torch.from_numpy(np.stack(sc.masks)))
    return u16[0].numpy(), u8[0].numpy(), float(mn[0]), float(mx[0]), edges


def _mcq_row(q: dict[str, Any]) -> dict[str, str]:
    row = {"question": q["question"], "category": q["category"]}
    row.update({LETTERS[i]: opt for i, opt in enumerate(q["options"])})
    row["answer"] = LETTERS[q["options"].index(q["answer"])]
    return row


def write_dataset(root: Path, cfg) -> dict[str, Any]:
    """Scenes, conversations, captions and the held-out set under `root` (cfg: the protocol's
    Config). Returns {"scenes": image_id -> Scene, "test_scenes": [Scene], "conversations": n,
    "test_questions": n}."""
    rng, test_rng = (np.random.default_rng([cfg.data_seed, k]) for k in range(2))
    qrng, test_qrng = random.Random(cfg.data_seed), random.Random(cfg.data_seed + 1)
    scene_dir, test_dir = root / "scenes", root / "test"
    scene_dir.mkdir(parents=True, exist_ok=True)
    test_dir.mkdir(parents=True, exist_ok=True)
    by_id: dict[str, Scene] = {}
    convs, caps = [], []
    kw = {"size": cfg.image_size, "float_prob": cfg.float_prob, "haze": cfg.haze}
    for i in range(cfg.train_scenes):
        sc = render_scene(rng, **kw)
        data = _png(sc.image)
        name = f"scene_{i:05d}.png"
        _write(scene_dir / name, data)
        by_id[hashlib.sha256(data).hexdigest()] = sc
        convs.append(conversation(name, scene_questions(sc, qrng, cfg.generic_questions)))
        caps.append({"image": name, "caption": caption(sc)})
    _write(root / "conversations.jsonl", "".join(json.dumps(c) + "\n" for c in convs).encode())
    _write(root / "captions.jsonl", "".join(json.dumps(c) + "\n" for c in caps).encode())
    lines = ["\t".join(TSV_HEADER)]
    images, depths, edges, test_caps, test_scenes = [], [], [], [], []
    n = 0
    for i in range(cfg.test_scenes):
        sc = render_scene(test_rng, **kw)
        test_scenes.append(sc)
        name = f"test_{i:05d}.png"
        _write(test_dir / name, _png(sc.image))
        _, u8, _, _, e = rendered_targets(sc)
        images.append(sc.image)
        depths.append(u8)
        edges.append(e)
        test_caps.append(caption(sc))
        for q in scene_questions(sc, test_qrng, cfg.generic_questions):
            row = {"index": str(n), "image_path": name, "objects": str(len(sc.objects))}
            row.update(_mcq_row(q))
            lines.append("\t".join(row.get(h, "") for h in TSV_HEADER))
            n += 1
    _write(test_dir / "test.tsv", ("\n".join(lines) + "\n").encode())
    buf = io.BytesIO()
    np.savez(
        buf,
        image=np.stack(images),
        depth=np.stack(depths),
        edges=np.stack(edges),
        caption=np.array(test_caps),
    )
    _write(test_dir / "targets.npz", buf.getvalue())
    return {
        "scenes": by_id,
        "test_scenes": test_scenes,
        "conversations": len(convs),
        "test_questions": n,
    }


def write_labels(out: Path, scenes: dict[str, Scene]) -> dict[str, str]:
    """Depth and segment label shards, row-aligned with the ingested image shards. Returns the
    label fingerprints (stage -> fp)."""
    import cv2
    import pyarrow.parquet as pq
    from pycocotools import mask as mask_utils

    from pipeline.shards import Layout, label_table, shard_number, write_parquet_atomic
    from pipeline.stages.depth.stage import DEPTH_SCHEMA
    from pipeline.stages.segment.stage import segment_schema

    layout = Layout(out)
    seg_schema = segment_schema("edges", random_weights=False)
    for shard in layout.image_shards():
        number = shard_number(shard)
        targets = (
            layout.label_shard("depth", LABEL_FP["depth"], number),
            layout.label_shard("segment", LABEL_FP["segment"], number),
        )
        if all(t.exists() for t in targets):
            continue  # image shards never change: their labels are written once
        ids = pq.read_table(shard, columns=["image_id"]).column(0).to_pylist()
        depth_rows, seg_rows = [], []
        for iid in ids:
            sc = scenes[iid]
            h, w = sc.depth.shape
            u16, u8, mn, mx, edge_map = rendered_targets(sc)
            ok16, b16 = cv2.imencode(".png", u16)
            ok8, b8 = cv2.imencode(".png", u8)
            ok, png_edges = cv2.imencode(".png", edge_map)
            assert ok16 and ok8 and ok
            depth_rows.append(
                {
                    "image_id": iid,
                    "error": None,
                    "depth_png16": b16.tobytes(),
                    "depth_min": mn,
                    "depth_max": mx,
                    "target": b8.tobytes(),
                    "width": w,
                    "height": h,
                }
            )
            rles = []
            for m in sc.masks:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                rles.append(
                    {
                        "counts": rle["counts"].decode(),
                        "size": [int(x) for x in rle["size"]],
                        "predicted_iou": 1.0,
                        "stability_score": 1.0,
                        "bbox": [float(x) for x in mask_utils.toBbox(rle)],
                        "area": int(m.sum()),
                    }
                )
            seg_rows.append(
                {
                    "image_id": iid,
                    "error": None,
                    "masks": rles,
                    "target": png_edges.tobytes(),
                    "width": w,
                    "height": h,
                    "n_masks": len(rles),
                }
            )
        write_parquet_atomic(label_table(depth_rows, DEPTH_SCHEMA), targets[0])
        write_parquet_atomic(label_table(seg_rows, seg_schema), targets[1])
    return dict(LABEL_FP)


def vq_training_targets(scenes: list[Scene]) -> np.ndarray:
    """uint8 (3n, 3, S, S): each scene's image, depth target and edge target (the tokenizer's
    training data), rendered as write_labels renders them."""
    out = []
    for sc in scenes:
        _, u8, _, _, edges = rendered_targets(sc)
        for arr in (sc.image, np.repeat(u8[..., None], 3, 2), np.repeat(edges[..., None], 3, 2)):
            out.append(np.ascontiguousarray(arr).transpose(2, 0, 1))
    return np.stack(out)

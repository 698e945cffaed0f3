"""The miniature UniMRG experiment: does generating depth, segmentation and the image itself
improve spatial understanding, at a size this CPU trains in minutes?

    python -m experiments.miniature [--seeds 0 1 2] [--out DIR] [--quick] [--arms A B ...]

What it does, all through the project's own code paths:

1. Renders seeded procedural scenes (`render_scene`): a few coloured shapes standing on a ground
   plane at known depths. Nearer shapes occlude farther ones; apparent size and height follow
   perspective, with a per-object size jitter wide enough that size alone does not answer
   "which is closer". The renderer gives the exact depth map and the instance masks.
2. Writes them in the project's data contract: the scenes are PNG files ingested by
   `pipeline.ingest` (as the understanding source's image root), and depth and segment label
   shards are written row-aligned with the image shards, with targets rendered as the real
   stages render them: depth as relative inverse depth min-max scaled per image
   (`pipeline.depth_png.quantize_depth`, near bright, plus the 16-bit map and its range), segments as
   COCO RLE masks plus the union of their Canny boundaries (`pipeline.stages.segment.render_edges`).
3. Understanding data: LLaVA-style conversations, one question per turn, phrased exactly as the
   evaluation asks multiple-choice questions (`trainer.evaluation.benchmarks.build_prompt`),
   from one of `QUESTION_SETS`. The default, `closest`, asks what colour the shape closest to
   the camera is. Held-out scenes form the test probe, a TSV in the evaluation's `mcq` format
   (`category` per question).
4. Arms, each on the same data, steps and seeds: `understanding` (understanding loss only) and
   `unimrg` (the four-task objective); optionally `depth`, `segmentation`, `reconstruction`
   (understanding plus one auxiliary task). The model is a small Janus-architecture model
   (`JanusForConditionalGeneration`: SigLIP-style encoder, Llama LM, VQ tokenizer, generation
   head) built from random initialisation (seeded) and trained by `trainer.loop.train` with the
   Janus adapter, released recipe defaults except where `config` says otherwise. With
   `base_steps`, every arm post-trains the same understanding-only checkpoint instead.
5. Scores each trained model on the held-out TSV with the evaluation's `answer()` and `score()`
   and writes `DIR/results.json` and `DIR/results.png`.

The VQ tokenizer's encoder is randomly initialised and frozen, because no pretrained tokenizer
is reachable offline. Its codebook is fitted by k-means to the encoder's latents of the targets
(`vq_init`). The generation targets are the codes this fixed VQ assigns to the depth map, the
edge map and the image. `--quick` runs a tiny version (two seeds, a few steps) in under two
minutes; it only shows that everything runs, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ARMS", "Config", "Scene", "render_scene", "run", "scene_questions"]

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
#: arm -> loss weights (tasks left out are off here: every arm names all four)
ARMS = {
    "understanding": {
        "understanding": 1.0,
        "reconstruction": 0.0,
        "depth": 0.0,
        "segmentation": 0.0,
    },
    "unimrg": {"understanding": 1.0, "reconstruction": 1.0, "depth": 1.0, "segmentation": 1.0},
    "depth": {"understanding": 1.0, "reconstruction": 0.0, "depth": 1.0, "segmentation": 0.0},
    "segmentation": {
        "understanding": 1.0,
        "reconstruction": 0.0,
        "depth": 0.0,
        "segmentation": 1.0,
    },
    "reconstruction": {
        "understanding": 1.0,
        "reconstruction": 1.0,
        "depth": 0.0,
        "segmentation": 0.0,
    },
}
LABEL_FP = {"depth": "miniature-exact-depth-v1", "segment": "miniature-exact-edges-v1"}


@dataclass
class Config:
    """Everything that sets the experiment's numbers (written into results.json)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: ["understanding", "unimrg"])
    image_size: int = 32
    train_scenes: int = 3000
    #: extra scenes without questions (a plain image source): only the generation tasks see them
    extra_scenes: int = 0
    test_scenes: int = 300
    questions_per_scene: int = 1
    #: which questions (QUESTION_SETS): `closest`, `order` or `named`
    question_set: str = "closest"
    steps: int = 600
    #: understanding-only steps before the arms, from the random init; every arm of a seed then
    #: post-trains that checkpoint, as UniMRG post-trains a model that already understands
    #: (0: the arms start from the random init)
    base_steps: int = 0
    batch_size: int = 16
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    condition_grad_scale: float = 0.1
    #: loss weight of each auxiliary task in the arms that train it (released: 1.0)
    aux_weight: float = 1.0
    # model (Janus architecture, random init)
    lm_hidden: int = 64
    lm_layers: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    patch_size: int = 8
    vq_codes: int = 64
    #: the frozen VQ codebook: `random` (as initialised) or `kmeans` (fitted to the targets)
    vq_init: str = "kmeans"
    data_seed: int = 1234
    #: torch threads per training process
    threads: int = 1
    #: trainings run at once, each in its own process (1: in this process, one after another)
    jobs: int = 2


QUICK = dict(
    seeds=[0, 1],
    train_scenes=24,
    test_scenes=12,
    steps=3,
    base_steps=2,
    batch_size=4,
)


# --------------------------------------------------------------------------------------------
# scenes


@dataclass
class Scene:
    image: np.ndarray  # (S, S, 3) uint8
    depth: np.ndarray  # (S, S) float32, distance along the view axis (larger: farther)
    masks: list[np.ndarray]  # per object, visible pixels (S, S) bool, same order as objects
    objects: list[dict[str, Any]]  # colour, shape, z, x, size


HORIZON = 0.3  # fraction of the height where the ground meets the sky
Z_NEAR, Z_FAR, SKY_Z = 3.0, 9.0, 40.0


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.9) & (np.abs(yy - cy) <= r * 0.9)
    # triangle pointing up: base at cy + r, apex at cy - r
    t = (yy - (cy - r)) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r * 1.1)


def render_scene(rng: np.random.Generator, size: int = 32, n_objects: int | None = None) -> Scene:
    """A seeded scene of 2-3 shapes on a ground plane, with exact depth and visible masks.

    Perspective: an object at distance z stands on the ground at image row
    horizon + k / z (nearer is lower) and has apparent radius r0 * jitter / z with jitter in
    [0.6, 1.6], so apparent size alone often gets "which is closer" wrong. Objects are drawn far
    to near (nearer ones occlude); each keeps at least 35% of its area visible.
    """
    s = float(size)
    horizon = HORIZON * s
    k = (s - horizon) * Z_NEAR * 0.92  # z = Z_NEAR stands near the bottom edge
    r0 = 0.2 * s * Z_NEAR
    for _ in range(100):
        n = n_objects or int(rng.integers(2, 4))
        colours = rng.choice(list(COLOURS), size=n, replace=False)
        objs = []
        for c in colours:
            z = float(rng.uniform(Z_NEAR, Z_FAR))
            r = max(2.0, r0 * float(rng.uniform(0.6, 1.6)) / z)
            base = horizon + k / z
            objs.append(
                {
                    "colour": str(c),
                    "shape": str(rng.choice(SHAPES)),
                    "z": z,
                    "x": float(rng.uniform(r, s - r)),
                    "y": base - r,
                    "r": r,
                }
            )
        zs = sorted(o["z"] for o in objs)
        if any(b / a < 1.2 for a, b in zip(zs, zs[1:])):
            continue  # depth order must be unambiguous
        # ground: distance from the row (inverse of the standing rule), sky far away
        rows = np.arange(size, dtype=np.float32) + 0.5
        ground = np.where(rows > horizon + 1e-3, k / np.maximum(rows - horizon, 1e-3), SKY_Z)
        depth = np.repeat(np.minimum(ground, SKY_Z)[:, None], size, axis=1).astype(np.float32)
        tone = np.clip((rows - horizon) / (s - horizon), 0, 1)[:, None, None]
        sky = np.array([175, 195, 215], np.float32)
        near_g, far_g = np.array([120, 110, 95], np.float32), np.array([165, 160, 150], np.float32)
        img = np.where(
            (rows > horizon)[:, None, None], far_g + (near_g - far_g) * tone, sky
        ) * np.ones((size, size, 3), np.float32)
        img += rng.normal(0, 4, img.shape).astype(np.float32)  # texture
        owner = np.full((size, size), -1, np.int32)
        order = sorted(range(n), key=lambda i: -objs[i]["z"])  # far to near
        full = []
        for i in order:
            o = objs[i]
            m = _shape_mask(o["shape"], o["x"], o["y"], o["r"], size)
            full.append((i, m))
            shade = 0.85 + 0.3 * rng.random()
            img[m] = np.clip(np.array(COLOURS[o["colour"]], np.float32) * shade, 0, 255)
            depth[m] = o["z"]
            owner[m] = i
        masks = [owner == i for i in range(n)]
        if all(masks[i].sum() >= 0.35 * max(1, m.sum()) and masks[i].sum() >= 4 for i, m in full):
            return Scene(np.clip(img, 0, 255).astype(np.uint8), depth, masks, objs)
    raise RuntimeError("could not place the objects (100 tries)")


def _name(o: dict[str, Any]) -> str:
    return f"the {o['colour']} {o['shape']}"


#: question sets: category -> weight (how often it is asked). `order`: the options are the same
#: list, in the same order, for every question of a category (as in a classification VQA): what
#: colour the closest / farthest / leftmost shape is, how many shapes there are.
#: `named`: shapes named in shuffled options ("Which is closer to the camera, the red circle or
#: the blue square?"), what colour a named shape is; this needs the model to bind each option's
#: words to a region of the image, which the miniature models never learned (docs/experiments.md).
QUESTION_SETS = {
    "order": {"closest": 3, "farthest": 3, "leftmost": 2, "count": 1},
    #: the default: only what colour the closest shape is (fixed options, one question)
    "closest": {"closest": 1},
    "named": {"closer": 3, "farther": 3, "colour": 2, "count": 1},
}
#: the depth-order categories of every set (the `spatial` accuracy)
SPATIAL = ("closest", "farthest", "closer", "farther")


def scene_questions(
    scene: Scene, rng: random.Random, count: int, question_set: str = "order"
) -> list[dict[str, Any]]:
    """Multiple-choice questions about one scene: {category, question, options, answer}."""
    objs = scene.objects
    kinds = list(QUESTION_SETS[question_set])
    weights = list(QUESTION_SETS[question_set].values())
    out = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        if kind in ("closest", "farthest", "leftmost"):
            key = {"closest": "z", "farthest": "z", "leftmost": "x"}[kind]
            pick = max if kind == "farthest" else min
            target = pick(objs, key=lambda o: o[key])
            options = list(COLOURS)
            q = {
                "closest": "What colour is the shape closest to the camera?",
                "farthest": "What colour is the shape farthest from the camera?",
                "leftmost": "What colour is the leftmost shape?",
            }[kind]
            answer = options.index(target["colour"])
        elif kind in ("closer", "farther"):
            a, b = rng.sample(objs, 2)
            want = min if kind == "closer" else max
            right = want((a, b), key=lambda o: o["z"])
            options = [_name(a), _name(b)]
            rel = "closer to" if kind == "closer" else "farther from"
            q = f"Which is {rel} the camera, {options[0]} or {options[1]}?"
            answer = options.index(_name(right))
        elif kind == "colour":
            o = rng.choice(objs)
            same = [p for p in objs if p["shape"] == o["shape"]]
            if len(same) > 1:
                continue
            options = rng.sample([c for c in COLOURS if c != o["colour"]], 3) + [o["colour"]]
            rng.shuffle(options)
            q = f"What colour is the {o['shape']}?"
            answer = options.index(o["colour"])
        else:
            options = ["2", "3", "4"]
            q = "How many shapes are in the image?"
            answer = options.index(str(len(objs)))
        out.append({"category": kind, "question": q, "options": options, "answer": answer})
    return out


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


# --------------------------------------------------------------------------------------------
# data in the project's contract


def _mcq_row(q: dict[str, Any]) -> dict[str, str]:
    letters = "ABCDEFGH"
    row = {"question": q["question"], "answer": letters[q["answer"]], "category": q["category"]}
    row.update({letters[i]: opt for i, opt in enumerate(q["options"])})
    return row


def write_dataset(root: Path, cfg: Config) -> dict[str, Any]:
    """Scenes, conversations and the held-out TSV under `root`; returns the scenes by image_id."""
    from trainer.evaluation.benchmarks import build_prompt

    # Separate streams: the test set does not change with the number of training scenes.
    rng, extra_rng, test_rng = (np.random.default_rng([cfg.data_seed, k]) for k in range(3))
    qrng, test_qrng = random.Random(cfg.data_seed), random.Random(cfg.data_seed + 1)
    scene_dir, test_dir = root / "scenes", root / "test"
    scene_dir.mkdir(parents=True, exist_ok=True)
    test_dir.mkdir(parents=True, exist_ok=True)
    by_id: dict[str, Scene] = {}
    convs = []
    for i in range(cfg.train_scenes):
        sc = render_scene(rng, cfg.image_size)
        data = _png(sc.image)
        _write(scene_dir / f"scene_{i:05d}.png", data)
        by_id[hashlib.sha256(data).hexdigest()] = sc
        for j, q in enumerate(scene_questions(sc, qrng, cfg.questions_per_scene, cfg.question_set)):
            prompt = build_prompt("mcq", _mcq_row(q))
            convs.append(
                {
                    "id": f"{i}-{j}",
                    "image": f"scene_{i:05d}.png",
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{prompt}"},
                        {"from": "gpt", "value": "ABCDEFGH"[q["answer"]]},
                    ],
                }
            )
    (root / "conversations.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    extra_dir = root / "extra"
    extra_dir.mkdir(exist_ok=True)
    for i in range(cfg.extra_scenes):
        sc = render_scene(extra_rng, cfg.image_size)
        data = _png(sc.image)
        _write(extra_dir / f"extra_{i:05d}.png", data)
        by_id[hashlib.sha256(data).hexdigest()] = sc
    header = [
        "index",
        "image_path",
        "question",
        "A",
        "B",
        "C",
        "D",
        "E",
        "answer",
        "category",
        "objects",
    ]
    lines = ["\t".join(header)]
    n = 0
    for i in range(cfg.test_scenes):
        sc = render_scene(test_rng, cfg.image_size)
        name = f"test_{i:05d}.png"
        _write(test_dir / name, _png(sc.image))
        for q in scene_questions(sc, test_qrng, cfg.questions_per_scene, cfg.question_set):
            row = {"index": str(n), "image_path": name, "objects": str(len(sc.objects))}
            row.update(_mcq_row(q))
            lines.append("\t".join(row.get(h, "") for h in header))
            n += 1
    (test_dir / "test.tsv").write_text("\n".join(lines) + "\n")
    return {"scenes": by_id, "conversations": len(convs), "test_questions": n}


def write_labels(out: Path, scenes: dict[str, Scene]) -> dict[str, str]:
    """Depth and segment label shards, row-aligned with the ingested image shards, with targets
    rendered as the real stages render them. Returns the label fingerprints (stage -> fp)."""
    import cv2
    from pycocotools import mask as mask_utils

    from pipeline.shards import Layout, label_table, write_parquet_atomic
    from pipeline.stages.depth import DEPTH_SCHEMA
    from pipeline.stages.segment import segment_schema

    layout = Layout(out)
    seg_schema = segment_schema("edges", random_weights=False)
    import pyarrow.parquet as pq

    for shard in layout.image_shards():
        ids = pq.read_table(shard, columns=["image_id"]).column(0).to_pylist()
        depth_rows, seg_rows = [], []
        for iid in ids:
            sc = scenes[iid]
            h, w = sc.depth.shape
            u16, u8, mn, mx, edge_map = rendered_targets(sc)
            ok16, b16 = cv2.imencode(".png", u16)
            ok8, b8 = cv2.imencode(".png", u8)
            ok, edges = cv2.imencode(".png", edge_map)
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
                    "target": edges.tobytes(),
                    "width": w,
                    "height": h,
                    "n_masks": len(rles),
                }
            )
        write_parquet_atomic(
            label_table(depth_rows, DEPTH_SCHEMA),
            layout.label_shard("depth", LABEL_FP["depth"], _number(shard)),
        )
        write_parquet_atomic(
            label_table(seg_rows, seg_schema),
            layout.label_shard("segment", LABEL_FP["segment"], _number(shard)),
        )
    return dict(LABEL_FP)


def _number(shard: Path) -> int:
    from pipeline.shards import shard_number

    return shard_number(shard)


# --------------------------------------------------------------------------------------------
# model


def _tokenizer(texts: list[str]):
    """A byte-level BPE fitted to the experiment's text (deterministic), with Janus's special
    tokens: questions become ~30 tokens instead of ~170 bytes, which is most of the step time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trainer.adapters.janus import BOI, BOS, EOI, EOS, IMAGE_TOKEN, PAD

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[BOS, EOS, PAD],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )
    fast.add_tokens([IMAGE_TOKEN, BOI, EOI], special_tokens=True)
    return fast


MODEL_KEYS = (
    "image_size",
    "lm_hidden",
    "lm_layers",
    "vision_hidden",
    "vision_layers",
    "patch_size",
    "vq_codes",
    "vq_init",
)


def fit_codebook(vq, targets, codes: int, seed: int, iters: int = 25):
    """Spherical k-means of the frozen VQ encoder's L2-normalised latents of `targets` (uint8
    (N,3,S,S): the three kinds of generation target), written into the codebook: every code is
    used and codes group similar patches, as a trained tokenizer's do. The encoder stays random.
    """
    import torch
    import torch.nn.functional as F

    from trainer.adapters.janus import nearest_codes

    with torch.no_grad():
        x = targets.float().div(127.5).sub(1.0)
        h = vq.quant_conv(vq.encoder(x))
        z = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), dim=-1)
        g = torch.Generator().manual_seed(seed)
        c = z[torch.randperm(len(z), generator=g)[:codes]].clone()
        for _ in range(iters):
            assign = (z @ c.t()).argmax(1)
            for k in range(codes):
                members = z[assign == k]
                c[k] = (
                    F.normalize(members.mean(0), dim=0)
                    if len(members)
                    else z[torch.randint(len(z), (1,), generator=g)].squeeze(0)
                )
        vq.quantize.embedding.weight.copy_(c)
        used = nearest_codes(h, vq.quantize.embedding.weight).unique().numel()
    return used


def rendered_targets(sc: Scene):
    """The scene's depth and edge targets as the real stages render them: Depth Anything's
    relative inverse depth (1/z, near bright) min-max quantised by `quantize_depth`
    (16-bit map, 8-bit target, range), and the union of the masks' Canny boundaries."""
    import torch

    from pipeline.depth_png import quantize_depth
    from pipeline.stages.segment import render_edges

    u16, u8, mn, mx = quantize_depth(torch.from_numpy(1.0 / sc.depth)[None])
    edges = render_edges(torch.from_numpy(np.stack(sc.masks)))
    return u16[0].numpy(), u8[0].numpy(), float(mn[0]), float(mx[0]), edges


def fit_targets(scenes: dict[str, Scene], n: int = 256):
    """uint8 (3n,3,S,S): the first n scenes' image, depth target and edge target, rendered as
    write_labels renders them (the codebook's k-means data)."""
    import torch

    out = []
    for sc in list(scenes.values())[:n]:
        _, u8, _, _, edges = rendered_targets(sc)
        for arr in (
            sc.image,
            np.repeat(u8[..., None], 3, 2),
            np.repeat(edges[..., None], 3, 2),
        ):
            out.append(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1))
    return torch.stack(out)


def build_model(path: Path, cfg: Config, seed: int, texts: list[str], targets=None) -> Path:
    """A Janus-architecture model from random init (seeded), saved where the trainer loads it.
    With `cfg.vq_init == "kmeans"` the frozen VQ's codebook is fitted to `targets`."""
    import torch
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    from trainer.adapters.janus import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, JanusAdapter

    if (path / "unimrg_adapter.json").exists():
        return path
    tok = _tokenizer(texts)
    tokens = (cfg.image_size // cfg.patch_size) ** 2
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.lm_hidden,
        intermediate_size=cfg.lm_hidden * 2,
        num_hidden_layers=cfg.lm_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = JanusVisionConfig(
        hidden_size=cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=2,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.lm_hidden,
        mlp_ratio=2.0,
        depth=2,
        num_image_tokens=tokens,
    )
    levels = int(math.log2(cfg.image_size // int(math.sqrt(tokens)))) + 1
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=cfg.vq_codes,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1] * levels,
        num_res_blocks=1,
        projection_dim=cfg.lm_hidden,
        image_token_embed_dim=cfg.lm_hidden,
        num_hidden_layers=2,
        num_patches=int(math.sqrt(tokens)),
    )
    config = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config).eval()
    if cfg.vq_init == "kmeans":
        fit_codebook(model.model.vqmodel, targets, cfg.vq_codes, seed)
    # No system prompt: the byte-level tokenizer would spend ~190 tokens on it per question;
    # training and answering read the same setting from the saved processor_config.json.
    adapter = JanusAdapter(
        model, tok, CLIP_MEAN, CLIP_STD, random_weights=True, source="miniature", system_prompt=""
    )
    tmp = path.with_name(path.name + ".tmp")
    adapter.save(tmp)
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------------------------
# arms


def _manifest(root: Path, cfg: Config, arm: str, seed: int, model_dir: Path):
    from pipeline.manifest import parse_manifest

    return parse_manifest(
        {
            "output_dir": "out",
            "shard_size": 256,
            "sources": [{"name": "extra", "path": "extra"}] if cfg.extra_scenes else [],
            # Listed so the manifest allows the depth and segmentation tasks; never run: their
            # labels are the renderer's exact targets (write_labels), passed by fingerprint.
            "stages": {"depth": {"model": "tiny-random"}, "segment": {"model_type": "tiny-random"}},
            "understanding": [{"path": "conversations.jsonl", "image_root": "scenes"}],
            "trainer": {
                "model": str(model_dir),
                "loss_weights": arm_weights(arm, cfg),
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "warmup_ratio": cfg.warmup_ratio,
                "max_steps": cfg.steps,
                "save_every": cfg.steps,
                "eval_every": cfg.steps,
                "log_every": 1,
                "seed": seed,
                "condition_grad_scale": cfg.condition_grad_scale,
                "num_workers": 0,
                "dtype": "float32",
            },
        },
        base_dir=root,
    )


def arm_weights(arm: str, cfg: Config) -> dict[str, float]:
    """The arm's `trainer.loss_weights`: understanding at 1.0, each auxiliary task it trains at
    `cfg.aux_weight` (released: 1.0)."""
    return {t: (w if t == "understanding" else w * cfg.aux_weight) for t, w in ARMS[arm].items()}


def _texts(conversations: Path) -> list[str]:
    """Every turn of the training conversations plus the generation prompts (tokenizer data)."""
    from trainer.data import DEFAULT_PROMPTS

    texts = [p for lst in DEFAULT_PROMPTS.values() for p in lst]
    for line in conversations.read_text().splitlines():
        texts += [t["value"] for t in json.loads(line)["conversations"]]
    return texts


def evaluate(checkpoint: Path, tsv: Path, batch: int = 32) -> dict[str, Any]:
    """Held-out accuracy through the evaluation's answer() and score(), and `image_use`: the
    fraction of questions whose reply changes when the question is asked about another held-out
    image (the next row's). A model that answers from the text alone scores 0."""
    from trainer.adapters.janus import JanusAdapter
    from trainer.evaluation.benchmarks import build_prompt, load_image, read_benchmark
    from trainer.evaluation.scoring import score

    adapter = JanusAdapter.load(str(checkpoint))
    adapter.model.eval()
    rows = read_benchmark(tsv, "mcq")
    images = [load_image(r, tsv.parent) for r in rows]
    prompts = [build_prompt("mcq", r) for r in rows]
    swapped = images[1:] + images[:1]
    replies, other = [], []
    for s in range(0, len(rows), batch):
        replies += adapter.answer(images[s : s + batch], prompts[s : s + batch], max_new_tokens=4)
        other += adapter.answer(swapped[s : s + batch], prompts[s : s + batch], max_new_tokens=4)
    for r, reply in zip(rows, replies):
        r["prediction"] = reply
    metrics = score("mcq", rows)
    spatial = [r for r in rows if r.get("category") in SPATIAL]
    metrics["spatial_accuracy"] = score("mcq", spatial)["accuracy"] if spatial else None
    metrics["image_use"] = sum(a != b for a, b in zip(replies, other)) / max(1, len(rows))
    return metrics


def _chance(tsv: Path) -> dict[str, float]:
    """Expected accuracy of two guessers: uniform over the options (`accuracy`,
    `spatial_accuracy`), and, for the colour questions, a random colour among those in the image
    (`present_colour_spatial`: what a model that sees which colours are there, but not their
    depth order, scores on the spatial questions)."""
    from trainer.evaluation.benchmarks import options_of, read_benchmark

    rows = read_benchmark(tsv, "mcq")
    sp = [r for r in rows if r.get("category") in SPATIAL]
    out = {
        "accuracy": float(np.mean([1 / len(options_of(r)) for r in rows])),
        "spatial_accuracy": float(np.mean([1 / len(options_of(r)) for r in sp])) if sp else 0.0,
    }
    if sp and all(len(options_of(r)) == len(COLOURS) for r in sp):
        out["present_colour_spatial"] = float(np.mean([1 / int(r["objects"]) for r in sp]))
    return out


def run(cfg: Config, out: Path, progress: bool = True) -> dict[str, Any]:
    import torch

    from pipeline.ingest import ingest
    from pipeline.shards import atomic_write_bytes

    check(cfg)
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_keys = ("image_size", "train_scenes", "extra_scenes", "test_scenes", "data_seed")
    data_key = hashlib.sha256(
        json.dumps(
            {k: getattr(cfg, k) for k in (*data_keys, "questions_per_scene", "question_set")}
        ).encode()
    ).hexdigest()[:12]
    root = out / "work" / data_key  # one folder per dataset: never mixes two datasets' shards
    info = write_dataset(root, cfg)
    base = _manifest(root, cfg, "unimrg", cfg.seeds[0], root / "models" / "init")
    ingest(base, progress=False)  # idempotent: a rerun adds nothing
    label_fps = write_labels(base.out, info["scenes"])
    tsv = root / "test" / "test.tsv"
    texts = _texts(root / "conversations.jsonl")
    # One model folder per model setting: a rerun with another size never reuses a stale init.
    model_key = hashlib.sha256(
        json.dumps({k: getattr(cfg, k) for k in MODEL_KEYS}).encode()
    ).hexdigest()[:8]
    targets = fit_targets(info["scenes"]) if cfg.vq_init == "kmeans" else None
    results: dict[str, Any] = {"arms": {}, "config": {}}
    timings = {}
    results["arms"] = {arm: {key: {} for key in SEED_KEYS} for arm in cfg.arms}
    # The initial weights of every seed first (every arm of a seed starts from them).
    model_dirs = {
        seed: build_model(
            root / "models" / f"init-{model_key}-seed{seed}", cfg, seed, texts, targets
        )
        for seed in cfg.seeds
    }
    if cfg.base_steps:
        # The post-training start: understanding only for base_steps, one checkpoint per seed.
        base_cfg = replace(cfg, steps=cfg.base_steps)
        base = dict(
            _trainings(
                cfg.jobs,
                {
                    s: (root, base_cfg, "understanding", s, d, label_fps)
                    for s, d in model_dirs.items()
                },
            )
        )
        results["base"] = {"steps": cfg.base_steps, **{key: {} for key in SEED_KEYS}}
        for s, b in base.items():
            _add_seed(results["base"], s, b)
        _summarise({"base": results["base"]})
        model_dirs = {s: Path(b["checkpoint"]) for s, b in base.items()}
        if progress:
            print(
                f"base ({cfg.base_steps} understanding-only steps): spatial "
                f"{results['base']['spatial_mean']:.3f}",
                flush=True,
            )
    # results.json is rewritten after every finished (seed, arm); a stopped run reports what it
    # finished, and a rerun continues (finished trainings are cache hits of the trainer).
    jobs = [(seed, arm) for seed in cfg.seeds for arm in cfg.arms]
    args = {job: (root, cfg, job[1], job[0], model_dirs[job[0]], label_fps) for job in jobs}

    def record(seed: int, arm: str, done: dict[str, Any]) -> None:
        _add_seed(results["arms"][arm], seed, done)
        metrics = done["metrics"]
        timings[f"{arm}/{seed}"] = done["seconds"]
        if progress:
            print(
                f"{arm:>14} seed {seed}: accuracy {metrics['accuracy']:.3f}, spatial "
                f"{metrics['spatial_accuracy']:.3f}, image use {metrics['image_use']:.2f} "
                f"({done['seconds']:.0f} s)",
                flush=True,
            )
        _summarise(results["arms"])
        results["config"] = {
            **asdict(cfg),
            "seeds_done": sorted({int(k) for r in results["arms"].values() for k in r["seeds"]}),
            "train_conversations": info["conversations"],
            "test_questions": info["test_questions"],
            "chance": _chance(tsv),
            "label_fingerprints": label_fps,
            "seconds_per_run": timings,
            "wall_s": round(time.perf_counter() - t_start, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cfg.jobs} training "
            f"process(es) of {cfg.threads} torch thread(s)",
            "std": "sample standard deviation over seeds (ddof=1)",
        }
        atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())

    # The arms with the most tasks (the longest trainings) go first: less idle at the end.
    order = sorted(jobs, key=lambda j: -sum(w > 0 for w in ARMS[j[1]].values()))
    for job, done in _trainings(cfg.jobs, {job: args[job] for job in order}):
        record(*job, done)  # recorded as each training finishes
    (out / "results.md").write_text(table(results))
    plot(results, out / "results.png")
    return results


def _trainings(jobs: int, args: dict[Any, tuple]):
    """Yield (key, `_train_and_score(*a)`) for every key's arguments as each finishes: in this
    process one after another when `jobs` is 1, else in a pool of `jobs` spawned processes of
    one torch thread each (no forked torch state; a training's numbers do not depend on which
    process ran it)."""
    if jobs == 1:
        for key, a in args.items():
            yield key, _train_and_score(*a)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train_and_score, *a): key for key, a in args.items()}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


def _train_and_score(
    root: Path, cfg: Config, arm: str, seed: int, model_dir: Path, label_fps: dict[str, str]
) -> dict[str, Any]:
    """One (seed, arm): train through `trainer.loop.train`, score the final checkpoint."""
    import torch

    from trainer.loop import train

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    m = _manifest(root, cfg, arm, seed, model_dir)
    res = train(m, progress=False, num_workers=0, label_fingerprints=label_fps)
    metrics = evaluate(res.output_dir / f"step_{cfg.steps:06d}", root / "test" / "test.tsv")
    log = [json.loads(x) for x in (res.output_dir / "log.jsonl").read_text().splitlines()]
    return {
        "checkpoint": str(res.output_dir / f"step_{cfg.steps:06d}"),
        "metrics": metrics,
        "loss": [{"step": r["step"], **r["loss"]} for r in log],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def check(cfg: Config) -> None:
    """Refuse a config the run would fail on, before any work."""
    if cfg.question_set not in QUESTION_SETS:
        raise ValueError(f"question_set: {cfg.question_set!r} is not one of {list(QUESTION_SETS)}")
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms: {unknown} not among {list(ARMS)}")
    if cfg.vq_init not in ("random", "kmeans"):
        raise ValueError(f"vq_init: {cfg.vq_init!r} is not 'random' or 'kmeans'")
    if cfg.aux_weight <= 0:
        raise ValueError(
            f"aux_weight: {cfg.aux_weight} must be > 0 (the understanding arm is the baseline)"
        )
    if cfg.jobs < 1 or cfg.threads < 1:
        raise ValueError("jobs and threads: at least 1")
    if not cfg.seeds:
        raise ValueError("seeds: at least one seed")


#: what each training adds, under its seed, to its arm's (or the base's) results
SEED_KEYS = ("seeds", "spatial", "per_category", "image_use", "loss")


def _add_seed(res: dict[str, Any], seed: int, done: dict[str, Any]) -> None:
    """One finished training's scores and loss curve under its seed, the seeds kept in order."""
    m = done["metrics"]
    values = {
        "seeds": m["accuracy"],
        "spatial": m["spatial_accuracy"],
        "per_category": m["per_category"],
        "image_use": m["image_use"],
        "loss": done["loss"],
    }
    for key in SEED_KEYS:
        res[key][str(seed)] = values[key]
        res[key] = dict(sorted(res[key].items(), key=lambda kv: int(kv[0])))


def _summarise(arms: dict[str, Any]) -> None:
    for r in arms.values():
        for key, name in (("seeds", ""), ("spatial", "spatial_"), ("image_use", "image_use_")):
            vals = list(r[key].values())
            if vals:
                r[name + "mean"] = float(np.mean(vals))
                r[name + "std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    base = arms.get("understanding")
    for arm, r in arms.items():
        if arm == "understanding" or base is None:
            continue
        # Paired by seed: for a seed, both arms start from the same weights and see the same data.
        for key, name in (("seeds", "diff"), ("spatial", "spatial_diff")):
            d = {s: r[key][s] - base[key][s] for s in r[key] if s in base[key]}
            r[name] = {
                "seeds": d,
                "mean": float(np.mean(list(d.values()))) if d else None,
                "std": float(np.std(list(d.values()), ddof=1)) if len(d) > 1 else 0.0,
            }


def table(results: dict[str, Any]) -> str:
    """The markdown table docs/experiments.md shows: mean ± std per arm, each seed named, and
    each arm's difference to understanding-only paired by seed."""
    chance = results["config"]["chance"]
    lines = [
        "| arm | held-out accuracy, mean ± std | per seed | spatial (depth order), mean ± "
        "std | per seed | spatial minus understanding-only, paired by seed | image use |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = list(results["arms"].items())
    if "base" in results:
        rows.insert(
            0,
            (
                f"base: understanding only, {results['base']['steps']} steps (every arm's start)",
                results["base"],
            ),
        )
    for arm, r in rows:
        if "mean" not in r:
            continue
        seeds = ", ".join(f"{s}: {a:.3f}" for s, a in r["seeds"].items())
        sp = ", ".join(f"{s}: {a:.3f}" for s, a in r["spatial"].items())
        diff = r.get("spatial_diff")
        d = f"{diff['mean']:+.3f} ± {diff['std']:.3f}" if diff and diff["mean"] is not None else ""
        use = f"{r['image_use_mean']:.2f}" if "image_use_mean" in r else ""
        lines.append(
            f"| {arm} | {r['mean']:.3f} ± {r['std']:.3f} | {seeds} | "
            f"{r['spatial_mean']:.3f} ± {r['spatial_std']:.3f} | {sp} | {d} | {use} |"
        )
    lines.append(
        f"| chance | {chance['accuracy']:.3f} | | {chance['spatial_accuracy']:.3f} | | | |"
    )
    if "present_colour_spatial" in chance:
        lines.append(
            f"| a colour in the image, at random | | | {chance['present_colour_spatial']:.3f} "
            "| | | |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    chance = results["config"]["chance"]
    for k, (key, label) in enumerate(
        (("seeds", "all questions"), ("spatial", "spatial (depth order)"))
    ):
        means = [np.mean(list(results["arms"][a][key].values())) for a in arms]
        stds = [
            np.std(list(results["arms"][a][key].values()), ddof=1)
            if len(results["arms"][a][key]) > 1
            else 0.0
            for a in arms
        ]
        xs = np.arange(len(arms)) + (k - 0.5) * 0.38
        ax1.bar(xs, means, 0.36, yerr=stds, capsize=3, label=label, alpha=0.8)
        for x, a in zip(xs, arms):
            vals = list(results["arms"][a][key].values())
            ax1.scatter([x] * len(vals), vals, color="k", s=10, zorder=3)
    ax1.axhline(chance["accuracy"], color="gray", ls="--", lw=1, label="chance (all)")
    ax1.axhline(chance["spatial_accuracy"], color="gray", ls=":", lw=1, label="chance (spatial)")
    if "present_colour_spatial" in chance:
        ax1.axhline(
            chance["present_colour_spatial"],
            color="tab:red",
            ls=":",
            lw=1,
            label="a colour in the image, at random (spatial)",
        )
    if "base" in results and "spatial_mean" in results["base"]:
        ax1.axhline(
            results["base"]["spatial_mean"],
            color="k",
            ls="-.",
            lw=1,
            label=f"base ({results['base']['steps']} steps, spatial)",
        )
    ax1.set_xticks(np.arange(len(arms)), arms)
    ax1.set_ylabel("held-out accuracy")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=7)
    ax1.set_title("held-out accuracy (mean ± std over seeds, dots: seeds)")
    for a in arms:
        curves = list(results["arms"][a]["loss"].values())
        steps = [r["step"] for r in curves[0]]
        und = np.mean([[r["understanding"] for r in c] for c in curves], axis=0)
        ax2.plot(steps, und, label=f"{a}: understanding loss")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("loss (mean over seeds)")
    ax2.legend(fontsize=7)
    ax2.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.miniature", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    p.add_argument("--out", default="out/experiments/miniature", help="output folder")
    p.add_argument(
        "--quick", action="store_true", help="tiny run (< 2 min) that only checks it runs"
    )
    p.add_argument(
        "--arms", nargs="+", choices=list(ARMS), help="arms (default understanding unimrg)"
    )
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--train-scenes", type=int, help="training scenes")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override any Config field (e.g. condition_grad_scale=1.0 lm_hidden=128)",
    )
    args = p.parse_args(argv)
    cfg = Config(**QUICK) if args.quick else Config()
    if args.seeds:
        cfg.seeds = args.seeds
    if args.arms:
        cfg.arms = args.arms
    if args.steps:
        cfg.steps = args.steps
    if args.train_scenes:
        cfg.train_scenes = args.train_scenes
    for item in args.set:
        key, _, value = item.partition("=")
        if not hasattr(cfg, key) or key in ("seeds", "arms"):
            p.error(f"--set {item}: no Config field {key!r}")
        setattr(cfg, key, type(getattr(cfg, key))(value))
    try:
        check(cfg)
    except ValueError as e:
        p.error(str(e))
    res = run(cfg, Path(args.out))
    print(f"wrote {Path(args.out) / 'results.json'} in {res['config']['wall_s']:.0f} s")
    for arm, r in res["arms"].items():
        print(
            f"{arm:>14}: {r['mean']:.3f} ± {r['std']:.3f} (spatial {r['spatial_mean']:.3f} ± {r['spatial_std']:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

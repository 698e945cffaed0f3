"""Seeded scenes, their captions and the questions asked about them.

A scene is 2-3 coloured shapes at known distances z in [3, 9] in front of a textured ground
plane under a sky, 32 x 32 px. What tells depth, and what does not:

- **Not the 2D layout.** An object either stands on the ground (its base at row
  `horizon + k / z`: nearer is lower) or floats at a random height (`float_prob`, default 0.7).
  "The lower one is nearer" is then right in about 65% of pairs, and "the lowest is the nearest"
  for about 61% of scenes (measured by `cue_report` over 1000 scenes; tested), so the layout
  alone does not answer the depth questions.
- **Apparent size** is `r0 * jitter / z` with jitter in [0.4, 2.5] (radius 2 to 0.28 x size px):
  bigger is nearer in ~68% of pairs, and the biggest is the nearest in ~66% of scenes: a cue,
  not an answer.
- **Haze**: an object's colour is blended towards the fog colour by `haze * (z - 3) / 6`, so a
  far object is paler than a near one of the same colour; **occlusion**: nearer objects are drawn
  over farther ones, and each keeps at least 35% of its area visible.

The renderer returns the exact depth map (distance along the view axis) and the visible instance
masks, from which the depth and segmentation targets are rendered (labels.py).

Captions (text_to_image) name each object's colour, shape, size and place in the frame, never
its distance. Questions have word answers: a depth-order question about every scene (which
colour the nearest or the farthest shape is), then generic ones (how many shapes, whether a
colour is present, the leftmost shape's colour).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "COLOURS",
    "DEPTH_KINDS",
    "SHAPES",
    "Scene",
    "caption",
    "conversation",
    "cue_report",
    "render_scene",
    "scene_questions",
]

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {2: "two", 3: "three"}
FOG = np.array([175, 195, 215], np.float32)  # the sky's colour: far objects fade into it
HORIZON = 0.3  # fraction of the height where the ground meets the sky
Z_NEAR, Z_FAR, SKY_Z = 3.0, 9.0, 40.0
#: the depth-order question kinds (the primary measure's questions)
DEPTH_KINDS = ("nearest", "farthest")
#: generic questions: none asks to bind a shape to a colour (what colour is the square?), which
#: the first miniature's models never learned (docs/experiments.md, history)
GENERIC_KINDS = ("count", "present", "leftmost")
#: appended to every question, in training and at test (LLaVA's short-answer phrasing)
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass
class Scene:
    image: np.ndarray  # (S, S, 3) uint8
    depth: np.ndarray  # (S, S) float32, distance along the view axis (larger: farther)
    masks: list[np.ndarray]  # per object, visible pixels (S, S) bool, same order as objects
    objects: list[dict[str, Any]]  # colour, shape, z, x, y, r, floating


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.9) & (np.abs(yy - cy) <= r * 0.9)
    # triangle pointing up: base at cy + r, apex at cy - r
    t = (yy - (cy - r)) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r * 1.1)


def render_scene(
    rng: np.random.Generator,
    size: int = 32,
    float_prob: float = 0.7,
    haze: float = 0.5,
    n_objects: int | None = None,
) -> Scene:
    """A seeded scene of 2-3 shapes with exact depth and visible masks (module docstring)."""
    s = float(size)
    horizon = HORIZON * s
    k = (s - horizon) * Z_NEAR * 0.92  # z = Z_NEAR stands near the bottom edge
    r0 = 0.2 * s * Z_NEAR
    for _ in range(200):
        n = n_objects or int(rng.integers(2, 4))
        colours = rng.choice(list(COLOURS), size=n, replace=False)
        objs = []
        for c in colours:
            z = float(rng.uniform(Z_NEAR, Z_FAR))
            r = min(0.28 * s, max(2.0, r0 * float(rng.uniform(0.4, 2.5)) / z))
            floating = bool(rng.random() < float_prob)
            y = float(rng.uniform(r, s - r)) if floating else horizon + k / z - r
            objs.append(
                {
                    "colour": str(c),
                    "shape": str(rng.choice(SHAPES)),
                    "z": z,
                    "x": float(rng.uniform(r, s - r)),
                    "y": y,
                    "r": r,
                    "floating": floating,
                }
            )
        zs = sorted(o["z"] for o in objs)
        if any(b / a < 1.2 for a, b in zip(zs, zs[1:])):
            continue  # depth order must be unambiguous
        rows = np.arange(size, dtype=np.float32) + 0.5
        ground = np.where(rows > horizon + 1e-3, k / np.maximum(rows - horizon, 1e-3), SKY_Z)
        depth = np.repeat(np.minimum(ground, SKY_Z)[:, None], size, axis=1).astype(np.float32)
        tone = np.clip((rows - horizon) / (s - horizon), 0, 1)[:, None, None]
        near_g, far_g = np.array([120, 110, 95], np.float32), np.array([165, 160, 150], np.float32)
        img = np.where(
            (rows > horizon)[:, None, None], far_g + (near_g - far_g) * tone, FOG
        ) * np.ones((size, size, 3), np.float32)
        img += rng.normal(0, 4, img.shape).astype(np.float32)  # texture
        owner = np.full((size, size), -1, np.int32)
        order = sorted(range(n), key=lambda i: -objs[i]["z"])  # far to near
        full = []
        for i in order:
            o = objs[i]
            m = _shape_mask(o["shape"], o["x"], o["y"], o["r"], size)
            full.append((i, m))
            shade = 0.9 + 0.2 * rng.random()
            fade = haze * (o["z"] - Z_NEAR) / (Z_FAR - Z_NEAR)
            colour = np.array(COLOURS[o["colour"]], np.float32) * shade
            img[m] = np.clip((1 - fade) * colour + fade * FOG, 0, 255)
            depth[m] = o["z"]
            owner[m] = i
        masks = [owner == i for i in range(n)]
        if all(masks[i].sum() >= 0.35 * max(1, m.sum()) and masks[i].sum() >= 4 for i, m in full):
            return Scene(np.clip(img, 0, 255).astype(np.uint8), depth, masks, objs)
    raise RuntimeError("could not place the objects (200 tries)")


def _place(o: dict[str, Any], size: int) -> str:
    col = ("left", "centre", "right")[min(2, int(3 * o["x"] / size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * o["y"] / size))]
    return f"{row} {col}" if (row, col) != ("middle", "centre") else "centre"


def caption(scene: Scene) -> str:
    """What the image shows, object by object, far ones first (drawing order): colour, shape,
    size and place; never the distance. E.g. "A small blue square at the top left and a large
    red circle at the bottom centre." """
    size = scene.image.shape[0]
    objs = sorted(scene.objects, key=lambda o: -o["z"])
    parts = []
    for o in objs:
        big = "large" if o["r"] >= 0.12 * size else "small"
        parts.append(f"a {big} {o['colour']} {o['shape']} at the {_place(o, size)}")
    text = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    return text[0].upper() + text[1:] + "."


def scene_questions(
    scene: Scene, rng: random.Random, generic: int = 2, depth_kind: str | None = None
) -> list[dict[str, Any]]:
    """One depth-order question, then `generic` others of distinct kinds: {category, question,
    options, answer} with `answer` the right option's word (options: the words the category
    can answer)."""
    objs = scene.objects
    kind = depth_kind or rng.choice(DEPTH_KINDS)
    pick = min if kind == "nearest" else max
    target = pick(objs, key=lambda o: o["z"])
    out = [
        {
            "category": kind,
            "question": f"What colour is the {kind} shape?",
            "options": list(COLOURS),
            "answer": target["colour"],
        }
    ]
    for g in rng.sample(GENERIC_KINDS, min(generic, len(GENERIC_KINDS))):
        if g == "count":
            q = "How many shapes are there?"
            options, answer = list(NUMBERS.values()), NUMBERS[len(objs)]
        elif g == "present":
            c = rng.choice(list(COLOURS))
            q = f"Is there a {c} shape?"
            options, answer = ["yes", "no"], "yes" if any(o["colour"] == c for o in objs) else "no"
        else:
            o = min(objs, key=lambda p: p["x"])
            q = "What colour is the leftmost shape?"
            options, answer = list(COLOURS), o["colour"]
        out.append({"category": g, "question": q, "options": options, "answer": answer})
    return out


def prompt(question: str) -> str:
    """The question as the model sees it, in training and at test."""
    return f"{question}\n{SHORT_ANSWER}"


def conversation(image: str, questions: list[dict[str, Any]]) -> dict[str, Any]:
    """A LLaVA-style record: every question a human turn, its word the gpt turn."""
    turns = []
    for i, q in enumerate(questions):
        text = prompt(q["question"])
        turns.append({"from": "human", "value": f"<image>\n{text}" if i == 0 else text})
        turns.append({"from": "gpt", "value": q["answer"]})
    return {"image": image, "conversations": turns}


def cue_report(scenes: list[Scene]) -> dict[str, float]:
    """How often each 2D cue orders a pair of objects by depth, and how often a guesser using it
    answers "which is nearest" (the floors for the depth questions).

    `lower_is_nearer`: the object whose bottom is lower; `bigger_is_nearer`: the larger apparent
    radius; `less_hazy`: not a 2D cue but the haze. `nearest_by_*`: the nearest-shape question
    answered by the lowest / the biggest object.
    """
    pairs = lower = bigger = floating = 0
    by_low = by_big = 0
    for sc in scenes:
        objs = sc.objects
        floating += sum(o["floating"] for o in objs)
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                oa, ob = objs[a], objs[b]
                near = oa if oa["z"] < ob["z"] else ob
                pairs += 1
                lower += (oa if oa["y"] + oa["r"] > ob["y"] + ob["r"] else ob) is near
                bigger += (oa if oa["r"] > ob["r"] else ob) is near
        nearest = min(objs, key=lambda o: o["z"])
        by_low += max(objs, key=lambda o: o["y"] + o["r"]) is nearest
        by_big += max(objs, key=lambda o: o["r"]) is nearest
    n_obj = sum(len(sc.objects) for sc in scenes)
    return {
        "pairs": pairs,
        "lower_is_nearer": lower / pairs,
        "bigger_is_nearer": bigger / pairs,
        "floating": floating / n_obj,
        "nearest_by_lowest": by_low / len(scenes),
        "nearest_by_biggest": by_big / len(scenes),
    }

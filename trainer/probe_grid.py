"""The evaluation probe: what the model draws for fixed images, next to the targets (PNG grid).

One row per probe image: input | reconstruction | depth target | depth generated |
segmentation target | segmentation generated (columns of disabled tasks are left out). The title
says the step, whether the probe images were held out of training, and "random weights" when the
model came from `tiny-random`; the caption names the sampling settings of every generated column.

Sampling: temperature `trainer.probe_temperature` (1.0) and classifier-free guidance with weight
`trainer.probe_cfg_weight` (5.0: Janus's own generation settings) for the tasks the trainer trains
unconditionally too (uncond rate > 0: the prompt dropped, the image kept); a task never trained
without its prompt has no unconditional branch to guide with and is sampled without guidance. This is the paper's Figure 1 question: can the model draw depth?
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from pipeline.shards import atomic_write_bytes

__all__ = ["write_probe"]

_CELL_MIN = 128
_HEADER = 18


def write_probe(
    adapter: Any,
    dataset: Any,
    rows: list[int],
    tasks: list[str],
    path: Path,
    step: int,
    held_out: bool,
    prompts: dict[str, list[str]],
    temperature: float = 1.0,
    cfg_weight: float = 5.0,
    write: bool = True,
) -> Path:
    """Generate for `rows` (global image rows) and write the grid to `path` (`write=False`:
    generate only, for the ranks that take part in a sharded model's generation)."""
    import torch

    # The generation tasks' condition image (stretched, as the trainer feeds it).
    images = torch.stack([torch.from_numpy(dataset.image(g, "reconstruction")) for g in rows])
    columns: list[tuple[str, torch.Tensor]] = [("input", images)]
    settings = []
    for task in ("reconstruction", "depth", "segmentation"):
        if task not in tasks:
            continue
        if task != "reconstruction":
            columns.append(
                (
                    f"{task} target",
                    torch.stack([torch.from_numpy(dataset.target(task, g)) for g in rows]),
                )
            )
        guided = dataset.uncond_rate.get(task, 0.0) > 0
        w = cfg_weight if guided else 1.0
        out = adapter.generate(
            images, prompts[task][0], seed=step, temperature=temperature, cfg_weight=w
        )
        columns.append((f"{task} generated", out.cpu()))
        settings.append(f"{task}: " + (f"cfg {w:g}" if guided else "no cfg (never uncond)"))
    title = f"step {step} | temperature {temperature:g}; " + ", ".join(settings)
    title += " | probe images held out" if held_out else " | probe images also in training"
    if adapter.random_weights:
        title += " | RANDOM WEIGHTS (tiny-random): output is noise"
    if not write:
        return Path(path)
    png = grid_png(columns, title)
    atomic_write_bytes(Path(path), png)
    return Path(path)


def grid_png(columns: list[tuple[str, Any]], title: str) -> bytes:
    n = columns[0][1].shape[0]
    s = columns[0][1].shape[-1]
    cell = max(s, _CELL_MIN)
    w, h = cell * len(columns), _HEADER * 2 + cell * n
    canvas = Image.new("RGB", (max(w, 8 * len(title)), h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill=(200, 0, 0) if "RANDOM" in title else (0, 0, 0))
    for c, (name, imgs) in enumerate(columns):
        draw.text((c * cell + 4, _HEADER + 3), name, fill=(0, 0, 0))
        for r in range(n):
            arr = np.asarray(imgs[r]).transpose(1, 2, 0)
            tile = Image.fromarray(arr.astype(np.uint8), "RGB").resize(
                (cell, cell), Image.Resampling.NEAREST
            )
            canvas.paste(tile, (c * cell, _HEADER * 2 + r * cell))
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)  # the caption, readable without OCR
    canvas.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()

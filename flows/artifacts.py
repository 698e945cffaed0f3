"""What the Prefect UI shows besides states: per-stage tables, progress bars, the preview sheet.

- `stage_table`: one table artifact per stage (key `unimrg-<stage>-shards`), a row per shard
  with its rows, errors, how it was obtained (`computed`, `cached` = Prefect cache hit,
  `on disk` = the task ran but found its label shard already written), seconds and images/s;
- `StageProgress`: one progress artifact per stage, updated as shards finish (at most once a
  second, and at the last);
- `preview_markdown`: a markdown artifact with a thumbnail of the contact sheet and the path
  of the full-size file;
- `image_artifact`: an image artifact (the loss curves and probe grids of training, see
  flows/train_watch.py) showing a thumbnail, its description naming the full-size file.

Images are published by reference: the file stays on disk and the artifact holds its path
plus a thumbnail of at most `THUMBNAIL_BYTES` as a `data:` URI (the Prefect UI renders those in
markdown and image artifacts; a path alone it cannot show, the browser does not read the
worker's disk). Artifacts live in the Prefect database, once per run, so they stay small.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

__all__ = [
    "StageProgress",
    "how_obtained",
    "image_artifact",
    "preview_markdown",
    "stage_summary",
    "stage_table",
    "thumbnail_uri",
]

#: Longest side of a thumbnail (pixels) and its most bytes once encoded (before base64).
THUMBNAIL_SIDE = 720
THUMBNAIL_BYTES = 48_000


def how_obtained(result: dict[str, Any], state_name: str | None) -> str:
    if state_name == "Cached":
        return "cached"
    return "computed" if result.get("computed") else "on disk"


def stage_summary(stage: str, rows: list[dict[str, Any]], random_weights: bool = False) -> str:
    """One line: shards computed / cached / on disk / failed, rows, images per second."""
    done = [r for r in rows if r.get("how")]
    computed = [r for r in done if r["how"] == "computed"]
    seconds = sum(r.get("seconds", 0.0) for r in computed)
    images = sum(r.get("rows", 0) for r in computed)
    rate = images / seconds if seconds > 0 else 0.0
    summary = (
        f"{stage}: {len(rows)} shard(s), {len(computed)} computed, "
        f"{sum(r['how'] == 'cached' for r in done)} cached, "
        f"{sum(r['how'] == 'on disk' for r in done)} on disk, {len(rows) - len(done)} failed; "
        f"{sum(r.get('rows', 0) for r in done)} rows"
    )
    if computed:
        summary += f"; {rate:.2f} img/s where computed"
    if random_weights:
        summary += " (random weights: tiny-random labels are noise)"
    return summary


def stage_table(stage: str, rows: list[dict[str, Any]], random_weights: bool = False) -> str:
    """Create the stage's table artifact; returns the summary line used as its description."""
    summary = stage_summary(stage, rows, random_weights)
    table = [
        {
            "shard": f"shard-{r['shard']:05d}",
            "rows": r.get("rows"),
            "errors": r.get("errors"),
            "status": r.get("how") or "failed",
            "seconds": r.get("seconds"),
            "img/s": r.get("images_per_second"),
            "fingerprint": r.get("fingerprint"),
            "path": r.get("path") or r.get("failure"),
        }
        for r in sorted(rows, key=lambda r: r["shard"])
    ]
    create_table_artifact(table=table, key=f"unimrg-{stage}-shards", description=summary)
    return summary


class StageProgress:
    """A progress artifact for one stage, advanced once per finished shard.

    The artifact is updated at most every `every` seconds, and always at the last shard: each
    update is a request to the API, and a cached shard takes milliseconds.
    """

    def __init__(self, stage: str, total: int, every: float = 1.0):
        self.stage, self.total, self.done, self.every = stage, total, 0, every
        self.id = create_progress_artifact(
            progress=0.0 if total else 100.0,
            key=f"unimrg-{stage}-progress",
            description=f"{stage}: 0/{total} shards",
        )
        self._last = time.monotonic()

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.done < self.total and now - self._last < self.every:
            return
        self._last = now
        update_progress_artifact(
            self.id,
            progress=100.0 * self.done / max(1, self.total),
            description=f"{self.stage}: {self.done}/{self.total} shards",
        )


def thumbnail_uri(path: Path, side: int = THUMBNAIL_SIDE, budget: int = THUMBNAIL_BYTES) -> str:
    """A `data:` URI of the image at `path`, scaled to fit `side` and encoded in `budget` bytes.

    PNG when that fits (plots, label maps stay crisp), else JPEG at falling quality, then a
    smaller size, until it fits.
    """
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    for size in (side, side * 3 // 4, side // 2, side // 3, side // 4):
        thumb = im.copy()
        thumb.thumbnail((size, size))
        for fmt, quality in (("PNG", None), ("JPEG", 85), ("JPEG", 70), ("JPEG", 50)):
            buf = io.BytesIO()
            thumb.save(buf, format=fmt, **({"quality": quality} if quality else {"optimize": True}))
            if buf.tell() <= budget:
                break
        else:
            continue
        break
    mime = "png" if fmt == "PNG" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_artifact(path: Path, key: str, description: str) -> None:
    """An image artifact showing a thumbnail of `path`; the description names the file."""
    from prefect.artifacts import create_image_artifact

    create_image_artifact(
        image_url=thumbnail_uri(path), key=key, description=f"{description}\n\nFull size: `{path}`"
    )


def preview_markdown(path: Path, random_weights: bool, summaries: list[str]) -> None:
    """Markdown artifact with a thumbnail of the contact sheet and its full-size path."""
    note = (
        "\n\n**Random weights**: these labels come from `tiny-random` models and are noise."
        if random_weights
        else ""
    )
    lines = "\n".join(f"- {s}" for s in summaries)
    md = (
        f"# unimrg preview\n\nImage | depth target | segmentation target.{note}\n\n"
        f"![preview]({thumbnail_uri(path)})\n\nFull size: `{path}`\n\n{lines}\n"
    )
    create_markdown_artifact(
        markdown=md, key="unimrg-preview", description="image | depth | segment"
    )

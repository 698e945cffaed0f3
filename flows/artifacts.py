"""What the Prefect UI shows besides states: per-stage tables, progress bars, the preview sheet.

- `stage_table`: one table artifact per stage (key `unimrg-<stage>-shards`), a row per shard
  with its rows, errors, how it was obtained (`computed`, `cached` = Prefect cache hit,
  `on disk` = the task ran but found its label shard already written), seconds and images/s;
- `StageProgress`: one progress artifact per stage, updated as each shard finishes;
- `preview_markdown`: a markdown artifact embedding the contact sheet as a `data:` URI PNG
  (the Prefect UI renders data-URI images in markdown artifacts), scaled down to stay small,
  with the path of the full-size file.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

__all__ = ["StageProgress", "how_obtained", "preview_markdown", "stage_summary", "stage_table"]

#: Width of the embedded preview (pixels): keeps the artifact a few hundred KB at most.
PREVIEW_WIDTH = 960


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
    """A progress artifact for one stage, advanced once per finished shard."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.done = stage, total, 0
        self.id = create_progress_artifact(
            progress=0.0 if total else 100.0,
            key=f"unimrg-{stage}-progress",
            description=f"{stage}: 0/{total} shards",
        )

    def advance(self) -> None:
        self.done += 1
        update_progress_artifact(
            self.id,
            progress=100.0 * self.done / max(1, self.total),
            description=f"{self.stage}: {self.done}/{self.total} shards",
        )


def preview_markdown(path: Path, random_weights: bool, summaries: list[str]) -> None:
    """Markdown artifact with the contact sheet embedded as a PNG data URI."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > PREVIEW_WIDTH:
            im = im.resize((PREVIEW_WIDTH, round(im.height * PREVIEW_WIDTH / im.width)))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    note = (
        "\n\n**Random weights**: these labels come from `tiny-random` models and are noise."
        if random_weights
        else ""
    )
    lines = "\n".join(f"- {s}" for s in summaries)
    md = (
        f"# unimrg preview\n\nImage | depth target | segmentation target.{note}\n\n"
        f"![preview]({uri})\n\nFull size: `{path}`\n\n{lines}\n"
    )
    create_markdown_artifact(
        markdown=md, key="unimrg-preview", description="image | depth | segment"
    )

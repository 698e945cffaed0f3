"""The captions the `text_to_image` task reads, matched to the ingested images.

The manifest's `captions[i]` is a JSON list or JSONL file of records
`{"image": <path relative to image_root>, "caption": <text>}`; its `image_root` is ingested as
source `captions-<i>`, and each record's image is looked up as (source, path) exactly as the
understanding conversations' images are (`record_image`, trainer/understanding_data.py). A
record whose image is missing, quarantined, not ingested or outside its root, or whose caption
is not a non-empty string (`no_caption`), is skipped and counted in `CaptionSet.report` (where:
`.examples`). Used by `TrainData.build` (trainer/data.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.fingerprint import hash_files
from trainer.understanding_data import usable_records

if TYPE_CHECKING:
    from pipeline.manifest import Manifest
    from pipeline.shards import Layout
    from trainer.image_index import ImageIndex

__all__ = ["CaptionSet", "captions_hash", "load_captions"]


@dataclass
class CaptionSet:
    captions: list[str]
    #: global image row of each caption's image
    image_rows: np.ndarray
    report: dict[str, int]
    examples: dict[str, list[str]] = field(default_factory=dict)


def captions_hash(manifest: Manifest) -> str | None:
    """Hash of the caption files' contents (None when the manifest lists none)."""
    files = [manifest.resolve(c.path) for c in manifest.captions]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"captions[].path: not found: {', '.join(missing)}")
    return hash_files(files) if files else None


def _caption_problem(rec: Any) -> str | None:
    text = rec.get("caption") if isinstance(rec, dict) else None
    return None if isinstance(text, str) and text.strip() else "no_caption"


def load_captions(manifest: Manifest, layout: Layout, index: ImageIndex) -> CaptionSet:
    report: Counter = Counter()
    examples: dict[str, list[str]] = {}
    captions: list[str] = []
    rows: list[int] = []
    for rec, row in usable_records(
        manifest.captions,
        "captions",
        "records",
        manifest,
        layout,
        index,
        _caption_problem,
        report,
        examples,
    ):
        captions.append(rec["caption"].strip())
        rows.append(row)
    return CaptionSet(captions, np.asarray(rows, dtype=np.int64), dict(report), examples)

"""The understanding conversations a training run reads, matched to the ingested images.

`load_understanding` reads each `understanding[i].path` (JSON list or JSON lines); the
manifest's `understanding[i].image_root` is ingested as source `understanding-<i>`, and each
conversation's `image` is looked up as (source, path). One that is missing on disk, quarantined
by ingest, not ingested yet, outside its image_root, or whose turns are not usable (not objects,
no gpt turn) is skipped and counted in `UnderstandingSet.report` (where: `.examples`). Used by
`TrainData.build` (trainer/data.py).
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.input_files import json_lines, parse_json, read_text
from pipeline.shards import Layout, read_quarantine
from trainer.image_index import ImageIndex, norm_path

if TYPE_CHECKING:
    from pipeline.manifest import Manifest


@dataclass
class UnderstandingSet:
    conversations: list[list[dict[str, str]]]
    image_rows: np.ndarray
    report: dict[str, int]
    #: skip reason -> the first few places (`file:line` or `file[i]`) it was found
    examples: dict[str, list[str]] = field(default_factory=dict)


def _turns_problem(conv: Any) -> str | None:
    """Why a conversation cannot be trained on (a skip reason), or None."""
    if not isinstance(conv, list) or not conv:
        return "malformed"
    if not all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
        for t in conv
    ):
        return "malformed_turns"  # a turn that is not {"from": str, "value": str}
    if not any(t["from"] == "gpt" for t in conv):
        return "no_gpt_turn"  # nothing to learn from
    return None


def _inside(root: Path, rel: str) -> bool:
    try:
        (root / rel).resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(`file:line` or `file[i]`, record): JSON Lines, or one JSON list. Not UTF-8, not JSON
    or nested too deeply: InputError naming the file and line (pipeline/input_files.py)."""
    text = read_text(path)
    if path.suffix.lower() in (".jsonl", ".ndjson") or not text.lstrip().startswith("["):
        yield from json_lines(path, text)
    else:
        for i, rec in enumerate(parse_json(text, str(path))):
            yield f"{path}[{i}]", rec


def quarantined_paths(layout: Layout) -> set[tuple[str, str]]:
    """(source, path) of every input ingest quarantined."""
    return {
        (s, norm_path(p))
        for s, p in zip(
            *(read_quarantine(layout).column(c).to_pylist() for c in ("source", "path"))
        )
        if p is not None
    }


def record_image(
    rec: Any, index: ImageIndex, source: str, root: Path, quarantined: set[tuple[str, str]]
) -> tuple[int | None, str | None]:
    """(global image row, None) for a record's `image`, or (None, why it cannot be used):
    multi_image, text_only, malformed, outside_image_root, quarantined, not_ingested, missing.
    Shared by the understanding conversations and the captions (trainer/caption_data.py)."""
    img = rec.get("image") if isinstance(rec, dict) else None
    if isinstance(img, list):
        img = img[0] if len(img) == 1 else None
        if img is None:
            return None, "multi_image"
    if not img:
        return None, "text_only"
    if not isinstance(img, str):
        return None, "malformed"
    rel = norm_path(img)
    iid = index.by_path.get((source, rel))
    if iid is None or iid not in index.by_id:
        if not _inside(root, rel):
            return None, "outside_image_root"  # ingest only reads under image_root
        if (source, rel) in quarantined:
            return None, "quarantined"
        if (root / rel).is_file():
            return None, "not_ingested"
        return None, "missing"
    return index.by_id[iid], None


def usable_records(
    entries: list,
    what: str,
    count: str,
    manifest: Manifest,
    layout: Layout,
    index: ImageIndex,
    problem: Callable[[Any], str | None],
    report: Counter,
    examples: dict[str, list[str]],
) -> Iterator[tuple[Any, int]]:
    """(record, global image row) of every usable record in the files of `entries` (the
    manifest's `what[i]`, each with `path` and `image_root`, ingested as source `what-i`).

    Every record read counts in `report[count]`; one that `problem` names a reason for, or whose
    image `record_image` does not find, is left out and counted under that reason, with up to
    three places in `examples`; `report["used"]` counts the rest."""
    quarantined = quarantined_paths(layout)
    for i, entry in enumerate(entries):
        source, root = f"{what}-{i}", manifest.resolve(entry.image_root)
        path = manifest.resolve(entry.path)
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, f"{what}[{i}].path: no such file", str(path))
        for where, rec in read_records(path):
            report[count] += 1
            reason = problem(rec)
            if not reason:
                row, reason = record_image(rec, index, source, root, quarantined)
            if reason:
                report[reason] += 1
                if len(examples.setdefault(reason, [])) < 3:
                    examples[reason].append(where)
                continue
            report["used"] += 1
            yield rec, row
    report.setdefault("used", 0)


def _conversation_problem(rec: Any) -> str | None:
    conv = rec.get("conversations") if isinstance(rec, dict) else None
    img = rec.get("image") if isinstance(rec, dict) else None
    if isinstance(img, list) and len(img) != 1:
        return "multi_image"
    return _turns_problem(conv)


def load_understanding(manifest: Manifest, layout: Layout, index: ImageIndex) -> UnderstandingSet:
    report: Counter = Counter()
    examples: dict[str, list[str]] = {}
    convs: list[list[dict[str, str]]] = []
    rows: list[int] = []
    for rec, row in usable_records(
        manifest.understanding,
        "understanding",
        "conversations",
        manifest,
        layout,
        index,
        _conversation_problem,
        report,
        examples,
    ):
        convs.append(rec["conversations"])
        rows.append(row)
    return UnderstandingSet(convs, np.asarray(rows, dtype=np.int64), dict(report), examples)

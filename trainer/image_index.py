"""Every ingested image, indexed: global row number <-> (shard, row), image_id, (source, path).

`ImageIndex.build(layout)` reads the image shards' small columns (ids, sources, paths) and the
per-source path records (images/_sources/); the task streams (trainer/data.py), the
understanding conversations (trainer/understanding_data.py) and the captions
(trainer/caption_data.py) look their images up in it. `norm_path` is the one spelling of a
relative path they all compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq

from pipeline.shards import Layout, shard_number

__all__ = ["ImageIndex", "norm_path"]


def norm_path(p: str) -> str:
    """A recorded path in one spelling: forward slashes, no leading `./`."""
    return PurePosixPath(str(p).replace("\\", "/")).as_posix().removeprefix("./")


@dataclass
class ImageIndex:
    """Every image row: global row number <-> (shard number, row), image_id, (source, path)."""

    shards: dict[int, Path]
    image_ids: list[str]
    shard_no: np.ndarray
    row: np.ndarray
    by_id: dict[str, int]
    by_path: dict[tuple[str, str], str]

    @classmethod
    def build(cls, layout: Layout) -> ImageIndex:
        shards: dict[int, Path] = {}
        ids: list[str] = []
        shard_no: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        by_path: dict[tuple[str, str], str] = {}
        for path in layout.image_shards():
            n = shard_number(path)
            t = pq.read_table(path, columns=["image_id", "source", "image.path"])
            sid = t.column("image_id").to_pylist()
            for iid, src, p in zip(sid, t.column("source").to_pylist(), t.column(2).to_pylist()):
                if p is not None:
                    by_path.setdefault((src, norm_path(p)), iid)
            shards[n] = path
            ids.extend(sid)
            shard_no.append(np.full(len(sid), n, dtype=np.int32))
            rows.append(np.arange(len(sid), dtype=np.int32))
        # Every occurrence, duplicates included: a file stored once under another source still
        # resolves under its own (source, path).
        src_dir = layout.sources_dir
        for f in sorted(src_dir.glob("*.parquet")) if src_dir.is_dir() else []:
            t = pq.read_table(f, columns=["image_id", "source", "path"])
            for iid, src, p in zip(
                *(t.column(c).to_pylist() for c in ("image_id", "source", "path"))
            ):
                by_path[(src, norm_path(p))] = iid
        return cls(
            shards=shards,
            image_ids=ids,
            shard_no=np.concatenate(shard_no) if shard_no else np.zeros(0, np.int32),
            row=np.concatenate(rows) if rows else np.zeros(0, np.int32),
            by_id={iid: i for i, iid in enumerate(ids)},
            by_path=by_path,
        )

    def __len__(self) -> int:
        return len(self.image_ids)

"""Integrity checks: whether a shard on disk can be trusted, and what to do when it cannot.

A file that exists under its final name was written completely (temp then rename), but it can
still be wrong later: truncated or damaged by a disk or a copy, or made from an image shard
that has since been lost and replaced. So before a shard is reused:

- an image shard must open (footer), hold rows, and have a readable `image_id` column;
- a label shard must open, and be bound to its input: the image shard's content hash and row
  count are recorded in the label shard's Parquet key-value metadata when it is written
  (`input_binding`), and checked against the image shard now; its row count and `image_id`s
  must equal the image shard's, row by row (label shards written before the binding existed
  are trusted on the `image_id` check alone, since `image_id` is the hash of the image bytes).

A file that fails is moved aside into `_aside/` beside it (kept, never deleted, with a
`.why.txt` saying why) so that it is made again; `unimrg status` reports such files as
`corrupt` before anything moves them.

Usage:
    from pipeline.integrity import label_shard_problem
    label_shard_problem(label_path, image_shard)   # None when it can be reused, else the reason
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fingerprint import cached_file_hash
from pipeline.shards import METADATA_KEY, atomic_write_bytes

__all__ = [
    "ASIDE_DIR",
    "BINDING_ROWS",
    "BINDING_SHA256",
    "image_shard_problem",
    "input_binding",
    "label_shard_problem",
    "parquet_problem",
    "reuse_problem",
    "set_aside",
]

#: Keys of a label shard's `unimrg` metadata record (pipeline/shards.py) naming the image shard
#: it was made from.
BINDING_SHA256 = "input_sha256"
BINDING_ROWS = "input_rows"
BINDING_NAME = "input_shard"

#: Folder (beside the bad file) that bad files are moved into.
ASIDE_DIR = "_aside"

_READ_ERRORS = (OSError, pa.ArrowException, ValueError)


def input_binding(image_shard: str | Path) -> dict[str, Any]:
    """Metadata keys (for the label shard's `unimrg` record) that bind a label shard to the
    image shard it is made from."""
    image_shard = Path(image_shard)
    return {
        BINDING_SHA256: cached_file_hash(image_shard),
        BINDING_ROWS: pq.ParquetFile(image_shard).metadata.num_rows,
        BINDING_NAME: image_shard.name,
    }


def parquet_problem(path: Path) -> tuple[pq.ParquetFile | None, str | None]:
    """(opened file, None), or (None, why it cannot be opened)."""
    try:
        return pq.ParquetFile(path), None
    except _READ_ERRORS as exc:
        return None, f"unreadable Parquet ({type(exc).__name__}: {exc})"


def _image_ids(pf: pq.ParquetFile) -> list[str]:
    return pf.read(columns=["image_id"]).column(0).to_pylist()


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


@dataclass(frozen=True)
class _ImageShardFacts:
    """What the checks need of an image shard: why it cannot be trusted (or None), its rows and
    a digest of its `image_id`s in order. Small, so every shard of a run can stay memoised."""

    problem: str | None
    rows: int = 0
    ids_digest: str = ""


@functools.lru_cache(maxsize=1 << 16)
def _image_shard_facts_at(path: str, size: int, mtime_ns: int) -> _ImageShardFacts:
    pf, problem = parquet_problem(Path(path))
    if problem:
        return _ImageShardFacts(problem)
    if "image_id" not in pf.schema_arrow.names:
        return _ImageShardFacts("no image_id column")
    rows = pf.metadata.num_rows
    if rows == 0:
        return _ImageShardFacts("holds no rows")
    try:
        ids = _image_ids(pf)
    except _READ_ERRORS as exc:
        return _ImageShardFacts(f"image_id column unreadable ({type(exc).__name__}: {exc})")
    if len(ids) != rows:
        return _ImageShardFacts(f"footer says {rows} rows, image_id column has {len(ids)}")
    return _ImageShardFacts(None, rows, _ids_digest(ids))


def _image_shard_facts(path: Path) -> _ImageShardFacts:
    """`_ImageShardFacts`, read once per process for each (path, size, mtime_ns): the depth and
    the segment check of a shard share it, and so does the task that runs after the flow's
    check. Image shards are never rewritten; one replaced under the same name has another size
    or mtime (the rule the content-hash memo follows too, pipeline/fingerprint.py)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return _ImageShardFacts(f"unreadable Parquet ({type(exc).__name__}: {exc})")
    return _image_shard_facts_at(str(path), st.st_size, st.st_mtime_ns)


def image_shard_problem(path: Path) -> str | None:
    """Why the image shard at `path` cannot be trusted, or None."""
    return _image_shard_facts(path).problem


def label_shard_problem(label: Path, image_shard: Path) -> str | None:
    """Why the label shard `label` cannot be reused for `image_shard`, or None when it can.

    `image_shard` is assumed sound (check it with `image_shard_problem` first). Reads the
    label shard's footer and its `image_id` column; the image shard's rows and ids come from
    `_image_shard_facts` (read once per process), its content hash from the memo.
    """
    pf, problem = parquet_problem(label)
    if problem:
        return problem
    image = _image_shard_facts(image_shard)
    if image.problem:
        return f"its image shard cannot be trusted: {image.problem}"
    want_rows = image.rows
    try:
        kv = json.loads((pf.metadata.metadata or {}).get(METADATA_KEY, b"{}"))
    except ValueError as exc:
        return f"unreadable `unimrg` metadata ({exc})"
    if BINDING_SHA256 in kv:
        made_from = str(kv[BINDING_SHA256])
        now = cached_file_hash(image_shard)
        if made_from != now:
            return (
                f"made from a different {image_shard.name} (content hash {made_from[:12]}, "
                f"the image shard's is now {now[:12]})"
            )
        if str(kv.get(BINDING_ROWS, "")) != str(want_rows):
            return f"made from {kv.get(BINDING_ROWS, '?')} rows, the input has {want_rows}"
    if pf.metadata.num_rows != want_rows:
        return f"{pf.metadata.num_rows} rows, the image shard has {want_rows}"
    if "image_id" not in pf.schema_arrow.names:
        return "no image_id column"
    try:
        got = _image_ids(pf)
    except _READ_ERRORS as exc:
        return f"image_id column unreadable ({type(exc).__name__}: {exc})"
    if _ids_digest(got) == image.ids_digest:
        return None
    # They differ: read the image shard's ids to name the first row that does.
    want = _image_ids(pq.ParquetFile(image_shard))
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"row {i} is image {a[:12]}, the image shard's row {i} is {b[:12]}"
    return "image_id column differs from the image shard's"


def reuse_problem(label: Path, image_shard: Path) -> str | None:
    """Why `label` cannot be reused for `image_shard` ("missing" when it does not exist), or None.

    The one rule both the plain runner (pipeline/stage.py) and the Prefect flow (its cache
    refresh, flows/dag.py) apply, so a cache record never outlives a bad file.
    """
    if not label.exists():
        return "missing"
    return image_shard_problem(image_shard) or label_shard_problem(label, image_shard)


def set_aside(path: Path, reason: str) -> Path:
    """Move a bad file into `_aside/` beside it (kept, not deleted) with a note saying why."""
    folder = path.parent / ASIDE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    dest = folder / f"{path.name}.{stamp}"
    os.replace(path, dest)
    atomic_write_bytes(dest.with_name(dest.name + ".why.txt"), f"{path}: {reason}\n".encode())
    return dest

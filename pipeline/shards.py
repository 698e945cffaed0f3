"""Shard IO: the on-disk layout of the data contract, atomic Parquet writes, shard discovery.

Layout under the manifest's `output_dir` (see DESIGN.md, "Data layout"):

    images/shard-00000.parquet                  one row per unique image
    images/_sources/shard-00000.parquet         every (image_id, source, path) seen, dups included
    labels/<stage>/<fingerprint>/shard-00000.parquet   row-aligned with images/shard-00000
    quarantine/<name>.parquet                   inputs that could not be used, with the reason

A file that exists under its final name is complete: every write goes to a temporary name in the
same folder and is renamed into place (`os.replace`, atomic on POSIX).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "IMAGE_SCHEMA",
    "QUARANTINE_SCHEMA",
    "SOURCES_SCHEMA",
    "Layout",
    "atomic_build_dir",
    "atomic_write_bytes",
    "file_sha256",
    "read_quarantine",
    "shard_name",
    "shard_number",
    "write_parquet_atomic",
    "write_quarantine",
]

_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ],
    # Lets `datasets.load_dataset("parquet", ...)` decode the column as images.
    metadata={
        b"huggingface": b'{"info": {"features": {"image_id": {"dtype": "string", "_type": "Value"}, '
        b'"image": {"_type": "Image"}, "width": {"dtype": "int32", "_type": "Value"}, '
        b'"height": {"dtype": "int32", "_type": "Value"}, '
        b'"source": {"dtype": "string", "_type": "Value"}}}}'
    },
)

SOURCES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("path", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        # ingest only: "size:mtime_ns" of the file, so an unchanged bad file is not retried
        pa.field("file_key", pa.string()),
        pa.field("time", pa.timestamp("s", tz="UTC"), nullable=False),
    ]
)


def shard_name(n: int) -> str:
    return f"shard-{n:05d}.parquet"


def shard_number(path: str | Path) -> int:
    m = _SHARD_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path}: not a shard file name (expected shard-NNNNN.parquet)")
    return int(m.group(1))


@dataclass(frozen=True)
class Layout:
    """Paths of the data contract under one output directory."""

    root: Path

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def sources_dir(self) -> Path:
        return self.images_dir / "_sources"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    def image_shard(self, n: int) -> Path:
        return self.images_dir / shard_name(n)

    def sources_shard(self, n: int) -> Path:
        return self.sources_dir / shard_name(n)

    def label_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / "labels" / stage / fingerprint

    def label_shard(self, stage: str, fingerprint: str, n: int) -> Path:
        return self.label_dir(stage, fingerprint) / shard_name(n)

    def image_shards(self) -> list[Path]:
        """Complete image shards, in shard-number order."""
        return _list_shards(self.images_dir)

    def label_shards(self, stage: str, fingerprint: str) -> list[Path]:
        return _list_shards(self.label_dir(stage, fingerprint))

    def label_fingerprints(self, stage: str) -> list[str]:
        d = self.root / "labels" / stage
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def _list_shards(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    shards = [p for p in folder.iterdir() if _SHARD_RE.match(p.name)]
    return sorted(shards, key=shard_number)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _raise_disk_full(exc, path)
        raise


def _raise_disk_full(exc: BaseException, path: Path) -> None:
    """A full disk as an OSError(ENOSPC) that names the file being written (pyarrow's and
    `write`'s own errors often name no file)."""
    if isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left" in str(exc)):
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc


def atomic_build_dir(final: Path, build: Callable[[Path], None], marker: str) -> Path:
    """Make folder `final` at most once, atomically: `build(tmp)` fills a temporary sibling
    folder, which is then renamed into place. `final/marker` is the file whose presence says
    the folder is complete; when another process wins the race, its identical folder is kept.
    """
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.rename(tmp, final)
    except OSError:
        if not (final / marker).exists():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs) -> None:
    """Write a Parquet file so that it either exists complete under `path` or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, **kwargs)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _raise_disk_full(exc, path)
        raise


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_quarantine(layout: Layout, name: str, rows: list[dict]) -> Path | None:
    """Record unusable inputs in `quarantine/<name>.parquet`. Rows need `stage` and `reason`."""
    if not rows:
        return None
    now = int(time.time())
    cols = {f.name: [r.get(f.name) for r in rows] for f in QUARANTINE_SCHEMA if f.name != "time"}
    cols["time"] = [now] * len(rows)
    table = pa.table(cols, schema=QUARANTINE_SCHEMA)
    path = layout.quarantine_dir / f"{name}.parquet"
    write_parquet_atomic(table, path)
    return path


def read_quarantine(layout: Layout) -> pa.Table:
    """All quarantine records under the layout (an empty table when there are none)."""
    files = (
        sorted(layout.quarantine_dir.glob("*.parquet")) if layout.quarantine_dir.is_dir() else []
    )
    if not files:
        return QUARANTINE_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=QUARANTINE_SCHEMA) for f in files)


def iter_batches(
    path: Path, batch_size: int, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet file in record batches of at most `batch_size` rows."""
    yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)

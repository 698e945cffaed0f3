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
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "IMAGE_SCHEMA",
    "IMAGE_TYPE",
    "QUARANTINE_SCHEMA",
    "SOURCES_SCHEMA",
    "AtomicFile",
    "Layout",
    "atomic_build_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "dir_mode",
    "file_mode",
    "make_readable",
    "raise_disk_full",
    "read_unimrg_metadata",
    "with_unimrg_metadata",
    "file_sha256",
    "image_bytes",
    "image_field",
    "label_table",
    "with_hf_features",
    "read_quarantine",
    "shard_name",
    "shard_number",
    "write_parquet_atomic",
    "write_quarantine",
]

_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")

#: An image cell as Hugging Face `datasets` stores its `Image` feature: encoded bytes + a path.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def image_field(name: str) -> pa.Field:
    """A column of encoded images (PNG/JPEG bytes) that `datasets` decodes as `Image`."""
    return pa.field(name, IMAGE_TYPE)


def with_hf_features(schema: pa.Schema) -> pa.Schema:
    """`schema` with the `huggingface` key-value metadata `datasets` reads its features from
    (`datasets.Features.from_arrow_schema`): every `IMAGE_TYPE` column is an `Image`, so
    `load_dataset("parquet", data_files=...)` decodes it without a cast. Columns of other types
    are left out: `datasets` infers them from their Arrow type."""
    features: dict[str, Any] = {}
    for f in schema:
        if f.type == IMAGE_TYPE:
            features[f.name] = {"_type": "Image"}
        elif f.type in _HF_VALUES:
            features[f.name] = {"dtype": _HF_VALUES[f.type], "_type": "Value"}
    meta = dict(schema.metadata or {})
    meta[b"huggingface"] = json.dumps({"info": {"features": features}}).encode()
    return schema.with_metadata(meta)


_HF_VALUES = {
    pa.string(): "string",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.bool_(): "bool",
    pa.binary(): "binary",
}


def image_bytes(cell: Any) -> bytes | None:
    """The encoded bytes of an image cell: an `IMAGE_TYPE` struct (`{"bytes", "path"}`) or
    plain binary (label shards written before they carried `datasets` features)."""
    if cell is None or isinstance(cell, bytes):
        return cell
    return cell.get("bytes")


def label_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as a stage's `process` returns them (encoded images as bytes) -> a table of
    `schema`, the bytes of each `IMAGE_TYPE` column wrapped as `{"bytes": b, "path": None}`."""
    image_cols = [f.name for f in schema if f.type == IMAGE_TYPE]
    if image_cols:
        rows = [
            {
                **r,
                **{
                    c: {"bytes": r[c], "path": None} if isinstance(r.get(c), bytes) else r.get(c)
                    for c in image_cols
                },
            }
            for r in rows
        ]
    return pa.Table.from_pylist(rows, schema=schema)


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


def file_mode() -> int:
    """Mode of a new file as a plain `open()` would make it: 0o666 less the process umask
    (0o644 under the usual umask 022). `mkstemp` makes 0o600, which other users and service
    accounts on a shared filesystem cannot read."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Mode of a new folder as `os.mkdir` would make it: 0o777 less the umask (`mkdtemp`: 0o700)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    # Reading the umask from /proc avoids os.umask's set-and-restore, which races with threads
    # creating files meanwhile.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(folder: str | Path) -> None:
    """Give every file and folder under `folder` the mode a plain `open`/`mkdir` would: for what
    libraries write privately (safetensors' `model.safetensors` comes out 0600)."""
    folder = Path(folder)
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(folder, dmode)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            os.chmod(os.path.join(root, f), fmode)


class AtomicFile:
    """A file that appears under `path` complete or not at all: written to a temporary name in
    the same folder, then fsynced, given the umask's mode and renamed into place.

        with AtomicFile(path) as f:   # f: a binary file object
            f.write(data)

    or, for writers that live across calls (pipeline/stages/depth/overlap.py):
    `af = AtomicFile(path)`, write to `af.file`, then `af.commit()` or `af.abort()`. Every file
    the project writes goes through here (or is written by a plain `open`), so all of them get
    the same mode.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            os.fchmod(self.file.fileno(), file_mode())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException as exc:
            self.abort()
            raise_disk_full(exc, self.path)
            raise

    def abort(self) -> None:
        try:
            self.file.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
            raise_disk_full(exc, self.path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    with AtomicFile(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=str) + "\n").encode())


def raise_disk_full(exc: BaseException, path: Path) -> None:
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
        make_readable(tmp)  # mkdtemp makes it 0700; libraries may write 0600 files
        os.rename(tmp, final)
    except OSError:
        if not (final / marker).exists():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_parquet_atomic(
    table: pa.Table, path: Path, metadata: Mapping[str, Any] | None = None, **kwargs
) -> None:
    """Write a Parquet file so that it either exists complete under `path` or not at all.

    `metadata`: this project's key-value metadata for the file (see `with_unimrg_metadata`).
    """
    if metadata:
        table = table.replace_schema_metadata(with_unimrg_metadata(table.schema, metadata).metadata)
    with AtomicFile(path) as f:
        pq.write_table(table, f, **kwargs)


#: The Parquet key-value metadata key holding this project's record of a file (a JSON object).
METADATA_KEY = b"unimrg"


def with_unimrg_metadata(schema: pa.Schema, metadata: Mapping[str, Any]) -> pa.Schema:
    """`schema` with `metadata` merged into its `unimrg` key-value entry (JSON), other keys
    (the `huggingface` features) kept. The one place label shards get their provenance keys
    (fingerprint, model, ...): add a key by passing it in `metadata`."""
    current = dict(schema.metadata or {})
    record = json.loads(current.get(METADATA_KEY, b"{}"))
    record.update(metadata)
    current[METADATA_KEY] = json.dumps(record, sort_keys=True, default=str).encode()
    return schema.with_metadata(current)


def read_unimrg_metadata(path: str | Path) -> dict[str, Any]:
    """The `unimrg` key-value metadata of a Parquet file (empty when it has none)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}


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

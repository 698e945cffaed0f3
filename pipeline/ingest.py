"""Ingest: every source in the manifest -> append-only image shards, deduplicated by content.

    unimrg ingest -m data_manifest.yaml          (or: python -m pipeline.ingest MANIFEST)

What it guarantees (DESIGN.md, "Data layout"):
- one row per unique image in `images/shard-NNNNN.parquet`; `image_id` is the sha256 of the bytes;
- every occurrence of an image (duplicates included) is recorded as (image_id, source, path) in
  `images/_sources/`, so nothing about where an image came from is lost;
- shards are append-only: new images go to new shard numbers, existing files are never rewritten;
  a rerun with nothing new writes nothing;
- every file is decoded once; unusable ones go to `quarantine/` with the reason and the run goes on;
- kill-safe: an image shard is renamed into place before its source records, so after a kill the
  next run finds those images already stored and records them without storing them twice.

A file already recorded (same source, path, size and mtime) is not read again, which makes
reruns over large sources cheap.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import short_repr
from pipeline.images import IMAGE_EXTENSIONS, UnusableImage, inspect_image, use_pixel_limit
from pipeline.input_files import InputError, json_lines, lines, read_text
from pipeline.integrity import ASIDE_DIR, image_shard_problem, set_aside
from pipeline.locks import exclusive
from pipeline.manifest import GLOB_CHARS, Manifest, ManifestError, Source, split_glob
from pipeline.progress import progress_bar
from pipeline.shards import (
    IMAGE_SCHEMA,
    QUARANTINE_SCHEMA,
    SOURCES_SCHEMA,
    Layout,
    write_parquet_atomic,
    write_quarantine,
)

__all__ = ["IngestResult", "SourceCounts", "ingest", "iter_source", "read_sources"]

#: A shard file under its final name or set aside (`shard-00003.parquet.<time>`).
_ANY_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet(\..*)?$")

log = logging.getLogger("pipeline.ingest")


@dataclass
class IngestResult:
    new: int = 0
    duplicates: int = 0
    quarantined: int = 0
    skipped: int = 0  # already recorded by an earlier run, not read again
    #: Bad image or occurrence files moved aside (kept) this run, each with the reason.
    set_aside: list[str] = field(default_factory=list)
    #: Per source: files yielded and files not read (hidden, no or another extension).
    sources: dict[str, SourceCounts] = field(default_factory=dict)
    shards_written: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        done = self.new + self.duplicates + self.quarantined
        return done / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"ingest: {self.new} new, {self.duplicates} duplicate, {self.quarantined} quarantined, "
            f"{self.skipped} already ingested; {len(self.shards_written)} shard(s) written "
            f"({self.images_per_second:.1f} images/s)"
            + "".join(f"\n  set aside: {line}" for line in self.set_aside)
            + "".join(
                f"\n  source {name}: "
                + (f"{c.files} file(s)" if c.files else "no files at all (check its path)")
                + (f"; not read: {c.skipped()}" if c.skipped() else "")
                for name, c in self.sources.items()
                if not c.files or c.skipped()
            )
        )


@dataclass(frozen=True)
class Item:
    """One candidate image from a source. `key` identifies the file version (size, mtime)."""

    source: str
    path: str  # as recorded: relative to the source root where there is one
    key: str
    file: Path | None = None  # read lazily from disk
    data: bytes | None = None  # or already in memory (Parquet sources)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.file is not None
        return self.file.read_bytes()


def _file_key(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _safe_name(shown: str) -> str:
    """A recordable name: a file name that is not valid UTF-8 (Python keeps its bytes as
    surrogates) is written with those bytes escaped (`caf\\xe9.jpg`), the same every run."""
    try:
        shown.encode("utf-8")
        return shown
    except UnicodeEncodeError:
        return os.fsencode(shown).decode("utf-8", "backslashreplace")


def _disk_item(source: str, shown: str, p: Path) -> Item:
    try:
        key = _file_key(p)
    except OSError:
        key = "missing"
    return Item(source, _safe_name(shown), key, file=p)


@dataclass
class SourceCounts:
    """What a source held besides image files: reported in the ingest summary."""

    files: int = 0  # candidate files yielded
    hidden: int = 0  # names starting with "." (not read)
    no_extension: int = 0  # no file extension (not read)
    other_extension: int = 0  # an extension that is not an image's (not read)

    def skipped(self) -> str:
        parts = [
            f"{n} {what}"
            for n, what in (
                (self.hidden, "hidden"),
                (self.no_extension, "without an extension"),
                (self.other_extension, "with a non-image extension"),
            )
            if n
        ]
        return ", ".join(parts)


def _folder_files(root: Path, files: Iterator[Path], counts: SourceCounts) -> Iterator[Path]:
    """The image files among `files` (symlinked folders are never entered: pathlib's `**` and
    `rglob` do not descend into them, so a link loop cannot hang or repeat a file)."""
    for p in sorted(files):
        if not p.is_file():
            continue
        if p.name.startswith("."):
            counts.hidden += 1
        elif not p.suffix:
            counts.no_extension += 1
        elif p.suffix.lower() not in IMAGE_EXTENSIONS:
            counts.other_extension += 1
        else:
            yield p


def iter_source(
    src: Source, manifest: Manifest, counts: SourceCounts | None = None
) -> Iterator[Item]:
    """Yield the candidate images of one source in a stable order.

    A path that exists is taken literally, even with `[`, `?` or `*` in its name; only a path
    that does not exist is read as a glob pattern. Inside a folder or under `**`, symlinked
    folders are not followed (symlinked files are read); a symlinked folder named in the path
    itself is. `counts` (when given) is filled with what the source held besides images.
    """
    counts = counts if counts is not None else SourceCounts()
    for item in _iter_source(src, manifest, counts):
        counts.files += 1
        yield item


def _iter_source(src: Source, manifest: Manifest, counts: SourceCounts) -> Iterator[Item]:
    raw = src.path
    where = f"sources[{src.name}].path"
    path = manifest.resolve(raw)
    if GLOB_CHARS & set(raw) and not path.exists():
        base, rest = split_glob(str(path))
        if not base.is_dir():
            raise ManifestError(f"{where}: {base} (the folder before the pattern) does not exist")
        for p in _folder_files(base, base.glob(rest), counts):
            yield _disk_item(src.name, p.relative_to(base).as_posix(), p)
        return
    if path.is_dir():
        for p in _folder_files(path, path.rglob("*"), counts):
            yield _disk_item(src.name, p.relative_to(path).as_posix(), p)
    elif not path.exists():
        raise ManifestError(f"{where}: {path} does not exist")
    elif path.suffix.lower() == ".parquet":
        yield from _iter_parquet(src, path)
    elif path.suffix.lower() in (".txt", ".lst", ".list"):
        for _, line in lines(read_text(path)):  # "\n" only: a path may hold U+2028 or U+0085
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line) if Path(line).is_absolute() else path.parent / line
                yield _disk_item(src.name, line, p)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        for where, row in json_lines(path, expected="a JSON object with 'path' or 'image'"):
            try:
                entry = row["path"] if "path" in row else row["image"]
            except (KeyError, TypeError) as exc:
                raise InputError(
                    f"{where}: expected a JSON object with 'path' or 'image' ({exc})"
                ) from None
            if not isinstance(entry, str) or not entry:
                raise InputError(
                    f"{where}: 'path'/'image' must be a non-empty string, got "
                    f"{type(entry).__name__} {short_repr(entry)}"
                )
            p = Path(entry) if Path(entry).is_absolute() else path.parent / entry
            yield _disk_item(src.name, entry, p)
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        yield _disk_item(src.name, path.name, path)
    else:
        raise ManifestError(
            f"{where}: {path} is not a folder, glob, .txt/.jsonl list or .parquet file"
        )


def _image_column_ok(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return bool(names & {"bytes", "path"})
    return any(
        check(t)
        for check in (
            pa.types.is_binary,
            pa.types.is_large_binary,
            pa.types.is_string,
            pa.types.is_large_string,
        )
    )


def _iter_parquet(src: Source, path: Path) -> Iterator[Item]:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise ManifestError(
            f"sources[{src.name}].path: {path}: not a readable Parquet file ({exc})"
        ) from None
    if src.image_column not in pf.schema_arrow.names:
        raise ManifestError(
            f"sources[{src.name}].image_column: {path} has no column {src.image_column!r} "
            f"(columns: {pf.schema_arrow.names})"
        )
    col_type = pf.schema_arrow.field(src.image_column).type
    if not _image_column_ok(col_type):
        raise ManifestError(
            f"sources[{src.name}].image_column: {path}: column {src.image_column!r} is "
            f"{col_type}; expected binary (image bytes), string (a path) or "
            "struct<bytes, path>"
        )
    key = _file_key(path)
    row = 0
    batches = pf.iter_batches(columns=[src.image_column], batch_size=256)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as exc:
            raise ManifestError(f"{path}: unreadable from row {row} on ({exc})") from None
        if batch is None:
            return
        for value in batch.column(0).to_pylist():
            shown = f"{path.name}#row={row}"
            if isinstance(value, dict):
                data, inner = value.get("bytes"), value.get("path")
                if data is None and inner:
                    p = Path(inner) if Path(inner).is_absolute() else path.parent / inner
                    yield _disk_item(src.name, inner, p)
                else:
                    yield Item(src.name, inner or shown, f"{key}#{row}", data=data or b"")
            elif isinstance(value, bytes):
                yield Item(src.name, shown, f"{key}#{row}", data=value)
            elif isinstance(value, str):
                p = Path(value) if Path(value).is_absolute() else path.parent / value
                yield _disk_item(src.name, value, p)
            else:
                yield Item(src.name, shown, f"{key}#{row}", data=b"")
            row += 1


@dataclass
class _Checked:
    item: Item
    image_id: str | None = None
    data: bytes | None = None
    width: int = 0
    height: int = 0
    reason: str | None = None


def _check(item: Item, max_pixels: int) -> _Checked:
    try:
        data = item.read()
    except FileNotFoundError:
        return _Checked(item, reason="file not found")
    except OSError as exc:
        return _Checked(item, reason=f"unreadable: {exc.strerror or exc}")
    try:
        info = inspect_image(data, max_pixels)
    except UnusableImage as exc:
        return _Checked(item, reason=str(exc))
    return _Checked(item, hashlib.sha256(data).hexdigest(), data, info.width, info.height)


class _State:
    """What earlier runs left: stored image ids, recorded files, the next shard number.

    An image shard that fails its integrity check is moved aside (kept) first, and a recorded
    occurrence counts only while its image is actually stored, so the images of a lost or bad
    shard are ingested again. Shard numbers are never reused: the next one is past the highest
    ever written (each occurrence file names the image shard written with it, and label shards
    count too), so a label shard can never be taken for the labels of a different image shard.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self.set_aside: list[str] = []
        shards = []
        for s in layout.image_shards():
            problem = image_shard_problem(s)
            if problem:
                aside = set_aside(s, problem)
                self.set_aside.append(f"{s}: {problem} (moved to {aside})")
            else:
                shards.append(s)
        highest = [-1]
        self.image_ids: set[str] = set()
        for s in shards:
            self.image_ids.update(pq.read_table(s, columns=["image_id"]).column(0).to_pylist())
        self.recorded: set[tuple[str, str, str]] = set()
        src_files = (
            sorted(layout.sources_dir.glob("*.parquet")) if layout.sources_dir.is_dir() else []
        )
        for f in src_files:
            try:
                t = pq.read_table(f, columns=["image_id", "source", "path", "file_key"])
            except (OSError, pa.ArrowException) as exc:
                aside = set_aside(f, f"unreadable ({type(exc).__name__}: {exc})")
                self.set_aside.append(f"{f}: unreadable (moved to {aside})")
                continue
            if _WROTE_SHARD in (t.schema.metadata or {}):
                highest.append(int(t.schema.metadata[_WROTE_SHARD]))
            for image_id, *occurrence in zip(*(t.column(c).to_pylist() for c in t.column_names)):
                if image_id in self.image_ids:
                    self.recorded.add(tuple(occurrence))
        q = _ingest_quarantine(layout)
        self.recorded.update(q)
        self.next_shard = max(max(highest), highest_shard_on_disk(layout)) + 1


#: Occurrence-file metadata key: the image shard written together with it. Occurrence files
#: are never deleted, so the highest shard number ever written is remembered even when that
#: shard and its label shards are gone.
_WROTE_SHARD = b"unimrg.image_shard"


def highest_shard_on_disk(layout: Layout) -> int:
    """The highest shard number (-1 when none) of any image or label shard on disk, set aside
    ones included."""
    seen = [-1]
    folders = [layout.images_dir, layout.images_dir / ASIDE_DIR]
    for fp_dir in (layout.root / "labels").glob("*/*"):
        folders += [fp_dir, fp_dir / ASIDE_DIR]
    for folder in folders:
        if folder.is_dir():
            for p in folder.iterdir():
                m = _ANY_SHARD_RE.match(p.name)
                if m:
                    seen.append(int(m.group(1)))
    return max(seen)


def _ingest_quarantine(layout: Layout) -> set[tuple[str, str, str]]:
    files = (
        sorted(layout.quarantine_dir.glob("ingest-*.parquet"))
        if layout.quarantine_dir.is_dir()
        else []
    )
    out: set[tuple[str, str, str]] = set()
    for f in files:
        t = pq.read_table(f, schema=QUARANTINE_SCHEMA)
        for s, p, k in zip(*(t.column(c).to_pylist() for c in ("source", "path", "file_key"))):
            if k is not None:
                out.add((s, p, k))
    return out


_SOURCES_FILE_SCHEMA = SOURCES_SCHEMA.append(pa.field("file_key", pa.string(), nullable=False))


def _exclusive(layout: Layout):
    return exclusive(layout.root / ".ingest.lock", "another ingest is running")


def ingest(manifest: Manifest, progress: bool = True, workers: int | None = None) -> IngestResult:
    """Ingest every source of the manifest (understanding image roots included)."""
    layout = Layout(manifest.out)
    result = IngestResult()
    t0 = time.perf_counter()
    use_pixel_limit(manifest.max_image_pixels)
    with _exclusive(layout):
        for stale in [*layout.images_dir.glob(".*.tmp"), *layout.sources_dir.glob(".*.tmp")]:
            stale.unlink()  # left by a killed run; we hold the lock, so nobody is writing it
        state = _State(layout)
        result.set_aside = state.set_aside
        for line in state.set_aside:
            log.warning("ingest: %s; its images are ingested again", line)
        run_tag = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        items = []
        for src in manifest.all_sources():
            counts = SourceCounts()
            for it in iter_source(src, manifest, counts):
                if (it.source, it.path, it.key) in state.recorded:
                    result.skipped += 1
                else:
                    items.append(it)
            result.sources[src.name] = counts
        pending_rows: list[dict] = []
        pending_sources: list[dict] = []
        quarantine: list[dict] = []

        def flush() -> None:
            wrote: dict[bytes, bytes] = {}
            if pending_rows:
                n = state.next_shard
                path = layout.image_shard(n)
                write_parquet_atomic(pa.Table.from_pylist(pending_rows, schema=IMAGE_SCHEMA), path)
                result.shards_written.append(str(path))
                wrote[_WROTE_SHARD] = str(n).encode()
                state.next_shard += 1
                pending_rows.clear()
            if pending_sources:
                # Written after its image shard: a kill in between leaves images whose
                # occurrences the next run records again (as duplicates), never the reverse.
                schema = _SOURCES_FILE_SCHEMA.with_metadata(wrote)
                table = pa.Table.from_pylist(pending_sources, schema=schema)
                digest = hashlib.sha256(
                    "\n".join(
                        f"{r['source']}|{r['path']}|{r['file_key']}" for r in pending_sources
                    ).encode()
                ).hexdigest()[:16]
                write_parquet_atomic(table, layout.sources_dir / f"{run_tag}-{digest}.parquet")
                pending_sources.clear()

        with (
            progress_bar("ingest", len(items), progress) as advance,
            ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) + 2)) as pool,
        ):
            check = functools.partial(_check, max_pixels=manifest.max_image_pixels)
            for checked in _bounded_map(pool, check, items, ahead=4 * pool._max_workers):
                it = checked.item
                if checked.reason:
                    result.quarantined += 1
                    quarantine.append(
                        {
                            "stage": "ingest",
                            "source": it.source,
                            "path": it.path,
                            "reason": checked.reason,
                            "file_key": it.key,
                        }
                    )
                else:
                    if checked.image_id in state.image_ids:
                        result.duplicates += 1
                    else:
                        result.new += 1
                        state.image_ids.add(checked.image_id)
                        pending_rows.append(
                            {
                                "image_id": checked.image_id,
                                "image": {"bytes": checked.data, "path": it.path},
                                "width": checked.width,
                                "height": checked.height,
                                "source": it.source,
                            }
                        )
                    pending_sources.append(
                        {
                            "image_id": checked.image_id,
                            "source": it.source,
                            "path": it.path,
                            "file_key": it.key,
                        }
                    )
                    if len(pending_rows) >= manifest.shard_size:
                        flush()
                advance()
            flush()
        write_quarantine(layout, f"ingest-{run_tag}", quarantine)
    result.seconds = time.perf_counter() - t0
    if progress:
        print(result.summary())
    return result


def _bounded_map(pool: ThreadPoolExecutor, fn, items: list, ahead: int) -> Iterator:
    """`pool.map` in order, but with at most `ahead` items in flight.

    `Executor.map` submits everything at once, which would hold every file's bytes in memory
    on a large source.
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def read_sources(layout: Layout) -> pa.Table:
    """Every recorded occurrence (image_id, source, path), duplicates included."""
    files = sorted(layout.sources_dir.glob("*.parquet")) if layout.sources_dir.is_dir() else []
    if not files:
        return SOURCES_SCHEMA.empty_table()
    t = pa.concat_tables(pq.read_table(f, columns=SOURCES_SCHEMA.names) for f in files)
    # A rerun after a kill may record the same occurrence twice; callers want each once.
    return (
        t.group_by(SOURCES_SCHEMA.names)
        .aggregate([])
        .select(SOURCES_SCHEMA.names)
        .sort_by([("source", "ascending"), ("path", "ascending")])
        .cast(SOURCES_SCHEMA)
    )

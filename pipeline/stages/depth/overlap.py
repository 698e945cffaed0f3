"""How one image shard flows through the depth stage: reader, compute and writer threads.

`OverlappedShards` is a base class of `DepthStage` (pipeline/stages/depth/stage.py): its
`run_shard` runs the stage's own steps, declared below, on three threads:

    reader    (a thread)           `_read`: Parquet rows -> decoded, resized, normalised
                                   batches on the device (its own CUDA stream)
    compute   (the calling thread) `_compute`: forward pass, resize back, quantise, start
                                   the copy to pinned host memory
    writer    (a thread)           `_ShardWriter.consume`: PNG encoding in a thread pool, rows
                                   streamed in shard order as row groups into a temporary file
                                   that is renamed into place when complete

What travels between them: `Decoded` (its `Prepared` model batches and the rows that failed)
from the reader to compute, and one `DepthResult` per model batch from compute to the writer;
`result_rows` turns a result into label rows (here, and in `DepthStage.process`).

Bounded queues between the threads; a failure in any of them stops the others and is raised in
the calling thread, and the temporary file is removed. Where the compute thread waited goes to
`stats` (benchmarks/depth_throughput.py).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.depth_png import encode_pngs
from pipeline.shards import AtomicFile, label_table, raise_disk_full

__all__ = ["Decoded", "DepthResult", "OverlappedShards", "Prepared", "result_rows"]

# PNG bytes do not compress further; the small columns do.
_PARQUET_COMPRESSION = {
    "image_id": "snappy",
    "error": "snappy",
    "depth_png16": "none",
    "depth_min": "snappy",
    "depth_max": "snappy",
    "target": "none",
    "width": "snappy",
    "height": "snappy",
}
_ROW_GROUP = 64


@dataclass
class Prepared:
    """One model batch, ready on the device: rows `indices` of the shard, same input shape."""

    indices: list[int]
    sizes: list[tuple[int, int]]  # decoded (height, width) per row
    pixel_values: Any  # torch.Tensor (B, 3, h, w), model dtype, on the device


@dataclass
class Decoded:
    """What the reader makes of one planned chunk: model batches plus rows that failed."""

    batches: list[Prepared]
    errors: dict[int, str]


@dataclass
class DepthResult:
    """Depth for one model batch, on the host (or being copied there: wait on `event`)."""

    indices: list[int]
    sizes: list[tuple[int, int]]
    u16: Any  # flat torch uint16, all images concatenated
    u8: Any  # flat torch uint8
    min_max: Any  # (B, 2) float32
    event: Any = None  # torch.cuda.Event, or None on CPU
    errors: dict[int, str] = field(default_factory=dict)


class OverlappedShards:
    """`run_shard` with reading/decoding, the forward pass and writing overlapped.

    A base class of `DepthStage`, which provides the steps declared here (and `setup`,
    `output_schema`, `stats` from the stage contract and its fields).
    """

    #: Seconds the compute thread spent per phase, summed over shards (the stage's field).
    stats: dict[str, float]

    def _plan(self, widths: list[int], heights: list[int]) -> list[list[int]]:
        """Row indices in chunks, each read as one `Decoded`."""
        raise NotImplementedError

    def _read(self, table: pa.Table | pa.RecordBatch, indices: list[int]) -> Decoded:
        """Decode, resize and normalise rows `indices` of `table` on the device."""
        raise NotImplementedError

    def _compute(self, decoded: Decoded) -> list[DepthResult]:
        """The forward pass of each model batch, quantised and on its way to the host."""
        raise NotImplementedError

    @property
    def _device(self) -> Any:
        raise NotImplementedError

    @property
    def _on_cuda(self) -> bool:
        raise NotImplementedError

    def run_shard(
        self,
        image_shard: Path,
        out_path: Path,
        progress: Callable[[int], None] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[int, list[dict]]:
        """Label one image shard into `out_path` (its schema carrying `metadata`): a reader
        thread runs `_read` (Parquet read, decode, resize, normalise; on its own CUDA stream),
        the calling thread `_compute` (the forward pass), and a writer thread
        `_ShardWriter.consume` (PNG encoding in a thread pool, row groups in shard order).
        Returns (rows, error rows)."""
        import torch

        self.setup()
        table = pq.read_table(image_shard, columns=["image_id", "image", "width", "height"])
        ids = table.column("image_id").to_pylist()
        plan = self._plan(table.column("width").to_pylist(), table.column("height").to_pylist())
        stop = threading.Event()
        to_compute: queue.Queue = queue.Queue(maxsize=2)
        to_write: queue.Queue = queue.Queue(maxsize=8)
        side_stream = torch.cuda.Stream(self._device) if self._on_cuda else None

        def reader() -> None:
            try:
                with torch.cuda.stream(side_stream) if side_stream else nullcontext():
                    for chunk in plan:
                        item = self._read(table, chunk)
                        if side_stream:
                            side_stream.synchronize()
                        if not _put(to_compute, item, stop):
                            return
            except BaseException as exc:  # handed to the main thread
                _put(to_compute, _Failure(exc), stop)
                return
            _put(to_compute, None, stop)

        writer = _ShardWriter(out_path, ids, self.output_schema(metadata), progress)
        threads = [
            threading.Thread(target=reader, name="depth-reader", daemon=True),
            threading.Thread(
                target=writer.consume, args=(to_write, stop), name="depth-writer", daemon=True
            ),
        ]
        for t in threads:
            t.start()
        clock = _Clock(self.stats)
        try:
            while True:
                with clock("wait_input_s"):
                    item = to_compute.get()
                if item is None:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                if side_stream:
                    for b in item.batches:
                        b.pixel_values.record_stream(torch.cuda.current_stream(self._device))
                with clock("compute_s"):
                    results = self._compute(item)
                with clock("wait_output_s"):
                    for res in results:
                        if not _put(to_write, res, stop, writer):
                            raise writer.failure or RuntimeError("depth writer stopped")
            with clock("tail_s"):
                _put(to_write, None, stop, writer)
                threads[1].join()
            if writer.failure:
                raise writer.failure
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
            writer.abort()
        return writer.rows, writer.error_rows


class _Clock:
    """`with clock("name"):` adds the block's wall time to `stats["name"]`."""

    def __init__(self, stats: dict[str, float]):
        self.stats = stats
        self.name = ""

    def __call__(self, name: str) -> _Clock:
        self.name = name
        return self

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.stats[self.name] = self.stats.get(self.name, 0.0) + time.perf_counter() - self.t0


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(
    q: queue.Queue, item: Any, stop: threading.Event, writer: _ShardWriter | None = None
) -> bool:
    """Put unless the pipeline is stopping (a failed peer must not leave us blocked forever)."""
    while not stop.is_set() and not (writer and writer.failure):
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def result_rows(
    res: DepthResult, ids: list[str], submit: Callable[..., Future] | None = None
) -> Iterable[tuple[int, Any]]:
    """(row index, row dict or Future of one) for every row in a result."""
    for i, reason in res.errors.items():
        yield i, {"image_id": ids[i], "error": reason}
    if res.u16 is None:
        return
    if res.event is not None:
        res.event.synchronize()
    u16, u8, mm = res.u16.numpy(), res.u8.numpy(), res.min_max.numpy()
    off = 0
    for k, (i, (h, w)) in enumerate(zip(res.indices, res.sizes, strict=True)):
        a16 = u16[off : off + h * w].reshape(h, w)
        a8 = u8[off : off + h * w].reshape(h, w)
        off += h * w
        args = (ids[i], a16, a8, float(mm[k, 0]), float(mm[k, 1]), w, h)
        yield i, (submit(_make_row, *args) if submit else _make_row(*args))


def _make_row(
    image_id: str, u16: np.ndarray, u8: np.ndarray, mn: float, mx: float, w: int, h: int
) -> dict[str, Any]:
    png16, target = encode_pngs(u16, u8)
    return {
        "image_id": image_id,
        "error": None,
        "depth_png16": png16,
        "depth_min": mn,
        "depth_max": mx,
        "target": target,
        "width": w,
        "height": h,
    }


_fdatasync = getattr(os, "fdatasync", os.fsync)


class _ShardWriter:
    """Collects rows (encoded in a thread pool) and streams them, in shard order, as row groups
    into a temporary file that is renamed into place when complete."""

    def __init__(
        self, path: Path, ids: list[str], schema: pa.Schema, progress: Callable[[int], None] | None
    ):
        self.path, self.ids, self.schema, self.progress = path, ids, schema, progress
        self.pending: dict[int, Any] = {}
        self.next = 0
        self.rows = 0
        self.error_rows: list[dict] = []
        self.failure: BaseException | None = None
        self._out: AtomicFile | None = None
        self._writer: pq.ParquetWriter | None = None
        self._io: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []

    def consume(self, q: queue.Queue, stop: threading.Event) -> None:
        workers = max(1, min(16, (os.cpu_count() or 2)))
        try:
            # Parquet writes and fsyncs go to their own thread (FIFO, so in order): this loop
            # only hands out encodes and never waits on the disk, so the queue the compute
            # thread feeds keeps draining.
            with (
                ThreadPoolExecutor(workers, thread_name_prefix="depth-png") as pool,
                ThreadPoolExecutor(1, thread_name_prefix="depth-io") as self._io,
            ):
                while not stop.is_set():
                    try:
                        res = q.get(timeout=0.05)
                    except queue.Empty:
                        self._flush(final=False)  # rows whose encoding finished meanwhile
                        continue
                    if res is None:
                        self._flush(final=True)
                        # Every row group written before the file is committed: a failed write
                        # must fail the shard, not leave it complete-looking and short.
                        for write in self._writes:
                            write.result()
                        self._writes.clear()
                        self._io.submit(self._finish).result()
                        return
                    for i, row in result_rows(res, self.ids, pool.submit):
                        self.pending[i] = row
                    self._flush(final=False)
        except BaseException as exc:
            try:
                raise_disk_full(exc, self.path)  # name the shard (write() names no file)
            except OSError as named:
                exc = named
            self.failure = exc

    def _flush(self, final: bool) -> None:
        """Write the finished rows at the front of the shard, in row groups of `_ROW_GROUP`
        (at the end: all of them, waiting for their encoding)."""
        n = 0
        while (row := self.pending.get(self.next + n)) is not None and (
            final or not isinstance(row, Future) or row.done()
        ):
            n += 1
        if not final:
            n -= n % _ROW_GROUP
        for start in range(0, n, _ROW_GROUP):
            rows = [self.pending.pop(self.next + k) for k in range(min(_ROW_GROUP, n - start))]
            self._writes.append(self._io.submit(self._write_group, rows))
            self.next += len(rows)
        self._drain()
        if final and self.next != len(self.ids):
            raise RuntimeError(
                f"depth: {self.path.name}: {len(self.ids) - self.next} rows missing at row {self.next}"
            )

    def _drain(self) -> None:
        """Raise the first failed write; forget the finished ones."""
        while self._writes and self._writes[0].done():
            self._writes.pop(0).result()

    def _write_group(self, rows: list[Any]) -> None:
        self._write([r.result() if isinstance(r, Future) else r for r in rows])

    def _write(self, rows: list[dict]) -> None:
        if self._writer is None:
            self._out = AtomicFile(self.path)
            self._writer = pq.ParquetWriter(
                self._out.file,
                self.schema,
                compression=_PARQUET_COMPRESSION,
                use_dictionary=["error"],
            )
        self._writer.write_table(label_table(rows, self.schema))
        # Sync each row group while the GPU works, so the final fsync has little left to do.
        self._out.file.flush()
        _fdatasync(self._out.file.fileno())
        self.rows += len(rows)
        self.error_rows.extend(r for r in rows if r.get("error"))
        if self.progress:
            self.progress(len(rows))

    def _finish(self) -> None:
        if self._writer is None:  # an empty shard
            self._write([])
        self._writer.close()
        self._out.commit()
        self._out = None

    def abort(self) -> None:
        if self._out is not None:
            try:
                if self._writer is not None:
                    self._writer.close()
            except Exception:
                pass
            self._out.abort()
            self._out = None

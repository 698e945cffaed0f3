"""The label-stage contract and the plain-Python shard runner.

A stage is a dataclass whose fields are its parameters, in its own package
`pipeline/stages/<name>/` whose `__init__.py` names it in `STAGE = MyStage` (found by folder
name, see pipeline/stages/__init__.py):

    from_config(cfg, base_dir)  the stage from its manifest section `stages.<name>`; relative
                       paths in it resolve against `base_dir` (the manifest's folder)
    setup()            load the model once per worker (heavy imports happen here)
    process(batch)     map a pyarrow RecordBatch of image rows to a list of label rows,
                       one per input row, in order; a row that cannot be labelled comes back
                       as `{"image_id": ..., "error": "<reason>"}` and the rest are still labelled
    fingerprint()      hash of everything that changes the output (see pipeline/fingerprint.py)
    schema()           the label shard's Arrow schema; always has `image_id` and `error`

Optional, for the lineage record (`lineage.json` in the label folder, pipeline/lineage.py) and
the shards' Parquet key-value metadata: `fingerprint_parts()` (what `fingerprint()` hashes),
`model_lineage()` (model spec, resolved revision, weights hash), `key_parameters()` (what
`unimrg status` shows beside the hash) and `libraries` (distributions that compute the output).

`run_shard` turns one image shard into one label shard (atomic, row-aligned, bad rows
quarantined, bound to its input: pipeline/integrity.py). `run_stage` does that for every image
shard whose label shard is missing or cannot be trusted: the files are the cache, with or
without Prefect.

Usage (no orchestration at all):

    from pipeline.stage import build_stage, run_stage
    stage = build_stage("depth", manifest)
    run_stage(stage, Layout(manifest.out))
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.integrity import (
    image_shard_problem,
    input_binding,
    label_shard_problem,
    set_aside,
)
from pipeline.lineage import LINEAGE_FILE, ensure_lineage, library_versions
from pipeline.shards import (
    Layout,
    label_table,
    shard_number,
    with_unimrg_metadata,
    write_parquet_atomic,
    write_quarantine,
)
from pipeline.stages import available_stages, stage_class

if TYPE_CHECKING:
    from pipeline.manifest import Manifest

__all__ = ["LabelStage", "ShardResult", "build_stage", "run_shard", "run_stage", "STAGE_NAMES"]

#: The label stages there are: one package each in pipeline/stages/ (found by name, not imported).
STAGE_NAMES = tuple(available_stages())

log = logging.getLogger("pipeline.stage")

Progress = Callable[[int], None]
"""Called with the number of rows just finished."""


@dataclass(frozen=True)
class ShardResult:
    """What a (stage, shard) run produced: small enough to persist as a Prefect result."""

    stage: str
    shard: int
    path: str
    fingerprint: str
    rows: int
    errors: int
    computed: bool
    seconds: float
    #: Why an existing label shard was not reused (empty when there was none, or it was).
    note: str = ""

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.computed and self.seconds > 0 else 0.0


class LabelStage(ABC):
    name: ClassVar[str]
    version: ClassVar[str]
    #: Rows per `process` call.
    batch_size: int

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Any, base_dir: Path | None) -> LabelStage:
        """The stage from its manifest section `stages.<name>`; relative paths in it resolve
        against `base_dir`, the manifest's folder (`pipeline.config.resolve_path`)."""

    @abstractmethod
    def setup(self) -> None: ...

    @abstractmethod
    def fingerprint(self) -> str: ...

    @abstractmethod
    def schema(self) -> pa.Schema: ...

    @abstractmethod
    def process(self, batch: pa.RecordBatch) -> list[dict[str, Any]]: ...

    def uses_random_weights(self) -> bool:
        """True when labels come from `tiny-random` (reports must say so)."""
        return False

    #: Distributions whose code computes the output (their versions go into the lineage).
    libraries: ClassVar[tuple[str, ...]] = ("numpy", "pyarrow", "pillow")

    def fingerprint_parts(self) -> dict[str, Any] | None:
        """What `fingerprint()` hashes, when the stage exposes it (recorded in the lineage)."""
        return None

    def model_lineage(self) -> dict[str, Any] | None:
        """The model as loaded: `spec` (as configured), resolved `revision`, `weights` hash."""
        return None

    def key_parameters(self) -> dict[str, Any]:
        """The few parameters `unimrg status` shows beside the fingerprint."""
        return {}

    def parameters(self) -> dict[str, Any]:
        """Every parameter (the dataclass fields), JSON-safe."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {
            f.name: _json_safe(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.init and not f.name.startswith("_")
        }

    def lineage(self) -> dict[str, Any]:
        """The label folder's lineage record (pipeline/lineage.py), without `created`."""
        return {
            "kind": "labels",
            "stage": self.name,
            "stage_version": self.version,
            "fingerprint": self.fingerprint(),
            "model": self.model_lineage(),
            "parameters": self.parameters(),
            "key_parameters": self.key_parameters(),
            "covers": _json_safe(self.fingerprint_parts()),
            "random_weights": self.uses_random_weights(),
            "libraries": library_versions(self.libraries),
        }

    def shard_metadata(self) -> dict[str, Any]:
        """What every label shard carries in its Parquet key-value metadata (key `unimrg`), so
        a single file says where it came from. `run_shard` adds per-shard keys to it."""
        return {
            "stage": self.name,
            "stage_version": self.version,
            "fingerprint": self.fingerprint(),
            "model": self.model_lineage(),
            "random_weights": self.uses_random_weights(),
        }

    def output_schema(self, metadata: Mapping[str, Any] | None = None) -> pa.Schema:
        """`schema()` carrying `metadata` (see `shard_metadata`) as key-value metadata."""
        schema = self.schema()
        return with_unimrg_metadata(schema, metadata) if metadata else schema

    def run_shard(
        self,
        image_shard: Path,
        out_path: Path,
        progress: Progress | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[int, list[dict]]:
        """Label one image shard into `out_path`, its schema carrying `metadata`. Returns
        (rows, error rows).

        `metadata` is added to the file's Parquet key-value metadata (the binding to its input,
        pipeline/integrity.py). Stages may override this to overlap reading, compute and writing
        (see DepthStage).
        """
        rows: list[dict[str, Any]] = []
        pf = pq.ParquetFile(image_shard)
        for batch in pf.iter_batches(batch_size=self.batch_size):
            out = self.process(batch)
            if len(out) != batch.num_rows:
                raise RuntimeError(
                    f"{self.name}.process returned {len(out)} rows for {batch.num_rows} inputs"
                )
            rows.extend(out)
            if progress:
                progress(batch.num_rows)
        table = label_table(rows, self.output_schema(metadata))
        write_parquet_atomic(table, out_path)
        return len(rows), [r for r in rows if r.get("error")]


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_shard(
    stage: LabelStage,
    layout: Layout,
    image_shard: Path,
    force: bool = False,
    progress: Progress | None = None,
    setup: Callable[[], None] | None = None,
) -> ShardResult:
    """Make the label shard for one image shard unless a sound one already exists.

    An existing label shard is reused only when it passes `label_shard_problem` (it opens, it
    was made from this very image shard, its `image_id`s match row by row); otherwise it is
    moved aside (kept) and made again, and the result's `note` says why. `setup` is called
    just before computing (the model is not loaded for a shard that is reused).
    """
    n = shard_number(image_shard)
    fp = stage.fingerprint()
    out = layout.label_shard(stage.name, fp, n)
    bad_input = image_shard_problem(image_shard)
    if bad_input:
        raise ValueError(
            f"{image_shard}: {bad_input}; `unimrg ingest` sets a bad image shard aside and "
            "ingests its images again"
        )
    note = ""
    if out.exists() and not force:
        problem = label_shard_problem(out, image_shard)
        if problem is None:
            rows = pq.ParquetFile(out).metadata.num_rows
            return ShardResult(stage.name, n, str(out), fp, rows, 0, computed=False, seconds=0.0)
        aside = set_aside(out, problem)
        note = f"{out}: {problem}; moved to {aside} and recomputed"
        log.warning("%s", note)
    if setup is not None:
        setup()
    t0 = time.perf_counter()
    folder = layout.label_dir(stage.name, fp)
    if not (folder / LINEAGE_FILE).is_file():  # before the folder's first output
        ensure_lineage(folder, stage.lineage())
    # Where the shard came from (lineage) and what it was made from (the binding to its input
    # image shard, pipeline/integrity.py), in one `unimrg` metadata record.
    metadata = {**stage.shard_metadata(), **input_binding(image_shard)}
    rows, bad = stage.run_shard(image_shard, out, progress, metadata=metadata)
    write_quarantine(
        layout,
        f"{stage.name}-{fp}-shard-{n:05d}",
        [
            {
                "stage": stage.name,
                "image_id": r["image_id"],
                "reason": r["error"],
                "path": str(image_shard),
            }
            for r in bad
        ],
    )
    seconds = time.perf_counter() - t0
    return ShardResult(stage.name, n, str(out), fp, rows, len(bad), True, seconds, note)


def run_stage(
    stage: LabelStage, layout: Layout, force: bool = False, progress: bool = False
) -> list[ShardResult]:
    """Label every image shard that has no sound label shard under this fingerprint yet.

    `progress` shows a rich progress bar over images (with images/s) on the terminal.
    """
    shards = layout.image_shards()
    if not shards:
        return []
    stage.setup()
    if not progress:
        return [run_shard(stage, layout, s, force=force) for s in shards]
    from pipeline.progress import progress_bar

    total = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
    results = []
    with progress_bar(stage.name, total) as advance:
        for s in shards:
            r = run_shard(stage, layout, s, force=force, progress=advance)
            if not r.computed:
                advance(r.rows)
            results.append(r)
    return results


def build_stage(name: str, manifest: Manifest) -> LabelStage:
    """The configured stage `name` (a package in pipeline/stages/) from the manifest."""
    cfg = getattr(manifest.stages, name, None) if name in STAGE_NAMES else None
    if cfg is None:
        raise ValueError(f"stages.{name}: not configured in the manifest")
    from pipeline.images import use_pixel_limit

    use_pixel_limit(manifest.max_image_pixels)  # ingest let these images in under this limit
    return stage_class(name).from_config(cfg, manifest.base_dir)

"""The manifest: `data_manifest.yaml` parsed once into typed, validated objects.

Every field is documented by its `description` (the manifest reference in docs/manifest.md is
generated from these models, and a test checks the two agree). Paths are relative to the manifest
file. Any error names the field path and what was expected, for example:

    stages.depth.batch_size: expected a positive integer, got 'big'

Usage:
    from pipeline.manifest import load_manifest
    m = load_manifest("data_manifest.yaml")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator

from pipeline.config import PosFloat, PosInt, StrictConfig
from pipeline.stages import available_stages, stage_config_class

__all__ = [
    "ExecutorConfig",
    "Manifest",
    "ManifestError",
    "Source",
    "StagesConfig",
    "TrainerConfig",
    "UnderstandingSource",
    "load_manifest",
    "parse_manifest",
]


class ManifestError(ValueError):
    """A manifest that cannot be used. The message names the file, the field path and the problem."""


class Source(StrictConfig):
    """One place images come from."""

    name: str = Field(description="Name recorded in the `source` column of every image it gives.")
    path: str = Field(
        description="A folder (read recursively), a glob (`photos/**/*.jpg`), a text or JSONL list "
        "of paths (`.txt`, `.jsonl`, one per line; JSONL rows carry `path` or `image`), or a "
        "Parquet file with an image column. Relative to the manifest."
    )
    image_column: str = Field(
        "image",
        description="Parquet sources only: the column holding images (`{bytes, path}` structs, "
        "raw bytes, or path strings).",
    )


class UnderstandingSource(StrictConfig):
    """LLaVA-style conversation data for the understanding task."""

    path: str = Field(description="JSON list or JSONL of conversations. Relative to the manifest.")
    image_root: str = Field(
        description="Folder that the conversations' `image` paths are relative to. It is ingested "
        "like any other source (source name `understanding-<n>`)."
    )


class TrainerConfig(StrictConfig):
    """UniMRG post-training (four tasks, one model)."""

    adapter: str = Field(
        "janus",
        description="Model family adapter: the file trainer/adapters/<adapter>.py (built in: "
        "`janus`, for Janus and Janus-Pro).",
    )
    model: str = Field(
        "deepseek-community/Janus-Pro-1B",
        description="Hub id, local directory (relative to the manifest), or `tiny-random`.",
    )
    revision: str | None = Field(None, description="Hub revision for a hub id.")
    output_subdir: str = Field("train", description="Checkpoints go to <output_dir>/<this>/<fp>/.")
    loss_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "understanding": 1.0,
            "reconstruction": 1.0,
            "depth": 1.0,
            "segmentation": 1.0,
        },
        description="Per-task loss weight; a task with weight 0 is not read at all.",
    )
    sampler: Literal["round_robin", "weighted"] = Field(
        "round_robin",
        description="`round_robin`: one batch of every task per optimizer step (the paper); "
        "`weighted`: one task per micro-batch, drawn in proportion to loss_weights.",
    )
    batch_size: PosInt = Field(16, description="Samples per task per micro-batch per GPU.")
    grad_accum: PosInt = Field(1, description="Micro-batches accumulated per optimizer step.")
    lr: PosFloat = Field(1.0e-5, description="Peak AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    weight_decay: float = Field(0.02, ge=0, description="AdamW weight decay.")
    grad_clip: PosFloat = Field(1.0, description="Global gradient-norm clip.")
    warmup_ratio: float = Field(0.01, ge=0, le=1, description="Linear warmup, fraction of steps.")
    max_steps: PosInt = Field(2500, description="Optimizer steps.")
    uncond_rate: float = Field(
        0.1, ge=0, le=1, description="Reconstruction only: rate of dropping the prompt."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader processes per rank (0: in-process); none: $UNIMRG_TRAIN_WORKERS "
        "or min(8, CPUs per rank - 1). Does not change the fingerprint.",
    )
    trainable: list[str] = Field(
        default_factory=lambda: ["*"],
        description="fnmatch patterns of parameter names to train; the VQ model stays frozen.",
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Autocast dtype: `auto` is bfloat16 on CUDA and float32 on CPU."
    )
    save_every: PosInt = Field(500, description="Checkpoint every N optimizer steps.")
    keep_last: PosInt = Field(
        3, description="Checkpoints kept: the newest N, plus the final one (older are removed)."
    )
    eval_every: PosInt = Field(500, description="Write the generation probe every N steps.")
    log_every: PosInt = Field(10, description="Append losses to the JSONL log every N steps.")
    seed: int = Field(0, description="Seed for sampling, prompts and initialisation.")
    prompts: dict[str, list[str]] | None = Field(
        None,
        description="Override the prompt lists per task (reconstruction, depth, segmentation).",
    )

    @field_validator("adapter")
    @classmethod
    def _adapter_exists(cls, v: str) -> str:
        # Looked up by file, never imported here: pipeline/ stays free of torch at parse time.
        import importlib.util

        try:
            found = importlib.util.find_spec(f"trainer.adapters.{v}") is not None
        except (ImportError, ValueError):
            found = False
        if not v.isidentifier() or not found:
            raise ValueError(f"expected an adapter in trainer/adapters/ (e.g. 'janus'), got {v!r}")
        return v


class ExecutorConfig(StrictConfig):
    """Where per-shard tasks run."""

    kind: Literal["local", "dask"] = Field(
        "local", description="`local`: in the flow's process; `dask`: on a Dask cluster."
    )
    dask_address: str | None = Field(
        None, description="Scheduler address (`tcp://host:8786`); none starts a LocalCluster."
    )
    n_workers: PosInt = Field(2, description="LocalCluster worker processes (no address).")
    gpus_per_task: int = Field(1, ge=0, description="Dask `GPU` resource each GPU task needs.")


def _stages_config() -> type[StrictConfig]:
    """`stages`: one optional section per label stage file, typed by that file's `CONFIG` class
    (pipeline/stages/<name>.py), so adding a stage adds its manifest section."""
    fields = {
        name: (cfg | None, Field(None, description=cfg.section_description))
        for name in available_stages()
        for cfg in [stage_config_class(name)]
    }
    return create_model(
        "StagesConfig",
        __base__=StrictConfig,
        __doc__="The label stages to run; leave one out to skip it.",
        **fields,
    )


StagesConfig = _stages_config()


class Manifest(StrictConfig):
    """The one config a user edits."""

    version: Literal[1] = Field(1, description="Manifest format version; only 1 exists.")
    output_dir: Path = Field(description="Where shards, labels and checkpoints go.")
    shard_size: PosInt = Field(256, description="Images per image shard.")
    max_image_pixels: PosInt = Field(
        178_956_970,
        description="Images with more pixels than this are quarantined as decompression bombs "
        "(Pillow's own limit by default).",
    )
    sources: list[Source] = Field(description="Image sources, ingested in order.")
    stages: StagesConfig = Field(default_factory=StagesConfig, description="Label stages.")
    understanding: list[UnderstandingSource] = Field(
        default_factory=list, description="Understanding (QA) data for the trainer."
    )
    trainer: TrainerConfig | None = Field(None, description="Trainer settings; none skips train.")
    executor: ExecutorConfig = Field(
        default_factory=ExecutorConfig, description="Where per-shard tasks run."
    )
    base_dir: Path = Field(
        Path("."), exclude=True, description="(set by the loader) the manifest's own folder."
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[Source]) -> list[Source]:
        names = [s.name for s in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return v

    def resolve(self, p: str | Path) -> Path:
        """A path from the manifest, made absolute against the manifest's folder."""
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def out(self) -> Path:
        return self.resolve(self.output_dir)

    def all_sources(self) -> list[Source]:
        """Image sources plus one per understanding image root (they are ingested too)."""
        extra = [
            Source(name=f"understanding-{i}", path=u.image_root)
            for i, u in enumerate(self.understanding)
        ]
        return [*self.sources, *extra]


_EXPECT = {
    "greater_than_equal": "expected a number >= {ge}",
    "less_than_equal": "expected a number <= {le}",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
    "literal_error": "expected one of {expected}",
    "string_type": "expected a string",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
}


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    typ = err["type"]
    ctx = err.get("ctx") or {}
    if typ == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
    elif typ in _EXPECT:
        msg = _EXPECT[typ].format(**{"expected": "", **ctx})
    else:
        msg = err["msg"][0].lower() + err["msg"][1:]
    if typ not in ("missing", "extra_forbidden") and "input" in err:
        msg += f", got {err['input']!r}"
    return f"{loc}: {msg}" if loc else msg


def parse_manifest(data: Any, base_dir: str | Path = ".", origin: str = "<manifest>") -> Manifest:
    """Validate a parsed YAML document. Raises ManifestError naming the field path."""
    if not isinstance(data, dict):
        raise ManifestError(
            f"{origin}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        m = Manifest.model_validate({**data, "base_dir": Path(base_dir)})
    except ValidationError as exc:
        errors = exc.errors()
        lines = [_format_error(e) for e in errors]
        raise ManifestError(f"{origin}: " + "; ".join(lines)) from None
    return m


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file. Relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    return parse_manifest(data, base_dir=path.resolve().parent, origin=str(path))

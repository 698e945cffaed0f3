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

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from pipeline.config import PosFloat, PosInt, StrictConfig, resolve_path, short_repr
from pipeline.stages import available_stages, stage_config_class

__all__ = [
    "CaptionSource",
    "EvalBenchmark",
    "EvalConfig",
    "EvalProbes",
    "ExecutorConfig",
    "Manifest",
    "ManifestError",
    "Source",
    "StagesConfig",
    "TrainerConfig",
    "UnderstandingSource",
    "load_manifest",
    "parse_manifest",
    "source_root",
    "split_glob",
]


class ManifestError(ValueError):
    """A manifest that cannot be used. The message names the file, the field path and the problem."""


class Source(StrictConfig):
    """One place images come from."""

    name: str = Field(description="Name recorded in the `source` column of every image it gives.")
    path: str = Field(
        description="A folder (read recursively), a glob (`photos/**/*.jpg`), a text or JSONL list "
        "of paths (`.txt`, `.jsonl`, one per line; JSONL rows carry `path` or `image`), or a "
        "Parquet file with an image column. Relative to the manifest. A path that exists is "
        "taken literally even with `[ ? *` in it; symlinked folders inside a folder or under "
        "`**` are not followed (symlinked files are read)."
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


#: Characters that make a source path that does not exist a glob pattern.
GLOB_CHARS = frozenset("*?[")


def split_glob(pattern: str) -> tuple[Path, str]:
    """("/data/photos", "**/*.jpg") from "/data/photos/**/*.jpg": the folder before the
    first component with a wildcard, and the rest."""
    parts = Path(pattern).parts
    i = next(k for k, part in enumerate(parts) if GLOB_CHARS & set(part))
    return Path(*parts[:i]), "/".join(parts[i:])


def source_root(raw: str, resolved: Path) -> Path:
    """What a source reads from on disk: the folder before the pattern for a glob (a path that
    does not exist and has `* ? [` in it), else the folder or file itself."""
    if GLOB_CHARS & set(raw) and not resolved.exists():
        return split_glob(str(resolved))[0]
    return resolved


class CaptionSource(StrictConfig):
    """Captions for the `text_to_image` task: an image and the text that describes it."""

    path: str = Field(
        description='JSON list or JSONL of records `{"image": <path>, "caption": <text>}`. '
        "Relative to the manifest."
    )
    image_root: str = Field(
        description="Folder that the records' `image` paths are relative to. It is ingested like "
        "any other source (source name `captions-<n>`); it may be an understanding image root."
    )


#: The trainer's tasks, defined here once (the manifest checks them; trainer/data.py streams them).
TASKS = ("understanding", "reconstruction", "depth", "segmentation", "text_to_image")
#: Image-conditioned generation tasks (a prompt list, an unconditional rate).
GENERATION_TASKS = ("reconstruction", "depth", "segmentation")
#: A task left out of `trainer.loss_weights` keeps this weight: the released recipe trains the
#: four UniMRG tasks; text_to_image (not in it) is off unless asked for.
RELEASED_WEIGHTS = {
    "understanding": 1.0,
    "reconstruction": 1.0,
    "depth": 1.0,
    "segmentation": 1.0,
    "text_to_image": 0.0,
}
#: task -> the label stage whose rendered `target` it generates
TASK_STAGES = {"depth": "depth", "segmentation": "segment"}
#: Released UniMRG recipe (official code on Harmon): unconditional rate and target resampling.
RELEASED_UNCOND_RATE = {"reconstruction": 0.1, "depth": 0.0, "segmentation": 0.0}
RELEASED_TARGET_RESAMPLE = {"depth": "bicubic", "segmentation": "nearest"}


def _task_map(v: Any, known: tuple[str, ...], what: str) -> dict:
    if not isinstance(v, dict):
        raise ValueError("expected a mapping")
    unknown = [k for k in v if k not in known]
    if unknown:
        raise ValueError(f"unknown {what} {short_repr(unknown)}, known: {list(known)}")
    return v


#: Folders unimrg itself writes directly under output_dir: no configured subfolder may be one.
RESERVED_SUBDIRS = ("images", "labels", "quarantine")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _plain_subdir(v: str) -> str:
    """A folder name directly under output_dir: no `/`, no `..`, not `.`, not hidden, not empty,
    not one of unimrg's own folders. `unimrg clean` removes folders below it, so a path here
    (`../victim`, `/etc`, `.`) would point clean at folders that are not unimrg's."""
    if not _PLAIN_NAME.fullmatch(v) or v in (".", ".."):
        raise ValueError(
            "expected a single plain folder name (letters, digits, '_', '-', '.'; no '/', "
            "not '.' or '..', not hidden)"
        )
    if v in RESERVED_SUBDIRS:
        raise ValueError(f"is one of unimrg's own folders {list(RESERVED_SUBDIRS)}")
    return v


class TrainerConfig(StrictConfig):
    """UniMRG post-training (four tasks, one model)."""

    adapter: str = Field(
        "janus",
        description="Model family adapter: the package trainer/adapters/<adapter>/ (one per "
        "family: `janus` for Janus / Janus-Pro, `emu3` for Emu3; docs/trainer.md).",
    )
    model: str = Field(
        "deepseek-community/Janus-Pro-1B",
        description="Hub id, local directory (relative to the manifest), or `tiny-random`.",
    )
    revision: str | None = Field(None, description="Hub revision for a hub id.")
    image_size: PosInt | None = Field(
        None,
        description="Side of the square training images, px; none: the model's own (Janus: its "
        "vision encoder's, the only one it takes; Emu3: 512, or the largest that fits a "
        "condition plus a target image in the context). A size that does not fit is refused.",
    )
    output_subdir: str = Field(
        "train",
        description="Checkpoints go to <output_dir>/<this>/<fp>/; a single plain folder name "
        "(no `/`, not `.`/`..`, not images/labels/quarantine).",
    )
    loss_weights: dict[str, float] = Field(
        default_factory=lambda: dict(RELEASED_WEIGHTS),
        description="Per-task loss weight (understanding, reconstruction, depth, segmentation, "
        "text_to_image); a task left out keeps its released weight (1.0 for the four UniMRG "
        "tasks, 0 for text_to_image, which the released recipe does not train), so "
        "`{depth: 0.5}` trains the four; set a task to 0 to turn it off (it is then not read at "
        "all). text_to_image (caption -> image, no condition image) reads `captions:`.",
    )
    sampler: Literal["round_robin", "weighted"] = Field(
        "round_robin",
        description="`round_robin`: one batch of every task per optimizer step (the paper); "
        "`weighted`: one task per micro-batch, drawn in proportion to loss_weights.",
    )
    batch_size: PosInt = Field(16, description="Samples per task per micro-batch per GPU.")
    grad_accum: PosInt = Field(1, description="Micro-batches accumulated per optimizer step.")
    lr: PosFloat = Field(1.0e-5, description="Peak AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1).")
    weight_decay: float = Field(0.02, ge=0, description="AdamW weight decay.")
    grad_clip: PosFloat = Field(1.0, description="Global gradient-norm clip.")
    warmup_ratio: float = Field(0.01, ge=0, le=1, description="Linear warmup, fraction of steps.")
    max_steps: PosInt = Field(2500, description="Optimizer steps.")
    uncond_rate: dict[str, float] = Field(
        default_factory=lambda: dict(RELEASED_UNCOND_RATE),
        description="Per generation task, the rate of dropping its prompt (the image is kept). "
        "Released: reconstruction 0.1, depth and segmentation 0. Tasks left out keep these "
        "defaults; a bare number sets reconstruction's rate.",
    )
    generation_resize: Literal["stretch", "pad"] = Field(
        "stretch",
        description="Generation condition images and targets to the square: `stretch` (resize, "
        "no padding; released UniMRG code) or `pad` (fit the long side, pad like understanding).",
    )
    understanding_resize: Literal["pad", "stretch"] = Field(
        "pad",
        description="Understanding images to the square: `pad` (fit the long side, pad with "
        "`pad_color`; released code and Janus's processor) or `stretch`.",
    )
    pad_color: tuple[int, int, int] | None = Field(
        None,
        description="RGB 0-255 padding understanding images; none: the processor's background "
        "colour (Janus: the image mean x 255, as `JanusImageProcessor`).",
    )
    image_resample: Literal["nearest", "bilinear", "bicubic"] = Field(
        "bicubic", description="Resampling of input images (released code: bicubic)."
    )
    target_resample: dict[str, Literal["nearest", "bilinear", "bicubic"]] = Field(
        default_factory=lambda: dict(RELEASED_TARGET_RESAMPLE),
        description="Resampling of depth / segmentation targets. Released: depth bicubic, "
        "segmentation nearest (edge maps stay binary, one pixel wide). Tasks left out keep these.",
    )
    condition_grad_scale: float = Field(
        0.1,
        ge=0,
        description="Factor on the gradient flowing from every loss back into the understanding "
        "encoder's output features; the forward pass is unchanged (released `grad_scale`: 0.1; "
        "1: plain backprop, 0: encoder gets no gradient through its features).",
    )
    encoder_lr_scale: float = Field(
        1.0,
        ge=0,
        description="Learning-rate factor of the understanding encoder's parameters (Janus: "
        "SigLIP and the aligner; its own AdamW groups, same schedule). 1: the released recipe. "
        "Unlike condition_grad_scale, which AdamW cancels when every gradient into the encoder "
        "passes through the scaled point (Janus), it acts on any adapter with a trainable "
        "encoder; refused for one without (Emu3: images enter as frozen VQ codes).",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Across ranks: `ddp` (every rank holds the whole model and AdamW state, "
        "gradients all-reduced) or `fsdp` (FSDP2: weights, gradients and optimizer state "
        "sharded per decoder layer, bf16 gathers with fp32 reduction on CUDA, checkpoints "
        "through torch.distributed.checkpoint; for 7B/8B models, docs/trainer.md).",
    )
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
    probe_temperature: float = Field(
        1.0, ge=0, description="Probe sampling temperature (0: greedy; Janus's default: 1)."
    )
    probe_cfg_weight: float | None = Field(
        None,
        ge=0,
        description="Probe classifier-free guidance weight, for tasks trained unconditionally too "
        "(uncond rate > 0); none: the family's own (Janus 5, Emu3 3); 1: no guidance.",
    )
    log_every: PosInt = Field(10, description="Append losses to the JSONL log every N steps.")
    seed: int = Field(0, description="Seed for sampling, prompts and initialisation.")
    prompts: dict[str, list[str]] | None = Field(
        None,
        description="Override the prompt lists per task (reconstruction, depth, segmentation).",
    )

    @field_validator("loss_weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> dict:
        v = _task_map(v, TASKS, "tasks")
        bad = {
            k: w
            for k, w in v.items()
            if isinstance(w, bool)
            or not isinstance(w, int | float)
            or not math.isfinite(w)
            or w < 0
        }
        if bad:
            raise ValueError(f"expected numbers >= 0 per task (finite), got {short_repr(bad)}")
        # Left out means the released weight, never silently off.
        weights = {t: float(v.get(t, RELEASED_WEIGHTS[t])) for t in TASKS}
        if not any(w > 0 for w in weights.values()):
            raise ValueError("every task has weight 0, nothing would train")
        return weights

    @field_validator("uncond_rate", mode="before")
    @classmethod
    def _uncond(cls, v: Any) -> dict:
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = {"reconstruction": v}
        v = _task_map(v, GENERATION_TASKS, "generation tasks")
        for k, r in v.items():
            if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r <= 1:
                raise ValueError(f"{k}: expected a rate in [0, 1], got {short_repr(r)}")
        return {**RELEASED_UNCOND_RATE, **{k: float(r) for k, r in v.items()}}

    @field_validator("target_resample", mode="before")
    @classmethod
    def _resample(cls, v: Any) -> dict:
        return {**RELEASED_TARGET_RESAMPLE, **_task_map(v, tuple(TASK_STAGES), "label tasks")}

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("expected two numbers in [0, 1)")
        return v

    @field_validator("output_subdir")
    @classmethod
    def _subdir(cls, v: str) -> str:
        return _plain_subdir(v)

    @field_validator("pad_color")
    @classmethod
    def _rgb(cls, v):
        if v is not None and not all(0 <= c <= 255 for c in v):
            raise ValueError(f"expected three integers 0-255, got {list(v)}")
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v):
        if v is None:
            return v
        _task_map(v, GENERATION_TASKS, "generation tasks")
        empty = [k for k, lst in v.items() if not lst or not all(isinstance(p, str) for p in lst)]
        if empty:
            raise ValueError(f"{empty}: expected a non-empty list of prompt strings")
        return v

    def check_against(self, manifest: Manifest) -> list[str]:
        """Problems of these settings with the rest of the manifest: `field: message` lines."""
        errors = []
        for task, stage in TASK_STAGES.items():
            if self.loss_weights[task] > 0 and getattr(manifest.stages, stage) is None:
                errors.append(
                    f"trainer.loss_weights.{task}: is {self.loss_weights[task]} but stages.{stage}"
                    f" is not configured; configure stages.{stage} or set "
                    f"trainer.loss_weights.{task}: 0"
                )
        if self.loss_weights["understanding"] > 0 and not manifest.understanding:
            errors.append(
                f"trainer.loss_weights.understanding: is {self.loss_weights['understanding']} but "
                "`understanding:` lists no conversation data; add it or set "
                "trainer.loss_weights.understanding: 0"
            )
        if self.loss_weights["text_to_image"] > 0 and not manifest.captions:
            errors.append(
                f"trainer.loss_weights.text_to_image: is {self.loss_weights['text_to_image']} but "
                "`captions:` lists no caption data; add it or set "
                "trainer.loss_weights.text_to_image: 0"
            )
        return errors

    @field_validator("adapter")
    @classmethod
    def _adapter_exists(cls, v: str) -> str:
        # Looked up by folder, never imported here: pipeline/ stays free of torch at parse time.
        # A family is a package (`trainer/adapters/<name>/`); a module there (common.py) is not.
        import importlib.util

        try:
            spec = importlib.util.find_spec(f"trainer.adapters.{v}")
        except (ImportError, ValueError):
            spec = None
        if not v.isidentifier() or spec is None or spec.submodule_search_locations is None:
            raise ValueError(
                f"expected an adapter in trainer/adapters/ (e.g. 'janus'), got {short_repr(v)}"
            )
        return v


class EvalBenchmark(StrictConfig):
    """One benchmark file in VLMEvalKit's TSV layout (docs/eval.md says where to get each)."""

    name: str = Field(
        description="Name in tables, task names and out/eval/<fp>/<name>/ (letters, digits, "
        "`-`, `_`, `.`)."
    )
    path: str = Field(description="The TSV file, relative to the manifest; read locally only.")
    kind: Literal["mcq", "yesno", "mmvp", "pope", "hallusionbench"] = Field(
        description="How replies are read and scored: multiple choice (`mcq`, `mmvp`: pairs) "
        "or yes/no (`yesno`, `pope`, `hallusionbench`)."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"expected letters, digits, '-', '_' or '.', got {short_repr(v)}")
        return v


class EvalProbes(StrictConfig):
    """Built-in probes on held-out ingested images (need no download)."""

    spatial: bool = Field(
        True,
        description="The 'which marked object is closer?' probe from the depth and segment "
        "labels, scored as `mcq` (agreement with the pseudo-labeller).",
    )
    generation: bool = Field(
        True,
        description="Generate depth, segmentation and the image itself for the held-out images; "
        "score depth AbsRel / delta<1.25, boundary F-score and PSNR against the labels.",
    )
    max_questions: PosInt = Field(
        200, description="Spatial probe: at most this many questions (two per image at most)."
    )


class EvalConfig(StrictConfig):
    """Evaluation: the base model and post-trained checkpoints scored side by side."""

    benchmarks: list[EvalBenchmark] = Field(
        default_factory=list, description="Benchmark files to score (VLMEvalKit TSV layout)."
    )
    models: Literal["final", "all"] = Field(
        "final",
        description="Besides the base model: `final` scores the latest checkpoint, `all` every "
        "saved checkpoint.",
    )
    max_new_tokens: PosInt = Field(16, description="Greedy reply length limit, in tokens.")
    batch_size: PosInt = Field(
        16, description="Questions per generation batch (does not change the fingerprint)."
    )
    held_out_images: int = Field(
        0,
        ge=0,
        description="Ingested images kept out of training for the probes: the N whose "
        "sha256('held-out:' + image_id) sort first (0: none; the probes then do not run).",
    )
    probes: EvalProbes = Field(default_factory=EvalProbes, description="Built-in probes.")
    output_subdir: str = Field(
        "eval",
        description="Results go to <output_dir>/<this>/<fp>/; a single plain folder name "
        "(no `/`, not `.`/`..`, not images/labels/quarantine, not trainer.output_subdir).",
    )

    @field_validator("output_subdir")
    @classmethod
    def _subdir(cls, v: str) -> str:
        return _plain_subdir(v)

    @field_validator("benchmarks")
    @classmethod
    def _unique_benchmarks(cls, v: list[EvalBenchmark]) -> list[EvalBenchmark]:
        counts = Counter(b.name for b in v)
        dup = {n for n, c in counts.items() if c > 1 or n in ("spatial", "generation")}
        if dup:
            raise ValueError(
                f"benchmark names must be unique and not 'spatial'/'generation' (the probes), "
                f"got {sorted(dup)}"
            )
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
    tasks_in_flight: PosInt = Field(
        2,
        description="`local`: label tasks of one stage submitted at once, the next as one "
        "finishes (a process computes one shard per stage at a time; the second does its cache "
        "lookup meanwhile). They run on a pool of (label stages x this) threads, so the threads "
        "and memory of `unimrg run` do not grow with the number of shards. On Dask every task "
        "is submitted and the workers' threads bound what runs.",
    )
    torch_threads: PosInt | None = Field(
        None,
        description="CPU threads torch uses in each process that runs label tasks (the flow's "
        "process, each Dask worker); none: the CPU cores divided by the label tasks that "
        "process computes at once (the label stages, locally; a Dask worker's threads), at "
        "least 1. Several Dask workers on one host: set cores / workers.",
    )


def _stages_config() -> type[StrictConfig]:
    """`stages`: one optional section per label stage package, typed by its `CONFIG` class
    (pipeline/stages/<name>/__init__.py), so adding a stage adds its manifest section."""
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
    output_dir: Path = Field(
        description="Where shards, labels and checkpoints go. Not `/`, not the home folder, and "
        "not overlapping any source or understanding image_root (neither inside one nor "
        "holding one): the tool's own outputs must never be ingested."
    )
    shard_size: PosInt = Field(256, description="Images per image shard.")
    max_image_pixels: PosInt = Field(
        178_956_970,
        description="Images with more pixels than this are quarantined as decompression bombs "
        "(Pillow's own limit by default); it replaces Pillow's limit, lower or higher.",
    )
    sources: list[Source] = Field(description="Image sources, ingested in order.")
    stages: StagesConfig = Field(default_factory=StagesConfig, description="Label stages.")
    understanding: list[UnderstandingSource] = Field(
        default_factory=list, description="Understanding (QA) data for the trainer."
    )
    captions: list[CaptionSource] = Field(
        default_factory=list,
        description="Caption data for the trainer's text_to_image task (off unless "
        "trainer.loss_weights.text_to_image > 0).",
    )
    trainer: TrainerConfig | None = Field(None, description="Trainer settings; none skips train.")
    eval: EvalConfig | None = Field(
        None, description="Evaluation of the base model and checkpoints; none skips eval."
    )
    executor: ExecutorConfig = Field(
        default_factory=ExecutorConfig, description="Where per-shard tasks run."
    )
    base_dir: Path = Field(
        Path("."), exclude=True, description="(set by the loader) the manifest's own folder."
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[Source]) -> list[Source]:
        dup = {n for n, c in Counter(s.name for s in v).items() if c > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return v

    @model_validator(mode="after")
    def _trainer_fits(self):
        if self.trainer is not None:
            errors = self.trainer.check_against(self)
            if errors:
                raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _output_dir_is_its_own(self):
        errors = self.output_dir_problems()
        if self.trainer is not None and self.eval is not None:
            if self.trainer.output_subdir == self.eval.output_subdir:
                errors.append(
                    f"eval.output_subdir: {self.eval.output_subdir!r} is also "
                    "trainer.output_subdir; give them different folders"
                )
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def output_dir_problems(self) -> list[str]:
        """Why output_dir cannot be used, as `output_dir: ...` lines: `/`, the home folder, or
        a folder overlapping a source (one inside the other, either way round: ingest would
        read unimrg's own outputs back as images, or `clean` would look among a source's
        files). Paths are compared after resolving symlinks."""
        out = Path(os.path.realpath(self.out))
        where = f"output_dir: {self.output_dir}"
        if out == Path(out.anchor):
            return [f"{where}: is the filesystem root; use a folder of its own"]
        try:
            home = Path(os.path.realpath(Path.home()))
        except (RuntimeError, KeyError):  # no home folder known
            home = None
        if out == home:
            return [f"{where}: is the home folder; use a folder of its own inside it"]
        errors = []
        fields = [(f"sources.{i}.path", s.name, s.path) for i, s in enumerate(self.sources)]
        fields += [
            (f"understanding.{i}.image_root", f"understanding-{i}", u.image_root)
            for i, u in enumerate(self.understanding)
        ]
        seen: dict[str, Path] = {}  # many sources may share a path: resolve each once
        for field_path, name, raw in fields:
            if raw not in seen:
                seen[raw] = Path(os.path.realpath(source_root(raw, self.resolve(raw))))
            src = seen[raw]
            if out == src or src.is_relative_to(out):
                errors.append(
                    f"{where}: holds source {name!r} ({field_path}: {raw}); unimrg's outputs "
                    "and a source must not overlap: move output_dir or the source"
                )
            elif out.is_relative_to(src):
                errors.append(
                    f"{where}: is inside source {name!r} ({field_path}: {raw}), so ingest "
                    "would read unimrg's own outputs (preview, loss plots, probe grids) as "
                    "images; put output_dir outside every source"
                )
        return errors

    def resolve(self, p: str | Path) -> Path:
        """A path from the manifest, made absolute against the manifest's folder."""
        return resolve_path(p, self.base_dir)

    @property
    def out(self) -> Path:
        return self.resolve(self.output_dir)

    def all_sources(self) -> list[Source]:
        """Image sources plus one per understanding and caption image root (they are ingested
        too)."""
        extra = [
            Source(name=f"understanding-{i}", path=u.image_root)
            for i, u in enumerate(self.understanding)
        ]
        extra += [
            Source(name=f"captions-{i}", path=c.image_root) for i, c in enumerate(self.captions)
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
    "finite_number": "expected a finite number (not nan or inf)",
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
    # A whole section's mapping (a check across fields) says nothing the message does not.
    whole = typ == "value_error" and isinstance(err.get("input"), dict)
    said = ", got " in msg  # the validator's message shows the value already
    if typ not in ("missing", "extra_forbidden") and "input" in err and not whole and not said:
        msg += f", got {short_repr(err['input'])}"
    return f"{loc}: {msg}" if loc else msg


#: A list of a million bad items is one line too: the first few errors and a count.
MAX_ERRORS_SHOWN = 10


def parse_manifest(data: Any, base_dir: str | Path = ".", origin: str = "<manifest>") -> Manifest:
    """Validate a parsed YAML document. Raises ManifestError naming the field path."""
    if not isinstance(data, dict):
        raise ManifestError(
            f"{origin}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        m = Manifest.model_validate({**data, "base_dir": Path(base_dir)})
    except RecursionError:
        raise ManifestError(f"{origin}: nested too deeply to check") from None
    except ValidationError as exc:
        errors = exc.errors()
        lines = [_format_error(e) for e in errors[:MAX_ERRORS_SHOWN]]
        if len(errors) > MAX_ERRORS_SHOWN:
            lines.append(f"... and {len(errors) - MAX_ERRORS_SHOWN} more")
        raise ManifestError(f"{origin}: " + "; ".join(lines)) from None
    return m


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML keeps the last one silently, so the first setting would be ignored unseen)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                repeated = key in seen
            except TypeError:  # a list or mapping as a key (`? [a, b]`): PyYAML's own wording
                raise yaml.constructor.ConstructorError(
                    None, None, "found unhashable key", key_node.start_mark
                ) from None
            if repeated:
                raise _DuplicateKey(
                    f"line {line}: key {short_repr(key)} given twice in one mapping (first on "
                    f"line {seen[key]}); remove one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file. Relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(
            f"{path}:{line}: not UTF-8 text ({exc.reason}, byte {exc.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise ManifestError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    except RecursionError:
        raise ManifestError(
            f"{path}: nested too deeply to read (deeper than Python's recursion limit)"
        ) from None
    return parse_manifest(data, base_dir=path.resolve().parent, origin=str(path))

"""Training data: task streams built from the image shards, the label shards, LLaVA data and
captions.

    understanding   LLaVA conversations whose image resolves to an ingested image_id
    reconstruction  every image -> the same image           (prompt dropped at `uncond_rate`)
    depth           image -> its depth target, as RGB       (labels/depth/<fp>/)
    segmentation    image -> its segmentation target, RGB   (labels/segment/<fp>/)
    text_to_image   caption -> its image, no condition image (`captions:`; off by default)

What is read when: `TrainData.build` reads only small columns (ids, paths, errors) to index the
streams; a task whose loss weight is 0 is not indexed and none of its files are opened. Image and
label bytes are read by `TaskDataset` inside DataLoader workers, whole shard columns at a time
through a small per-worker cache; the `BatchPlan` orders items shard-window by shard-window so a
cached column serves many samples. Prompt choice and prompt dropout for a sample come from a seed
the plan derives from (seed, batch number, position), so any worker count gives the same batches
and resuming at batch k reproduces the rest of the run exactly.

Images to the square (released recipe, `trainer.*` options): understanding images are fitted and
padded with the processor's background colour (`understanding_resize: pad`); generation condition
images and targets are stretched (`generation_resize: stretch`); images and depth targets are
resampled bicubic, segmentation targets nearest (`target_resample`), so edge maps stay binary
(`square_image`, trainer/resize.py).

Understanding images: the manifest's `understanding[i].image_root` is ingested as source
`understanding-<i>`, recording each file's path relative to that root (images/_sources/). A
conversation's `image` is looked up as (source, path); one that is missing on disk, quarantined
by ingest, not ingested yet, outside its image_root, or whose turns are not usable (not objects,
no gpt turn) is skipped and counted in `UnderstandingSet.report` (where: `.examples`); the
reading is `load_understanding` (trainer/understanding_data.py).
"""

from __future__ import annotations

import random
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.fingerprint import fingerprint, hash_files
from pipeline.images import use_pixel_limit
from pipeline.manifest import GENERATION_TASKS, RELEASED_UNCOND_RATE, TASK_STAGES, TASKS
from pipeline.shards import Layout, image_bytes
from trainer.caption_data import CaptionSet, load_captions
from trainer.image_index import ImageIndex
from trainer.resize import RELEASED_RESAMPLE, RELEASED_RESIZE, square_image
from trainer.understanding_data import UnderstandingSet, load_understanding

if TYPE_CHECKING:
    from pipeline.manifest import Manifest

__all__ = [
    "DEFAULT_PROMPTS",
    "TASK_STAGES",
    "BatchPlan",
    "TaskDataset",
    "TrainData",
    "collate",
    "image_shards_identity",
    "make_loader",
    "resolve_label_fingerprints",
    "understanding_hash",
]


DEFAULT_PROMPTS: dict[str, list[str]] = {
    "reconstruction": [
        "Reconstruct this image.",
        "Generate an identical copy of this image.",
        "Redraw this image exactly as it is.",
        "Regenerate the input image.",
        "Reproduce this image.",
    ],
    "depth": [
        "Generate the depth map of this image.",
        "Predict the depth map of this image.",
        "Estimate the depth of this image and draw it as a depth map.",
    ],
    "segmentation": [
        "Generate the segmentation mask of this image.",
        "Segment this image.",
        "Draw the segmentation map of this image.",
    ],
}


# --------------------------------------------------------------------------------------------
# identities for the train fingerprint


def resolve_label_fingerprints(manifest: Manifest) -> dict[str, str]:
    """stage name -> fingerprint of the configured label stages (no model is loaded)."""
    from pipeline.stage import build_stage

    return {
        stage: build_stage(stage, manifest).fingerprint()
        for stage in TASK_STAGES.values()
        if getattr(manifest.stages, stage, None) is not None
    }


def understanding_hash(manifest: Manifest) -> str | None:
    files = [manifest.resolve(u.path) for u in manifest.understanding]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"understanding[].path: not found: {', '.join(missing)}")
    return hash_files(files) if files else None


def image_shards_identity(layout: Layout) -> str:
    """Shards are append-only and never rewritten, so names and sizes identify their content."""
    return fingerprint({p.name: p.stat().st_size for p in layout.image_shards()})


# --------------------------------------------------------------------------------------------
# index


def _label_rows(layout: Layout, stage: str, fp: str, index: ImageIndex) -> tuple[np.ndarray, dict]:
    """Global rows with a usable label under labels/<stage>/<fp>/, and counts of the rest."""
    keep: list[np.ndarray] = []
    report = Counter()
    start = 0
    for n, image_shard in index.shards.items():
        count = int(np.count_nonzero(index.shard_no == n))
        lp = layout.label_shard(stage, fp, n)
        if not lp.exists():
            report["shards_without_labels"] += 1
            report["images_without_labels"] += count
        else:
            t = pq.read_table(lp, columns=["image_id", "error"])
            ids = t.column("image_id").to_pylist()
            expected = index.image_ids[start : start + count]
            if ids != expected:
                bad = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), len(ids))
                raise ValueError(
                    f"{lp}: not row-aligned with {image_shard} (row {bad}: {len(ids)} rows for "
                    f"{count} images)"
                )
            ok = np.asarray([e is None for e in t.column("error").to_pylist()], dtype=bool)
            report["errors"] += int((~ok).sum())
            keep.append(start + np.flatnonzero(ok))
        start += count
    rows = np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, np.int64)
    report["usable"] = len(rows)
    return rows, dict(report)


@dataclass
class TrainData:
    """The indexed streams of the enabled tasks (weight > 0), plus the probe images."""

    layout: Layout
    index: ImageIndex
    label_fingerprints: dict[str, str]
    #: task -> items: global image rows (generation tasks), conversation numbers
    #: (understanding) or caption numbers (text_to_image)
    streams: dict[str, np.ndarray]
    #: task -> shard number of each item (for shard-local shuffling)
    groups: dict[str, np.ndarray]
    understanding: UnderstandingSet | None
    probe_rows: list[int]
    probe_held_out: bool
    report: dict[str, Any] = field(default_factory=dict)
    captions: CaptionSet | None = None

    @classmethod
    def build(
        cls,
        manifest: Manifest,
        label_fingerprints: dict[str, str] | None = None,
        probe_count: int = 4,
    ) -> TrainData:
        cfg = manifest.trainer
        if cfg is None:
            raise ValueError("trainer: not configured in the manifest")
        use_pixel_limit(manifest.max_image_pixels)  # ingest let the images in under this limit
        layout = Layout(manifest.out)
        weights = {t: float(cfg.loss_weights.get(t, 0.0)) for t in TASKS}
        enabled = [t for t in TASKS if weights[t] > 0]
        if not enabled:
            raise ValueError("trainer.loss_weights: every task has weight 0")
        index = ImageIndex.build(layout)
        if len(index) == 0:
            raise ValueError(f"{layout.images_dir}: no image shards; run `unimrg ingest` first")
        if any(t in TASK_STAGES for t in enabled) and label_fingerprints is None:
            label_fingerprints = resolve_label_fingerprints(manifest)
        label_fingerprints = dict(label_fingerprints or {})
        streams: dict[str, np.ndarray] = {}
        report: dict[str, Any] = {"images": len(index)}
        und = caps = None
        for task in enabled:
            if task == "understanding":
                und = load_understanding(manifest, layout, index)
                report["understanding"] = und.report
                report["understanding_skipped_at"] = und.examples
                if len(und.image_rows) == 0:
                    raise ValueError(
                        f"understanding: no usable conversations ({und.report}); ingest the "
                        "image roots (`unimrg ingest`) or set trainer.loss_weights.understanding: 0"
                    )
                streams[task] = np.arange(len(und.image_rows), dtype=np.int64)
            elif task == "text_to_image":
                caps = load_captions(manifest, layout, index)
                report[task] = caps.report
                report["captions_skipped_at"] = caps.examples
                if len(caps.image_rows) == 0:
                    raise ValueError(
                        f"captions: no usable captions ({caps.report}); ingest the image roots "
                        "(`unimrg ingest`) or set trainer.loss_weights.text_to_image: 0"
                    )
                streams[task] = np.arange(len(caps.image_rows), dtype=np.int64)
            elif task == "reconstruction":
                streams[task] = np.arange(len(index), dtype=np.int64)
            else:
                stage = TASK_STAGES[task]
                fp = label_fingerprints.get(stage)
                if fp is None:
                    raise ValueError(
                        f"trainer.loss_weights.{task} is {weights[task]} but stages.{stage} is "
                        "not configured"
                    )
                rows, rep = _label_rows(layout, stage, fp, index)
                report[task] = rep
                if len(rows) == 0:
                    raise ValueError(
                        f"{layout.label_dir(stage, fp)}: no usable {stage} labels; run the "
                        f"{stage} stage first (`unimrg run --only {stage}`)"
                    )
                streams[task] = rows
        # Tasks whose items are not image rows: the image row of each item.
        item_rows = {
            t: v.image_rows
            for t, v in (("understanding", und), ("text_to_image", caps))
            if v is not None
        }
        held = _exclude_held_out(manifest, index, streams, item_rows)
        if held:
            report["held_out_images"] = held
        # Probe: fixed images with every enabled generation target, held out of the generation
        # streams when there are enough images to spare them.
        cand = np.arange(len(index))
        for task in ("depth", "segmentation"):
            if task in streams:
                cand = np.intersect1d(cand, streams[task])
        cand = sorted(cand.tolist(), key=lambda r: index.image_ids[r])[:probe_count]
        held_out = len(index) > 4 * max(probe_count, 1)
        if held_out and cand:
            for task in GENERATION_TASKS:
                if task in streams:
                    streams[task] = np.setdiff1d(streams[task], cand)
        for task, items in streams.items():
            if len(items) == 0:
                raise ValueError(f"{task}: no items left after holding out the probe images")
        groups = {
            t: index.shard_no[item_rows[t][s] if t in item_rows else s] for t, s in streams.items()
        }
        report["streams"] = {t: len(s) for t, s in streams.items()}
        return cls(
            layout,
            index,
            label_fingerprints,
            streams,
            groups,
            und,
            cand,
            held_out,
            report,
            caps,
        )

    def dataset(
        self,
        encoder,
        image_size: int,
        fill: tuple[int, int, int],
        prompts=None,
        uncond_rate: float | dict[str, float] = 0.1,
        resize: dict[str, str] | None = None,
        resample: dict[str, str] | None = None,
    ) -> TaskDataset:
        """`uncond_rate`: per generation task (a number: reconstruction's); `resize`:
        {understanding, generation} -> pad | stretch; `resample`: {image, depth, segmentation}
        -> nearest | bilinear | bicubic. Defaults: the released recipe."""
        if not isinstance(uncond_rate, dict):
            uncond_rate = {"reconstruction": float(uncond_rate)}
        uncond_rate = {**RELEASED_UNCOND_RATE, **uncond_rate}
        return TaskDataset(
            shards={n: str(p) for n, p in self.index.shards.items()},
            shard_no=self.index.shard_no,
            row=self.index.row,
            label_dirs={
                t: str(self.layout.label_dir(s, self.label_fingerprints[s]))
                for t, s in TASK_STAGES.items()
                if t in self.streams
            },
            conversations=self.understanding.conversations if self.understanding else [],
            conversation_rows=self.understanding.image_rows if self.understanding else None,
            captions=self.captions.captions if self.captions else [],
            caption_rows=self.captions.image_rows if self.captions else None,
            encoder=encoder,
            image_size=image_size,
            fill=fill,
            prompts={**DEFAULT_PROMPTS, **(prompts or {})},
            uncond_rate=uncond_rate,
            streams=self.streams,
            resize={**RELEASED_RESIZE, **(resize or {})},
            resample={**RELEASED_RESAMPLE, **(resample or {})},
        )


def _exclude_held_out(
    manifest, index, streams: dict[str, np.ndarray], item_rows: dict[str, np.ndarray]
) -> int:
    """Drop the evaluation's held-out images (`eval.held_out_images`) from every stream, in
    place (`item_rows`: task -> image row of each item, for the tasks whose items are not image
    rows: conversations, captions); returns how many images are held out."""
    from trainer.evaluation.heldout import held_out_count, held_out_ids

    ids = held_out_ids(index.image_ids, held_out_count(manifest))
    if not ids:
        return 0
    held = set(ids)
    rows = np.array([g for g, iid in enumerate(index.image_ids) if iid in held], dtype=np.int64)
    for task, items in streams.items():
        image_rows = item_rows[task][items] if task in item_rows else items
        streams[task] = items[~np.isin(image_rows, rows)]
    return len(ids)


# --------------------------------------------------------------------------------------------
# samples


class _ColumnCache:
    """A few whole Parquet columns per worker process, least recently used evicted."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.reads: Counter = Counter()

    def get(self, path: str, column: str):
        key = (path, column)
        if key in self.items:
            self.items.move_to_end(key)
        else:
            self.reads[path] += 1
            self.items[key] = pq.read_table(path, columns=[column]).column(0).combine_chunks()
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return self.items[key]


class TaskDataset:
    """Map-style dataset whose keys are the plan's (task, item, sample_seed, batch) tuples."""

    def __init__(
        self,
        shards,
        shard_no,
        row,
        label_dirs,
        conversations,
        conversation_rows,
        encoder,
        image_size,
        fill,
        prompts,
        uncond_rate,
        streams=None,
        cache_columns: int = 12,
        resize=None,
        resample=None,
        captions=None,
        caption_rows=None,
    ):
        self.shards = shards
        self.shard_no = shard_no
        self.row = row
        self.label_dirs = label_dirs
        self.conversations = conversations
        self.conversation_rows = conversation_rows
        #: text_to_image: the captions and the global image row of each
        self.captions = captions or []
        self.caption_rows = caption_rows
        self.encoder = encoder
        self.image_size = image_size
        self.fill = tuple(fill)
        self.prompts = prompts
        #: generation task -> rate of dropping the prompt (image kept)
        self.uncond_rate = {
            **RELEASED_UNCOND_RATE,
            **(
                uncond_rate
                if isinstance(uncond_rate, dict)
                else {"reconstruction": float(uncond_rate)}
            ),
        }
        self.resize = {**RELEASED_RESIZE, **(resize or {})}
        self.resample = {**RELEASED_RESAMPLE, **(resample or {})}
        #: task -> sorted items, to skip an unusable item to the next one
        self.streams = streams or {}
        self.skipped: Counter = Counter()
        # A plan window spans 4 shards; each needs its image column and up to two label columns.
        self.cache = _ColumnCache(cache_columns)

    def image_bytes(self, g: int) -> bytes:
        n, r = int(self.shard_no[g]), int(self.row[g])
        return self.cache.get(self.shards[n], "image.bytes")[r].as_py()

    def target_bytes(self, task: str, g: int) -> bytes | None:
        n, r = int(self.shard_no[g]), int(self.row[g])
        path = f"{self.label_dirs[task]}/shard-{n:05d}.parquet"
        return image_bytes(self.cache.get(path, "target")[r].as_py())

    def image(self, g: int, task: str = "understanding") -> np.ndarray:
        """Image row g as `task` sees it: understanding padded, generation tasks stretched."""
        mode = self.resize["understanding" if task == "understanding" else "generation"]
        return square_image(
            self.image_bytes(g), self.image_size, self.fill, mode, self.resample["image"]
        )

    def target(self, task: str, g: int) -> np.ndarray:
        if task in ("reconstruction", "text_to_image"):
            return self.image(g, task)
        data = self.target_bytes(task, g)
        if data is None:
            raise _Unusable(
                f"{self.label_dirs[task]}: shard {int(self.shard_no[g])} row "
                f"{int(self.row[g])} has no target"
            )
        return square_image(
            data, self.image_size, (0, 0, 0), self.resize["generation"], self.resample[task]
        )

    def __getitem__(self, key: tuple[str, int, int, int]) -> dict[str, Any]:
        task, item, seed, k = key
        for attempt in range(_MAX_SKIPS + 1):
            try:
                return self._sample(task, item, seed, k)
            except _Unusable as exc:
                # Found only now (a conversation too long for the model, a label row without
                # a target): skip it deterministically to the stream's next item.
                self.skipped[task] += 1
                if self.skipped[task] == 1:
                    warnings.warn(f"{task}: skipping unusable items, first: {exc}", stacklevel=2)
                stream = self.streams.get(task)
                if stream is None or attempt == _MAX_SKIPS:
                    raise ValueError(f"{task}: {exc}") from None
                pos = int(np.searchsorted(stream, item))
                item = int(stream[(pos + 1) % len(stream)])
        raise AssertionError("unreachable")

    def _sample(self, task: str, item: int, seed: int, k: int) -> dict[str, Any]:
        import torch

        rng = random.Random(seed)
        if task == "understanding":
            g = int(self.conversation_rows[item])
            try:
                ids, labels = self.encoder.understanding(self.conversations[item])
            except ValueError as exc:
                raise _Unusable(f"conversation {item}: {exc}") from None
            out = {"labels": torch.tensor(labels)}
        elif task == "text_to_image":
            # The caption alone: no condition image, the target is the image itself.
            g = int(self.caption_rows[item])
            try:
                ids = self.encoder.text_to_image(self.captions[item])
            except ValueError as exc:
                raise _Unusable(f"caption {item}: {exc}") from None
            target = torch.from_numpy(self.target(task, g))
            return {"task": task, "batch": k, "input_ids": torch.tensor(ids), "target": target}
        else:
            g = int(item)
            prompt = rng.choice(self.prompts[task])
            rate = self.uncond_rate.get(task, 0.0)
            if rate > 0 and rng.random() < rate:
                prompt = ""
            ids = self.encoder.generation(prompt)
            out = {"target": torch.from_numpy(self.target(task, g))}
        out.update(
            task=task,
            batch=k,
            input_ids=torch.tensor(ids),
            image=torch.from_numpy(self.image(g, task)),
        )
        return out


class _Unusable(ValueError):
    pass


_MAX_SKIPS = 16


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad token ids (pad_id, attention_mask 0, labels -100) and stack the images (a
    text_to_image batch has no `image`, only its `target`)."""
    import torch

    n = max(len(s["input_ids"]) for s in samples)
    b = len(samples)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    mask = torch.zeros((b, n), dtype=torch.long)
    has_labels = "labels" in samples[0]
    labels = torch.full((b, n), -100, dtype=torch.long) if has_labels else None
    for i, s in enumerate(samples):
        m = len(s["input_ids"])
        ids[i, :m] = s["input_ids"]
        mask[i, :m] = 1
        if has_labels:
            labels[i, :m] = s["labels"]
    out = {
        "task": samples[0]["task"],
        "batch": samples[0]["batch"],
        "input_ids": ids,
        "attention_mask": mask,
    }
    if "image" in samples[0]:  # text_to_image has no condition image
        out["image"] = torch.stack([s["image"] for s in samples])
    if has_labels:
        out["labels"] = labels
    if "target" in samples[0]:
        out["target"] = torch.stack([s["target"] for s in samples])
    return out


# --------------------------------------------------------------------------------------------
# the plan: which items form batch k


class BatchPlan:
    """Batch k -> (task, items): a pure function of (seed, k, rank), so resuming is exact.

    `round_robin` cycles through the enabled tasks (one batch of each per micro-step);
    `weighted` draws the task of every batch in proportion to its weight. Each task walks
    through its items epoch by epoch; an epoch shuffles the order of shards, then the items
    within windows of `window` shards. Rank r of `world` takes every world-th position.
    """

    def __init__(
        self,
        streams: dict[str, np.ndarray],
        groups: dict[str, np.ndarray],
        weights: dict[str, float],
        batch_size: int,
        mode: str = "round_robin",
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        window: int = 4,
    ):
        self.tasks = [t for t in TASKS if t in streams and weights.get(t, 0) > 0]
        self.streams, self.groups = streams, groups
        self.batch_size, self.mode, self.seed = batch_size, mode, seed
        self.rank, self.world, self.window = rank, world, window
        p = np.asarray([weights[t] for t in self.tasks], dtype=np.float64)
        self.p = p / p.sum()
        self._draws = np.zeros(0, dtype=np.int64)
        self._perms: dict[tuple[str, int], np.ndarray] = {}

    def task_of(self, k: int) -> tuple[str, int]:
        """(task, how many batches of that task came before batch k)."""
        t = len(self.tasks)
        if self.mode == "round_robin":
            return self.tasks[k % t], k // t
        while len(self._draws) <= k:
            c = len(self._draws) // 1024
            rng = np.random.default_rng([self.seed, 0x5EED, c])
            self._draws = np.concatenate([self._draws, rng.choice(t, 1024, p=self.p)])
        i = int(self._draws[k])
        return self.tasks[i], int(np.count_nonzero(self._draws[:k] == i))

    def _perm(self, task: str, epoch: int) -> np.ndarray:
        key = (task, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, TASKS.index(task), epoch])
            group = self.groups[task]
            shards = np.unique(group)
            order = np.zeros(int(shards.max()) + 1, dtype=np.int64)
            order[shards] = rng.permutation(len(shards))
            window = order[group] // self.window
            self._perms = {
                k: v for k, v in self._perms.items() if k[0] != task or k[1] >= epoch - 1
            }
            # Sort by (shard window, random key): shuffled windows, shuffled items within each.
            self._perms[key] = np.lexsort((rng.random(len(group)), window))
        return self._perms[key]

    def batch(self, k: int) -> list[tuple[str, int, int, int]]:
        task, j = self.task_of(k)
        items = self.streams[task]
        n = len(items)
        out = []
        for i in range(self.batch_size):
            pos = (j * self.batch_size + i) * self.world + self.rank
            epoch, off = divmod(pos, n)
            item = int(items[self._perm(task, epoch)[off]])
            seed = (self.seed * 1_000_003 + k) * 4099 + self.rank * 257 + i
            out.append((task, item, seed, k))
        return out


class _PlanSampler:
    def __init__(self, plan: BatchPlan, start: int):
        self.plan, self.start = plan, start

    def __iter__(self):
        k = self.start
        while True:
            yield self.plan.batch(k)
            k += 1


def make_loader(
    dataset: TaskDataset,
    plan: BatchPlan,
    start_batch: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
):
    """An endless iterator of collated batches from batch number `start_batch` on.

    Workers decode and pad while the GPU computes; `prefetch_factor` batches per worker wait
    ready. Batches arrive in plan order whatever the worker count.
    """
    import functools
    import os

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_sampler=_PlanSampler(plan, start_batch),
            num_workers=num_workers,
            collate_fn=functools.partial(collate, pad_id=dataset.encoder.pad_id),
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=False,
        )
    )

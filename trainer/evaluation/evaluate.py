"""The eval stage: the base model and post-trained checkpoints scored side by side, cached.

    from trainer.evaluation.evaluate import evaluate, format_table
    report = evaluate(manifest)            # every (model, benchmark) of the manifest's eval section
    print(format_table(report))

One task per (model, benchmark), each in its own folder `out/eval/<fingerprint>/<benchmark>/`:

    predictions.jsonl   one row per question: index, prediction (raw text), choice, answer, correct
                        (generation probe: one row per image with its metrics)
    scores.json         the metrics (trainer.evaluation.scoring), written last: its presence marks
                        the folder complete
    lineage.json        what made it: model spec and identity, benchmark file and hash, settings
    grid.png            generation probe only: inputs, targets and generated images

The fingerprint covers the model's identity (weights hash; a checkpoint inside output_dir named
by its path relative to output_dir), the benchmark file's hash and the hashes of the image files
its `image_path` rows name, its kind and the settings that change replies (max_new_tokens, the
eval version); no absolute path, so moving output_dir keeps every score. An unchanged rerun
finds every scores.json and loads no model; a new checkpoint evaluates only itself. A task is
written into a temporary folder renamed into place when complete: a failed one leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.fingerprint import cached_file_hash, cached_file_hashes, fingerprint
from pipeline.locks import shared
from pipeline.shards import atomic_write_bytes, make_readable

__all__ = [
    "EVAL_VERSION",
    "PROBES",
    "EvalModel",
    "EvalReport",
    "EvalTask",
    "eval_models",
    "eval_table",
    "evaluate",
    "format_table",
    "model_identity",
    "model_location",
    "plan_eval",
    "run_task",
]

EVAL_VERSION = "1"
PROBES = ("spatial", "generation")
SCORES, PREDICTIONS, LINEAGE, GRID = "scores.json", "predictions.jsonl", "lineage.json", "grid.png"
#: metrics shown in the table, per kind, in order
TABLE_METRICS = {
    "mcq": ("accuracy",),
    "mmvp": ("accuracy", "pair_accuracy"),
    "yesno": ("accuracy",),
    "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio"),
    "hallusionbench": ("aAcc", "fAcc", "qAcc"),
    "generation": ("depth_abs_rel", "depth_delta1", "seg_boundary_f", "recon_psnr"),
}


@dataclass(frozen=True)
class EvalModel:
    """A model to score: `base` (the trainer's starting model) or a checkpoint."""

    label: str  # "base", "step_000004", or a folder name
    spec: str  # what the adapter's load() takes
    revision: str | None = None
    base: bool = False


@dataclass(frozen=True)
class EvalTask:
    """One (model, benchmark): its fingerprint and folder."""

    model: EvalModel
    benchmark: str
    kind: str  # a benchmark kind, or "generation" (the generation probe)
    path: Path | None  # the TSV (None for the generation probe)
    fingerprint: str
    out_dir: Path
    lineage: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def title(self) -> str:
        """The task's name in logs and the Prefect UI: `eval mmvp step_002500`."""
        return f"eval {self.benchmark} {self.model.label}"

    @property
    def done(self) -> bool:
        return (self.out_dir / SCORES).is_file()

    def scores(self) -> dict[str, Any]:
        return json.loads((self.out_dir / SCORES).read_text())


@dataclass
class EvalReport:
    tasks: list[EvalTask]
    #: task title -> {"scores", "how" (computed | cached), "random_weights"}
    results: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def random_weights(self) -> bool:
        return any(r.get("random_weights") for r in self.results.values())


# --------------------------------------------------------------------------------------------
# what to evaluate


def _checkpoints(manifest) -> list[Path]:
    from trainer.checkpoints import STEP_PREFIX
    from trainer.run_folder import train_output_dir

    out = train_output_dir(manifest)
    if not out.is_dir():
        return []
    steps = [
        p
        for p in out.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
    ]
    return sorted(steps, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def eval_models(manifest, choice: str | None = None) -> list[EvalModel]:
    """The models to score. `choice`: None (the manifest's `eval.models`: base and the final
    checkpoint, or every checkpoint), `base`, `latest`, or a path / model spec."""
    cfg = manifest.trainer
    if cfg is None:
        raise ValueError("eval: needs a trainer section (its model is the base model)")
    base = EvalModel("base", cfg.model, cfg.revision, base=True)
    if choice == "base":
        return [base]
    if choice not in (None, "latest"):
        # A folder as typed (from the working directory), else relative to the manifest, else
        # a model spec the adapter resolves itself (hub id, tiny-random).
        here, there = Path(choice).expanduser(), manifest.resolve(choice)
        p = here if here.exists() else there
        spec = str(p.resolve()) if p.exists() else choice
        if p.exists():  # a checkpoint (or its model/ folder) of a run that diverged
            for run in (p.resolve().parent, p.resolve().parent.parent):
                _refuse_diverged(run)
        return [EvalModel(Path(choice).name or choice, spec)]
    from trainer.run_folder import train_output_dir

    _refuse_diverged(train_output_dir(manifest))
    ckpts = _checkpoints(manifest)
    if choice == "latest":
        if not ckpts:
            raise ValueError("eval --model latest: no checkpoint yet; run `unimrg train` first")
        return [EvalModel(ckpts[-1].name, str(ckpts[-1]))]
    every = manifest.eval is not None and manifest.eval.models == "all"
    chosen = ckpts if every else ckpts[-1:]
    return [base, *(EvalModel(p.name, str(p)) for p in chosen)]


def _refuse_diverged(run: Path) -> None:
    """Raise ValueError when training run folder `run` diverged (trainer/loop.py records it in
    diverged.json): none of its checkpoints is scored."""
    from trainer.run_folder import DIVERGED_FILE, read_diverged

    record = read_diverged(run)
    if record is None:
        return
    at = f" at step {record['step']}" if "step" in record else ""
    raise ValueError(
        f"eval: the training run {run} diverged{at} (see {run / DIVERGED_FILE}): its "
        "checkpoints are not scored; fix the cause and train again, or score the base model "
        "alone with --model base"
    )


#: How a model identity names a folder inside output_dir: by its path relative to it.
OUTPUT_DIR = "<output_dir>/"


def model_identity(manifest, model: EvalModel) -> dict[str, Any]:
    """The adapter's identity of the model (weights hash, where it comes from), with a folder
    inside output_dir named relative to it: the fingerprint survives moving output_dir."""
    from trainer.adapters import adapter_class

    cls = adapter_class(manifest.trainer.adapter)
    ident = cls.identity(model.spec, model.revision, manifest.base_dir)
    where = ident.get("model")
    if isinstance(where, str) and Path(where).is_absolute():
        path, root = Path(where).resolve(), manifest.out.resolve()
        if path.is_relative_to(root):
            ident = {**ident, "model": OUTPUT_DIR + path.relative_to(root).as_posix()}
    return ident


def model_location(identity: dict[str, Any], out: Path) -> Path | None:
    """The folder a model identity (an eval lineage's `model`) names, for output_dir `out`;
    None for a model that is not a folder (tiny-random, a hub id)."""
    where = str(identity.get("model") or "")
    if where.startswith(OUTPUT_DIR):
        return Path(out) / where[len(OUTPUT_DIR) :]
    return Path(where) if Path(where).is_absolute() else None


def _benchmark_identity(path: Path, kind: str) -> dict[str, Any]:
    """What a benchmark's scores depend on besides the model: the TSV's content and, for rows
    that read their image from a file, each file's content (by row index). No path: a moved
    benchmark folder is the same benchmark."""
    from trainer.evaluation.benchmarks import image_files

    ident: dict[str, Any] = {"sha256": cached_file_hash(path)}
    files = image_files(path, kind)
    if files is not None:
        hashes = cached_file_hashes(list(files.values()))
        ident["images"] = fingerprint(dict(zip(files, hashes, strict=True)))
    return ident


def _spatial_tsv(
    manifest, items, fps: dict[str, str], build: bool = True
) -> tuple[Path | None, int | None]:
    """Build (once per held-out set and labels) the spatial probe TSV: (path or None, count);
    count None when it is not built yet and `build` is off."""
    from trainer.evaluation.probes import build_spatial_benchmark

    cfg = manifest.eval
    key = fingerprint(
        {
            "probe": "spatial",
            "version": EVAL_VERSION,
            "images": [i.image_id for i in items],
            "labels": fps,
            "max_questions": cfg.probes.max_questions,
        }
    )
    folder = manifest.out / cfg.output_subdir / "probes" / f"spatial-{key}"
    tsv, count_file = folder / "spatial.tsv", folder / "questions.json"
    if count_file.is_file():
        n = json.loads(count_file.read_text())["questions"]
        return (tsv if n else None), n
    if not build:
        return None, None
    n = build_spatial_benchmark(items, tsv, cfg.probes.max_questions)
    atomic_write_bytes(count_file, json.dumps({"questions": n, "labels": fps}).encode())
    return (tsv if n else None), n


def plan_eval(
    manifest, models: list[EvalModel], only: list[str] | None = None, build: bool = True
) -> tuple[list[EvalTask], list[str]]:
    """(tasks, notes): one task per (model, benchmark), benchmarks then probes. Notes say why a
    probe does not run. Raises ValueError for an unknown `only` name or a missing file.
    `build=False` writes nothing (for status): a spatial probe not built yet is left out with
    a note."""
    cfg = manifest.eval
    if cfg is None:
        raise ValueError("eval: no eval section in the manifest (see docs/eval.md)")
    names = [b.name for b in cfg.benchmarks] + [
        p for p in PROBES if getattr(cfg.probes, p) and cfg.held_out_images
    ]
    if only:
        bad = [n for n in only if n not in names]
        if bad:
            raise ValueError(f"--only: unknown benchmark(s) {bad}; configured: {names}")
    wanted = set(only or names)
    notes: list[str] = []
    benches: list[tuple[str, str, Path | None, dict]] = []
    for b in cfg.benchmarks:
        if b.name not in wanted:
            continue
        path = manifest.resolve(b.path)
        if not path.is_file():
            raise ValueError(f"eval.benchmarks[{b.name}].path: not found: {path}")
        benches.append((b.name, b.kind, path, _benchmark_identity(path, b.kind)))
    probes = [p for p in PROBES if p in wanted and getattr(cfg.probes, p)]
    if not cfg.held_out_images and not only and any(getattr(cfg.probes, p) for p in PROBES):
        notes.append("probes: eval.held_out_images is 0, so no image is held out: probes skipped")
    elif probes:
        from trainer.evaluation.probes import held_out_images

        items, fps = held_out_images(manifest)
        if "spatial" in probes:
            tsv, n = _spatial_tsv(manifest, items, fps, build)
            if n is None:
                notes.append("spatial: questions not built yet (built by the first eval)")
            elif tsv is None:
                notes.append(
                    "spatial: the held-out images' labels give no pair of masks with clearly "
                    "different depths: no questions"
                )
            else:
                benches.append(("spatial", "mcq", tsv, {"sha256": cached_file_hash(tsv)}))
        if "generation" in probes:
            ident = {
                "images": [i.image_id for i in items],
                "labels": fps,
                "prompts": generation_prompts(manifest),
            }
            benches.append(("generation", "generation", None, ident))
    tasks = []
    for model in models:
        identity = model_identity(manifest, model)
        for name, kind, path, bench in benches:
            settings = {"max_new_tokens": cfg.max_new_tokens} if kind != "generation" else {}
            parts = {
                "version": EVAL_VERSION,
                "adapter": manifest.trainer.adapter,
                "model": identity,
                "benchmark": bench,
                "kind": kind,
                "settings": settings,
            }
            fp = fingerprint(parts)
            lineage = {
                "task": f"eval {name} {model.label}",
                "model_spec": {
                    "label": model.label,
                    "spec": model.spec,
                    "revision": model.revision,
                },
                "benchmark_file": str(path) if path is not None else None,
                **parts,
            }
            out_dir = manifest.out / cfg.output_subdir / fp / name
            tasks.append(EvalTask(model, name, kind, path, fp, out_dir, lineage))
    return tasks, notes


def generation_prompts(manifest) -> dict[str, str]:
    """The generation probe's prompt per task: the first of the trainer's prompt list."""
    from trainer.data import DEFAULT_PROMPTS

    lists = {**DEFAULT_PROMPTS, **(manifest.trainer.prompts or {})}
    return {t: lists[t][0] for t in ("reconstruction", "depth", "segmentation")}


# --------------------------------------------------------------------------------------------
# running


def load_adapter(manifest, model: EvalModel, device: str | None = None):
    """The model through its adapter, on CUDA (bfloat16) when there is one."""
    import torch

    from trainer.adapters import adapter_class

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = adapter_class(manifest.trainer.adapter).load(
        model.spec, model.revision, manifest.base_dir, device=device
    )
    if device.startswith("cuda"):
        adapter.model.to(torch.bfloat16)
    adapter.model.eval()
    return adapter


def _autocast(adapter):
    """bfloat16 autocast when the weights are bfloat16 (load_adapter on CUDA): the generation
    path feeds float32 pixels to the image encoders, as training does under autocast."""
    import contextlib

    import torch

    param = next(adapter.model.parameters())
    if param.dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(param.device.type, dtype=torch.bfloat16)


def answer_benchmark(
    adapter,
    rows: list[dict],
    kind: str,
    base_dir: Path,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
    label: str = "eval",
    benchmark: Path | None = None,
) -> list[str]:
    """Raw replies to every question of a benchmark, in order (progress in questions/s);
    errors reading an image name `benchmark` (the TSV) when given."""
    from pipeline.progress import progress_bar
    from trainer.evaluation.benchmarks import build_prompt, load_image

    replies: list[str] = []
    with progress_bar(label, len(rows), progress, unit="questions") as advance:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            images = [load_image(r, base_dir, benchmark) for r in chunk]
            prompts = [build_prompt(kind, r) for r in chunk]
            replies += adapter.answer(images, prompts, max_new_tokens)
            advance(len(chunk))
    return replies


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


#: In output_dir, beside `.run.lock` and `.ingest.lock`: evals hold it shared while they write
#: (several at once), `unimrg clean` exclusively (pipeline/locks.py).
EVAL_LOCK = ".eval.lock"


def run_task(task: EvalTask, manifest, adapter, progress: bool = True) -> dict[str, Any]:
    """Evaluate one (model, benchmark) into its folder; returns the scores. The files are
    written into a temporary sibling folder (`.<benchmark>.<random>.tmp`, scores.json last)
    that is renamed into place when complete; when the task fails it is removed, and so is the
    fingerprint's folder when nothing else is in it. Holds output_dir's `EVAL_LOCK` shared
    throughout: refused at once while `unimrg clean` runs there, and clean while it writes."""
    with shared(manifest.out / EVAL_LOCK, "`unimrg clean` is running there"):
        return _run_task(task, manifest, adapter, progress)


def _run_task(task: EvalTask, manifest, adapter, progress: bool) -> dict[str, Any]:
    parent = task.out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{task.out_dir.name}.", suffix=".tmp"))
    try:
        scores = _run_task_into(tmp, task, manifest, adapter, progress)
        make_readable(tmp)  # mkdtemp makes it 0700
        if task.out_dir.exists():  # an earlier result being redone (`--force eval`)
            shutil.rmtree(task.out_dir)
        try:
            os.rename(tmp, task.out_dir)
        except OSError:
            if not task.done:  # not a race lost to another eval of the same task
                raise
        return scores
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            parent.rmdir()  # only when empty: a failed first task of this fingerprint
        except OSError:
            pass


def _run_task_into(out: Path, task: EvalTask, manifest, adapter, progress: bool) -> dict:
    from trainer.evaluation.benchmarks import read_benchmark
    from trainer.evaluation.scoring import grade, score

    cfg = manifest.eval
    started = time.time()
    if task.kind == "generation":
        from trainer.evaluation.probes import held_out_images, run_generation_probe

        items, _ = held_out_images(manifest)
        prompts = generation_prompts(manifest)
        with _autocast(adapter):
            scores = run_generation_probe(adapter, items, out, prompts, cfg.batch_size)
    else:
        rows = read_benchmark(task.path, task.kind)
        replies = answer_benchmark(
            adapter,
            rows,
            task.kind,
            task.path.parent,
            cfg.batch_size,
            cfg.max_new_tokens,
            progress,
            task.title,
            task.path,
        )
        lines = []
        scored = []
        for row, reply in zip(rows, replies, strict=True):
            r = {**row, "prediction": reply}
            choice, correct = grade(task.kind, r)
            scored.append(r)
            lines.append(
                {
                    "index": row["index"],
                    "prediction": reply,
                    "choice": choice,
                    "answer": row["answer"],
                    "correct": correct,
                }
            )
        atomic_write_bytes(out / PREDICTIONS, "".join(json.dumps(x) + "\n" for x in lines).encode())
        scores = score(task.kind, scored)
    seconds = time.time() - started
    _write_json(
        out / LINEAGE,
        {
            **task.lineage,
            "random_weights": bool(adapter.random_weights),
            "seconds": seconds,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    _write_json(out / SCORES, scores)
    return scores


def task_result(task: EvalTask, how: str) -> dict[str, Any]:
    """What a finished task reports: its scores, how they were obtained, random weights."""
    lineage = (
        json.loads((task.out_dir / LINEAGE).read_text())
        if (task.out_dir / LINEAGE).is_file()
        else {}
    )
    return {
        "title": task.title,
        "benchmark": task.benchmark,
        "kind": task.kind,
        "model": task.model.label,
        "base": task.model.base,
        "scores": task.scores(),
        "how": how,
        "random_weights": bool(lineage.get("random_weights")),
        "path": str(task.out_dir),
    }


def evaluate(
    manifest, model: str | None = None, only: list[str] | None = None, progress: bool = True
) -> EvalReport:
    """Plan, then run every task whose scores.json is missing, loading each model once."""
    models = eval_models(manifest, model)
    tasks, notes = plan_eval(manifest, models, only)
    results: dict[str, dict[str, Any]] = {}
    for m in models:
        mine = [t for t in tasks if t.model == m]
        todo = [t for t in mine if not t.done]
        adapter = load_adapter(manifest, m) if todo else None
        for t in mine:
            if t.done:
                results[t.title] = task_result(t, "cached")
            else:
                run_task(t, manifest, adapter, progress)
                results[t.title] = task_result(t, "computed")
        del adapter
    return EvalReport(tasks, results, notes)


# --------------------------------------------------------------------------------------------
# the table


def eval_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows benchmark, metric, base, post_trained, delta (post - base), post_model.

    The post-trained column is the last non-base model of each benchmark in `results` order
    (the final checkpoint when several are scored)."""
    order: list[str] = []
    base: dict[str, dict] = {}
    post: dict[str, dict] = {}
    kinds: dict[str, str] = {}
    for r in results:
        b = r["benchmark"]
        if b not in order:
            order.append(b)
        kinds[b] = r["kind"]
        (base if r["base"] else post)[b] = r
    rows = []
    for b in order:
        for metric in TABLE_METRICS[kinds[b]]:
            bv = base.get(b, {}).get("scores", {}).get(metric)
            pv = post.get(b, {}).get("scores", {}).get(metric)
            rows.append(
                {
                    "benchmark": b,
                    "metric": metric,
                    "base": bv,
                    "post_trained": pv,
                    "delta": pv - bv if bv is not None and pv is not None else None,
                    "post_model": post.get(b, {}).get("model"),
                }
            )
    return rows


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def format_table(report: EvalReport) -> str:
    """The eval table as text (fractions; PSNR in dB; AbsRel lower is better)."""
    rows = eval_table(list(report.results.values()))
    post_models = sorted({r["post_model"] for r in rows if r["post_model"]})
    header = ["benchmark", "metric", "base", "post-trained", "delta"]
    body = [
        [
            r["benchmark"],
            r["metric"],
            _fmt(r["base"]),
            _fmt(r["post_trained"]),
            _fmt(r["delta"], signed=True),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths]), *(line(b) for b in body)]
    if post_models:
        out.append(f"post-trained: {', '.join(post_models)}")
    out += report.notes
    if report.random_weights:
        out.append("RANDOM WEIGHTS (tiny-random): these scores are noise, not a measurement")
    return "\n".join(out)

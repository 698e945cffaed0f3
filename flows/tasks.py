"""Prefect tasks: ingest, one label task per (stage, shard), train.

Each task takes JSON-able parameters (the manifest path, fingerprints, paths) so it can run in
this process, on a Dask worker, or on a Prefect worker, and returns a small dict (paths, counts,
fingerprints), persisted as JSON. Arrays and models never travel through Prefect.

A process parses a manifest once (`read_manifest`, keyed by its path and bytes): the driver
and the tasks it runs in this process share that parse. Models are loaded once per worker
process: `_stage_for` keeps set-up stages in a module-level cache keyed by (stage,
fingerprint), so every shard a process runs after the first reuses the loaded model; the
driver hands the stages it built to that cache (`adopt_stage`), so in its own process each stage
is built once per run. A process runs one shard per stage at a time (a lock per stage), which is also
what a GPU wants; depth and segment can overlap. Before its first stage, a process sets torch's
CPU threads (`executor.torch_threads`, `torch_threads()`), so how many threads the stages' torch
ops use is chosen, not torch's default of every core in every task.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.caching import FINGERPRINT_CACHE, is_out_of_memory, retry_when_transient
from flows.run_logs import capture_project_loggers
from pipeline.manifest import Manifest, load_manifest
from pipeline.shards import Layout

__all__ = [
    "GPU_TAG",
    "StageOutOfMemory",
    "adopt_stage",
    "ingest_images",
    "label_shard",
    "read_manifest",
    "train_model",
]

#: Tag on every task that holds a GPU. A Prefect tag concurrency limit named `gpu` (created
#: with `prefect concurrency-limit create gpu N`) caps how many run at once; with no such limit
#: the tag costs nothing.
GPU_TAG = "gpu"

# Warnings of the stages' own loggers (depth's OOM halving, segment's per-image failures) go to
# the run logs of the task that logged them, in every process that imports these tasks.
capture_project_loggers()

#: Transient failures (the network, a timeout, a lost Dask worker) get two more tries, after 5 s
#: and 30 s. Config and data errors, out-of-memory errors and bugs fail at once
#: (flows.caching.retry_when_transient).
RETRIES = 2
RETRY_DELAYS = [5, 30]


class StageOutOfMemory(RuntimeError):
    """The device ran out of memory and the stage could not absorb it by itself."""


_LOCK = threading.Lock()
_STAGES: dict[tuple[str, str], Any] = {}
_STAGE_LOCKS: dict[tuple[str, str], threading.Lock] = {}
#: How many times this process loaded each stage's model (tests check it stays at one).
#: Task bodies must reach these through functions: on Dask, cloudpickle ships the task function
#: by value with *copies* of the module globals it names directly.
SETUP_COUNTS: dict[tuple[str, str], int] = {}
#: torch's intra-op threads as this process set them (empty until its first label task).
_TORCH_THREADS: list[int] = []


_MANIFESTS: dict[tuple[str, bytes], Manifest] = {}


def read_manifest(path: str | Path) -> Manifest:
    """The manifest at `path`, parsed once per process for the same path and bytes (a parsed
    Manifest is frozen, so every reader can share it; an edited file is parsed again)."""
    p = Path(path)
    try:
        key = (str(p.resolve()), hashlib.sha256(p.read_bytes()).digest())
    except OSError:
        return load_manifest(p)  # its one-line error
    with _LOCK:
        cached = _MANIFESTS.get(key)
    if cached is None:
        cached = load_manifest(p)
        with _LOCK:
            _MANIFESTS[key] = cached
    return cached


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _label_tasks_at_once(manifest) -> int:
    """Label tasks this process computes at once: a Dask worker's threads, else one per
    configured label stage (a process computes one shard per stage at a time)."""
    import sys

    if "distributed" in sys.modules:  # only a Dask worker (or a Dask flow) has imported it
        try:
            from distributed import get_worker

            return max(1, get_worker().state.nthreads)
        except ValueError:  # not in a worker
            pass
    from pipeline.stage import STAGE_NAMES

    return max(1, sum(getattr(manifest.stages, s) is not None for s in STAGE_NAMES))


def torch_threads(manifest) -> int:
    """CPU threads torch uses for label tasks in this process (`executor.torch_threads`)."""
    chosen = manifest.executor.torch_threads
    return chosen or max(1, _cpu_count() // _label_tasks_at_once(manifest))


def _set_torch_threads(manifest) -> None:
    """Once per process, before its first stage is built (caller holds _LOCK)."""
    if _TORCH_THREADS:
        return
    import torch

    n = torch_threads(manifest)
    torch.set_num_threads(n)
    _TORCH_THREADS.append(n)


def _stage_for(name: str, manifest, fingerprint: str):
    """The stage for (name, fingerprint), built once per process; returns (stage, lock)."""
    from pipeline import stage as stage_mod  # looked up at call time so tests can swap stages

    key = (name, fingerprint)
    with _LOCK:
        _set_torch_threads(manifest)
        if key not in _STAGES:
            st = stage_mod.build_stage(name, manifest)
            actual = st.fingerprint()
            if actual != fingerprint:
                raise RuntimeError(
                    f"stages.{name}: fingerprint on this worker ({actual}) differs from the one "
                    f"the flow planned with ({fingerprint}); the manifest, model files or "
                    f"library versions differ between the flow and the worker {_worker_id()}"
                )
            _STAGES[key] = st
            _STAGE_LOCKS[key] = threading.Lock()
        return _STAGES[key], _STAGE_LOCKS[key]


def adopt_stage(name: str, fingerprint: str, stage) -> None:
    """Let the tasks of this process use `stage`, built by the driver, for (name, fingerprint)
    (a stage already held for that key, set up by an earlier run, is kept)."""
    with _LOCK:
        if (name, fingerprint) not in _STAGES:
            _STAGES[(name, fingerprint)] = stage
            _STAGE_LOCKS[(name, fingerprint)] = threading.Lock()


def setup_count(name: str, fingerprint: str) -> int:
    """How many times this process loaded the model of (name, fingerprint)."""
    return SETUP_COUNTS.get((name, fingerprint), 0)


def _ensure_setup(name: str, fingerprint: str, st) -> None:
    key = (name, fingerprint)
    if SETUP_COUNTS.get(key):
        return
    st.setup()
    SETUP_COUNTS[key] = SETUP_COUNTS.get(key, 0) + 1


@task(
    name="ingest",
    task_run_name="ingest",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_when_transient,
)
def ingest_images(manifest_path: str) -> dict[str, Any]:
    """New images from every source into append-only image shards (cheap when nothing is new).

    Not cached by Prefect: the sources can change under the same manifest, and ingest itself
    skips every file it has already recorded (same path, size and mtime).
    """
    from pipeline.ingest import ingest

    res = ingest(read_manifest(manifest_path), progress=False)
    print(res.summary())
    return {
        "new": res.new,
        "duplicates": res.duplicates,
        "quarantined": res.quarantined,
        "skipped": res.skipped,
        "shards_written": list(res.shards_written),
        "seconds": round(res.seconds, 3),
    }


#: Shared by every GPU task: the `gpu` tag (for the concurrency limit), the fingerprint cache
#: key, small JSON results, and retries of transient failures only.
GPU_TASK_OPTIONS: dict[str, Any] = dict(
    tags=[GPU_TAG],
    cache_policy=FINGERPRINT_CACHE,
    persist_result=True,
    result_serializer="json",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_when_transient,
)


@task(
    name="label-shard",
    task_run_name="{stage} shard-{shard:05d}",
    **GPU_TASK_OPTIONS,
)
def label_shard(
    manifest_path: str,
    stage: str,
    fingerprint: str,
    image_shard: str,
    shard: int,
    out_dir: str,
    force: bool = False,
) -> dict[str, Any]:
    """Label one image shard with one stage; returns the ShardResult fields as a dict.

    When a sound label shard already exists (and `force` is off) nothing is loaded or computed
    and the result says `computed: False`: that is how a run after Prefect's result storage was
    wiped stays free. One that fails its integrity check is moved aside and recomputed.
    """
    from pipeline.stage import run_shard

    manifest = read_manifest(manifest_path)
    layout = Layout(Path(out_dir))
    st, lock = _stage_for(stage, manifest, fingerprint)
    with lock:
        try:
            res = run_shard(
                st,
                layout,
                Path(image_shard),
                force=force,
                setup=lambda: _ensure_setup(stage, fingerprint, st),
            )
        except Exception as exc:
            if is_out_of_memory(exc):
                raise StageOutOfMemory(
                    f"{stage} shard-{shard:05d} ({image_shard}): the device ran out of memory "
                    f"and the stage could not absorb it ({type(exc).__name__}: {exc}). Not "
                    f"retried. Lower stages.{stage}.batch_size, run fewer GPU tasks per device "
                    f"(the `gpu` concurrency limit), or use a device with more memory."
                ) from exc
            raise
    if res.note:  # an existing label shard was not trusted (pipeline/integrity.py)
        get_run_logger().warning(res.note)
    out = asdict(res)
    out["images_per_second"] = round(res.images_per_second, 3)
    out["seconds"] = round(res.seconds, 3)
    out["worker"] = _worker_id()
    out["setups"] = setup_count(stage, fingerprint)
    return out


def _set_aside(out: Path) -> None:
    """Rename a finished training output so `--force train` trains again but loses nothing."""
    if out.exists():
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = out.with_name(f"{out.name}.replaced-{stamp}")
        out.rename(aside)
        print(f"train: --force: moved the previous output to {aside}")


@task(
    name="train",
    task_run_name="train {fingerprint}",
    **GPU_TASK_OPTIONS,
)
def train_model(
    manifest_path: str, stage: str, fingerprint: str, out_dir: str, force: bool = False
) -> dict[str, Any]:
    """UniMRG post-training; returns at once when the final checkpoint of this fingerprint exists.

    While it trains, the task logs a line per logged step and publishes progress, loss curves
    and probe grids as artifacts (flows/train_watch.py).

    `stage` is always "train" (it is part of the cache key). Without `force` the trainer resumes
    from the newest checkpoint of this fingerprint, so a killed run continues where it stopped;
    with `force` the existing output folder is renamed aside (`<fp>.replaced-<time>`) first.
    """
    from flows.train_watch import TrainWatch
    from trainer import loop
    from trainer.run_folder import train_output_dir

    manifest = read_manifest(manifest_path)
    out = train_output_dir(manifest, fingerprint)
    if force:
        _set_aside(out)
    watch = TrainWatch(
        out, manifest.trainer.max_steps, random_weights=manifest.trainer.model == "tiny-random"
    )
    try:
        # A manifest whose max_steps changed is a new run (its own fingerprint), said in the log.
        res = loop.train(
            manifest, resume=not force, progress=False, observer=watch, on_other_length="new_run"
        )
    except Exception as exc:
        if is_out_of_memory(exc):
            raise StageOutOfMemory(
                f"train ({fingerprint}): the device ran out of memory ({type(exc).__name__}: "
                f"{exc}). Not retried. Lower trainer.batch_size (raise trainer.grad_accum to "
                f"keep the effective batch) or set trainer.gradient_checkpointing: true."
            ) from exc
        raise
    if res.fingerprint != fingerprint:
        raise RuntimeError(
            f"train: the trainer computed fingerprint {res.fingerprint}, the flow planned "
            f"{fingerprint}; the data changed while the flow ran"
        )
    watch.finish(res.steps, res.computed)
    return {
        "stage": "train",
        "fingerprint": res.fingerprint,
        "path": str(res.output_dir),
        "steps": res.steps,
        "computed": res.computed,
        "last_losses": {k: float(v) for k, v in res.last_losses.items()},
        "worker": _worker_id(),
    }

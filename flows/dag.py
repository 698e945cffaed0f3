"""The unimrg DAG as Prefect flows: ingest, then depth and segment per shard, then train.

    unimrg run [-m MANIFEST] [--only STAGE ...] [--force STAGE ...] [--dask-address ADDR]

Flows (each can be deployed on its own; prefect.yaml deploys `unimrg_dag`):

    unimrg_dag   "unimrg-dag"    ingest -> {depth, segment} x shard -> train (+ preview) -> eval
    ingest_flow  "unimrg-ingest" ingest only
    label_flow   "unimrg-labels" one label stage, one task per image shard
    train_flow   "unimrg-train"  train only
    eval_flow    "unimrg-eval"   eval only (flows/eval.py)

Runs against PREFECT_API_URL when it is set, otherwise against Prefect's temporary local server
(its ephemeral mode). Every (stage, shard) task is cached under (stage fingerprint, input shard
hash, output dir) - see flows/caching.py and docs/orchestration.md - so an unchanged rerun shows
every label and train task as `Cached` and computes nothing.

Per-shard tasks run in this process (threads) by default. With `--dask-address`, or a manifest
`executor: {kind: dask}` section, they run on a Dask cluster through prefect-dask's
DaskTaskRunner (a LocalCluster when no address is given); GPU tasks are annotated with the Dask
resource `GPU`, so only workers started with `--resources GPU=1` get them.
"""

from __future__ import annotations

import os
import queue
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from flows import artifacts
from flows.run_logs import drain_api_workers, wait_for_task_run_records
from flows.runners import DagError, submit, task_runner
from flows.tasks import adopt_stage, ingest_images, label_shard, read_manifest, train_model
from pipeline.integrity import reuse_problem
from pipeline.locks import exclusive
from pipeline.manifest import Manifest
from pipeline.shards import Layout, shard_number
from pipeline.stage import STAGE_NAMES, LabelStage

__all__ = [
    "ALL_STAGES",
    "ingest_flow",
    "label_flow",
    "run_dag",
    "train_flow",
    "unimrg_dag",
    "unreachable_api",
]

ALL_STAGES = ("ingest", *STAGE_NAMES, "train", "eval")
DEFAULT_MANIFEST = "data_manifest.yaml"


# --- stages ----------------------------------------------------------------------------------


def build_stages(manifest: Manifest, names: list[str]) -> dict[str, LabelStage]:
    """The run's label stages `names`, each built once (a stage reads its model files for the
    fingerprint and loads no model until a task sets it up). The driver passes them down, and
    the tasks of this process set up these same objects (`flows.tasks.adopt_stage`)."""
    from pipeline.stage import build_stage

    return {s: build_stage(s, manifest) for s in names}


def _label_stage(
    runner,
    resources: dict,
    manifest_path: str,
    manifest: Manifest,
    built: dict[str, LabelStage],
    names: list[str],
    force: set[str],
    wait_for: list | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], list, list[str]]:
    """One task per (stage, image shard) after `wait_for`; wait for all, write artifacts.

    On the local runner each stage keeps `executor.tasks_in_flight` tasks submitted and
    submits the next as one finishes, so what is in flight (threads, task states held here)
    does not grow with the number of shards. On Dask every task is submitted at once and the
    workers bound what runs.

    Returns (stage -> rows, each a task result plus `how` or a failure; the futures, for the
    tasks downstream to wait for; one line per failed task).
    """
    logger = get_run_logger()
    layout = Layout(manifest.out)
    shards = layout.image_shards()
    on_dask = type(runner).__name__ == "DaskTaskRunner"
    window = max(1, len(shards)) if on_dask else manifest.executor.tasks_in_flight
    fps: dict[str, str] = {}
    todo: dict[str, deque[Path]] = {}
    progress: dict[str, artifacts.StageProgress] = {}
    random_weights: dict[str, bool] = {}
    for name in names:
        stage = built[name]
        fps[name] = stage.fingerprint()  # from files: loads no model
        random_weights[name] = stage.uses_random_weights()
        adopt_stage(name, fps[name], stage)  # the tasks of this process set up this one
        logger.info("%s: fingerprint %s, %d image shard(s)", name, fps[name], len(shards))
        progress[name] = artifacts.StageProgress(name, len(shards))
        todo[name] = deque(shards)
    recompute = label_shard.with_options(refresh_cache=True)

    futures: dict[Any, tuple[str, int]] = {}
    finished: queue.SimpleQueue = queue.SimpleQueue()
    in_flight = dict.fromkeys(names, 0)

    def submit_next(name: str) -> None:
        path = todo[name].popleft()
        n = shard_number(path)
        task = label_shard
        # Files are the truth: a label shard that is gone, cannot be trusted, or is forced
        # must be recomputed even if Prefect still holds a cache record for its key.
        problem = reuse_problem(layout.label_shard(name, fps[name], n), path)
        if name in force or problem:
            if problem and problem != "missing":
                logger.warning("%s shard-%05d: %s; recomputing", name, n, problem)
            task = recompute
        params = {
            "manifest_path": manifest_path,
            "stage": name,
            "fingerprint": fps[name],
            "image_shard": str(path),
            "shard": n,
            "out_dir": str(layout.root),
            "force": name in force,
        }
        fut = submit(runner, resources, task, params, wait_for)
        futures[fut] = (name, n)
        in_flight[name] += 1
        fut.add_done_callback(finished.put)

    for name in names:
        while todo[name] and in_flight[name] < window:
            submit_next(name)

    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    failures: list[str] = []
    for _ in range(len(names) * len(shards)):
        fut = finished.get()
        name, n = futures[fut]
        in_flight[name] -= 1
        if todo[name]:  # keep the stage's window full before reading this result
            submit_next(name)
        try:
            res = dict(fut.result())
            res["how"] = artifacts.how_obtained(res, fut.state.name)
        except Exception as exc:
            res = {"stage": name, "shard": n, "failure": f"{type(exc).__name__}: {exc}"}
            failures.append(f"{name} shard-{n:05d}: {res['failure']}")
        rows[name].append(res)
        progress[name].advance()

    for name in names:
        summary = artifacts.stage_table(name, rows[name], random_weights[name])
        logger.info(summary)
    return rows, list(futures), failures


def _train(
    runner,
    resources: dict,
    manifest_path: str,
    manifest: Manifest,
    force: bool,
    wait_for: list | None = None,
) -> tuple[dict[str, Any] | None, Any]:
    """Submit the train task after `wait_for`; returns (its result or None, its future).

    None when an upstream task failed: Prefect then leaves train `NotReady` (not run), and the
    future is still there for anything downstream of train to wait on.
    """
    from trainer.checkpoints import step_dir
    from trainer.run_folder import train_fingerprint, train_output_dir

    fp = train_fingerprint(manifest)
    final = step_dir(train_output_dir(manifest, fp), manifest.trainer.max_steps)
    task = train_model
    if force or not final.exists():
        task = train_model.with_options(refresh_cache=True)
    params = {
        "manifest_path": manifest_path,
        "stage": "train",
        "fingerprint": fp,
        "out_dir": str(manifest.out),
        "force": force,
    }
    fut = submit(runner, resources, task, params, wait_for)
    fut.wait()
    if fut.state.name == "NotReady":
        get_run_logger().warning("train: not run, an upstream task failed")
        return None, fut
    res = dict(fut.result())
    res["how"] = artifacts.how_obtained(res, fut.state.name)
    get_run_logger().info("train: %s, %s steps, %s", res["how"], res["steps"], res["path"])
    return res, fut


def _selected(manifest: Manifest, only: list[str] | None) -> list[str]:
    configured = ["ingest"]
    configured += [s for s in STAGE_NAMES if getattr(manifest.stages, s) is not None]
    configured += ["train"] if manifest.trainer is not None else []
    configured += ["eval"] if manifest.eval is not None and manifest.trainer is not None else []
    if not only:
        return configured
    bad = [s for s in only if s not in ALL_STAGES]
    if bad:
        raise ValueError(f"--only: unknown stage(s) {bad}; choose from {list(ALL_STAGES)}")
    missing = [s for s in only if s not in configured]
    if missing:
        raise ValueError(
            f"--only {' '.join(missing)}: not configured in the manifest "
            f"({', '.join('stages.' + s if s in STAGE_NAMES else s for s in missing)})"
        )
    return [s for s in ALL_STAGES if s in only]


def _preview(manifest: Manifest, built: dict[str, LabelStage], summaries: list[str]) -> str | None:
    """Write <output_dir>/preview.png and its markdown artifact; a failure only warns."""
    from pipeline.preview import make_preview

    try:
        # The preview shows every configured stage's labels, also those this run did not make.
        others = [
            s for s in STAGE_NAMES if getattr(manifest.stages, s) is not None and s not in built
        ]
        stages = {**built, **build_stages(manifest, others)}
        random_weights = any(s.uses_random_weights() for s in stages.values())
        path = make_preview(manifest, manifest.out / "preview.png", n=8, stages=stages)
        artifacts.preview_markdown(path, random_weights, summaries)
        return str(path)
    except Exception as exc:  # a report must not fail the labels it reports on
        get_run_logger().warning("preview not written: %s: %s", type(exc).__name__, exc)
        return None


# --- names and tags ----------------------------------------------------------------------------

#: Tag on runs that use a `tiny-random` model anywhere: their labels and checkpoints are noise.
RANDOM_WEIGHTS_TAG = "random-weights"


def run_name(manifest_path: str | Path, stages: list[str], when: datetime | None = None) -> str:
    """`<manifest> <stage+stage> <local time>`: the manifest's file name, or its folder's name
    for the default `data_manifest.yaml`, e.g. `demo ingest+depth+segment+train 2026-05-01 02:00:03`.
    """
    path = Path(manifest_path)
    label = path.stem if path.stem != Path(DEFAULT_MANIFEST).stem else path.resolve().parent.name
    stamp = (when or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
    return f"{label} {'+'.join(stages)} {stamp}"


def uses_random_weights(
    manifest: Manifest, built: dict[str, LabelStage], stages: list[str]
) -> bool:
    """Whether any of these stages runs a `tiny-random` model (reads files, loads none)."""
    if "train" in stages and manifest.trainer is not None:
        if manifest.trainer.model == "tiny-random":
            return True
    return any(built[s].uses_random_weights() for s in stages if s in built)


def _stages_of_this_run() -> tuple[str, list[str]]:
    """(manifest path, stages) of the flow run being named, from its parameters."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    path = params.get("manifest_path", DEFAULT_MANIFEST)
    name = flow_run.flow_name
    if name == "unimrg-ingest":
        return path, ["ingest"]
    if name == "unimrg-labels":
        return path, [params.get("stage", "depth")]
    if name == "unimrg-train":
        return path, ["train"]
    try:
        return path, _selected(read_manifest(path), params.get("only"))
    except Exception:  # the flow body reports a bad manifest; a name must not fail the run
        return path, list(params.get("only") or ["all"])


def _flow_run_name() -> str:
    return run_name(*_stages_of_this_run())


def _tag_run(manifest: Manifest, built: dict[str, LabelStage], stages: list[str]) -> None:
    """Add the stages and, when it applies, `random-weights` to this flow run's tags."""
    from prefect.client.orchestration import get_client

    run = FlowRunContext.get().flow_run
    tags = {"unimrg", *stages}
    if uses_random_weights(manifest, built, stages):
        tags.add(RANDOM_WEIGHTS_TAG)
    tags |= set(run.tags)
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=sorted(tags))


# --- flows -----------------------------------------------------------------------------------


@flow(name="unimrg-dag", flow_run_name=_flow_run_name, log_prints=True)
def unimrg_dag(
    manifest_path: str = DEFAULT_MANIFEST,
    only: list[str] | None = None,
    force: list[str] | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Ingest, then depth and segment per image shard (in parallel), then train.

    `only`: run just these stages (default: every configured one). `force`: recompute these
    stages even when cached. `dask_address`: run per-shard tasks on this Dask scheduler.

    Every task is submitted with `wait_for` its upstream tasks, so Prefect records the edges
    (the run graph shows ingest -> label shards -> train) and a failed upstream leaves its
    dependents `NotReady`. A stage added after train waits on `summary`'s train future the same
    way (`upstream["train"]`).
    """
    manifest = read_manifest(manifest_path)
    stages = _selected(manifest, only)
    labels = [s for s in stages if s in STAGE_NAMES]
    built = build_stages(manifest, labels)
    forced = set(force or [])
    _tag_run(manifest, built, stages)
    summary: dict[str, Any] = {"stages": stages}
    upstream: dict[str, list] = {}
    if "ingest" in forced:
        get_run_logger().info("--force ingest: ingest is never cached; it runs every time")
    if "ingest" in stages:
        ingest = ingest_images.submit(manifest_path)
        summary["ingest"] = ingest.result()
        # The finished state, not the future: a Dask task can wait on a state (pickled with
        # it) but not on a thread future of this process.
        upstream["ingest"] = [ingest.state]
    failures: list[str] = []
    with task_runner(manifest, dask_address) as (runner, gpu):
        if labels:
            rows, futures, failures = _label_stage(
                runner, gpu, manifest_path, manifest, built, labels, forced, upstream.get("ingest")
            )
            upstream["labels"] = futures
            summary.update(rows)
            summary["preview"] = _preview(
                manifest, built, [artifacts.stage_summary(n, rows[n]) for n in labels]
            )
        if "train" in stages:
            wait = upstream.get("labels") or upstream.get("ingest")
            summary["train"], train = _train(
                runner, gpu, manifest_path, manifest, "train" in forced, wait
            )
            upstream["train"] = [train]
        if "eval" in stages:
            from flows.eval import eval_stage

            if "train" in stages and summary["train"] is None:
                get_run_logger().warning("eval: not run, training did not run")
            else:
                summary["eval"] = eval_stage(
                    runner, gpu, manifest_path, manifest, "eval" in forced, upstream.get("train")
                )
    if failures:
        raise DagError(f"{len(failures)} label task(s) failed:\n" + "\n".join(failures))
    return summary


@flow(name="unimrg-ingest", flow_run_name=_flow_run_name, log_prints=True)
def ingest_flow(manifest_path: str = DEFAULT_MANIFEST) -> dict[str, Any]:
    """New images from the manifest's sources into append-only image shards."""
    _tag_run(read_manifest(manifest_path), {}, ["ingest"])
    return ingest_images(manifest_path)


@flow(name="unimrg-labels", flow_run_name=_flow_run_name, log_prints=True)
def label_flow(
    manifest_path: str = DEFAULT_MANIFEST,
    stage: str = "depth",
    force: bool = False,
    dask_address: str | None = None,
) -> list[dict[str, Any]]:
    """One label stage over every image shard (one task per shard)."""
    manifest = read_manifest(manifest_path)
    _selected(manifest, [stage])
    built = build_stages(manifest, [stage])
    _tag_run(manifest, built, [stage])
    with task_runner(manifest, dask_address) as (runner, gpu):
        rows, _, failures = _label_stage(
            runner, gpu, manifest_path, manifest, built, [stage], {stage} if force else set()
        )
    if failures:
        raise DagError(f"{len(failures)} label task(s) failed:\n" + "\n".join(failures))
    return rows[stage]


@flow(name="unimrg-train", flow_run_name=_flow_run_name, log_prints=True)
def train_flow(manifest_path: str = DEFAULT_MANIFEST, force: bool = False) -> dict[str, Any]:
    """UniMRG post-training on the labelled shards."""
    manifest = read_manifest(manifest_path)
    _selected(manifest, ["train"])
    _tag_run(manifest, {}, ["train"])
    with task_runner(manifest) as (runner, gpu):
        return _train(runner, gpu, manifest_path, manifest, force)[0]


# --- CLI entry -------------------------------------------------------------------------------


#: The temporary server's task-run recorder writes one SQLite transaction per event by default
#: (batch size 1), slower than a thousand-task run emits them; in batches of up to 200 it keeps
#: up. Environment variables already set win.
_RECORDER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


@contextmanager
def _api_server() -> Iterator[None]:
    """PREFECT_API_URL when set; otherwise Prefect's temporary local server, made explicit.

    Prefect would start that server by itself (ephemeral mode), but only in this process: Dask
    worker processes would each start their own. Setting PREFECT_API_URL to it for the run lets
    the task runs on workers report to the same server (prefect-dask ships the settings).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    # Its telemetry heartbeat only prints "database is locked" tracebacks when SQLite is busy.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for name, value in _RECORDER_SETTINGS.items():
        os.environ.setdefault(name, value)
    from prefect.settings import PREFECT_HOME

    print(
        "unimrg: PREFECT_API_URL is not set: using a temporary local Prefect server "
        f"(history and cache records stay in {PREFECT_HOME.value()}; set PREFECT_API_URL to "
        "use the UI)"
    )
    started = datetime.now(UTC)
    server = SubprocessASGIServer()  # the instance Prefect's ephemeral mode would use
    server.start()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                # Prefect's log and event workers send in the background and would otherwise
                # drain at interpreter exit, after the server below is gone: a minute of
                # connection retries, then "Error logging to API" and lost task-run states.
                drain_api_workers()
                # Then the server's recorder writes those states behind the client; stopped
                # early it is cancelled mid-write and the history keeps them open.
                try:
                    flush = os.environ["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"]
                    left = wait_for_task_run_records(started, settle_s=float(flush) + 0.5)
                except (httpx.HTTPError, ValueError) as exc:  # the history only: never fail the run
                    left = f"unknown ({type(exc).__name__}: {exc})"
                if left:
                    print(
                        f"unimrg: task runs still open in the temporary server's history when "
                        f"it stopped: {left} (their results on disk are unaffected)",
                        file=sys.stderr,
                    )
    finally:
        server.stop()


def unreachable_api() -> str | None:
    """Why PREFECT_API_URL, when set, cannot serve this run (None when it can or is unset).

    Checked before the flow starts so an unreachable server is one line, not the engine's
    traceback.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    with get_client(sync_client=True) as client:
        exc = client.api_healthcheck()
    if exc is None:
        return None
    return (
        f"cannot reach the Prefect API at PREFECT_API_URL={url} ({type(exc).__name__}: "
        f"{exc}); start that server, or unset PREFECT_API_URL (`unimrg run` then uses "
        "a temporary local server)"
    )


def run_dag(
    manifest_path: str | Path,
    only: list[str] | None = None,
    force: list[str] | None = None,
    dask_address: str | None = None,
) -> int:
    """`unimrg run`: run the DAG flow; exit code 0 when every task finished, 1 otherwise, 2 for
    a stage selection the manifest does not allow (checked before the flow starts)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    manifest_path = str(Path(manifest_path).resolve())
    try:
        # Stage selection is checked here, before a flow run exists: one line, exit 2. The
        # flow below reads this same parse (`read_manifest`).
        manifest = read_manifest(manifest_path)
        _selected(manifest, only)
    except ValueError as exc:
        print(f"unimrg: error: {exc}", file=sys.stderr)
        return 2
    unreachable = unreachable_api()
    if unreachable:
        print(f"unimrg: {unreachable}", file=sys.stderr)
        return 1
    # One DAG per output folder: a second `unimrg run` is refused at once (pipeline/locks.py).
    with exclusive(manifest.out / ".run.lock", "another `unimrg run` is using this output folder"):
        with _api_server():
            state = unimrg_dag(
                manifest_path=manifest_path,
                only=only,
                force=force,
                dask_address=dask_address,
                return_state=True,
            )
    ui = PREFECT_UI_URL.value()
    run_id = state.state_details.flow_run_id
    if ui and PREFECT_API_URL.value():
        print(f"unimrg: flow run {ui.rstrip('/')}/runs/flow-run/{run_id}")
    if not state.is_completed():
        print(f"unimrg: the DAG ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    for name in STAGE_NAMES:
        if name in result:
            print(artifacts.stage_summary(name, result[name]))
    if result.get("train"):
        t = result["train"]
        print(f"train: {t['how']}, {t['steps']} steps -> {t['path']}")
    if result.get("preview"):
        print(f"preview: {result['preview']}")
    if result.get("eval"):
        print(result["eval"]["table"])
    return 0

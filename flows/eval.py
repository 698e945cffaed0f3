"""The eval stage in Prefect: one task per (model, benchmark), the table and the probe grid.

    eval_stage(runner, resources, manifest_path, manifest)   called by flows/dag.py after train
    eval_flow                                                 "unimrg-eval": eval only

Tasks are named like `eval mmvp step_002500` and keyed by the eval fingerprint and the task's
folder (flows/caching.FINGERPRINT_CACHE), so an unchanged rerun shows them `Cached`; the files
stay the truth (a folder without scores.json is recomputed, a body that finds scores.json
returns at once). The stage publishes the table (benchmark, metric, base, post-trained, delta)
as a table artifact and the generation probe's grid as an image artifact that points at the
PNG file (a file:// URL, not an embedded copy).
"""

from __future__ import annotations

import threading
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed

from flows.runners import DagError, submit, task_runner
from flows.tasks import GPU_TASK_OPTIONS, read_manifest
from pipeline.manifest import Manifest

__all__ = ["eval_flow", "eval_stage", "evaluate_one"]

#: One eval at a time per process (one GPU) and the last model kept loaded: the tasks of one
#: model run back to back and load it once.
_LOCK = threading.Lock()
_LOADED: dict[str, Any] = {}


def _adapter_for(manifest, model) -> Any:
    from trainer.evaluation.evaluate import load_adapter

    key = f"{model.spec}@{model.revision}"
    if key not in _LOADED:
        _LOADED.clear()  # free the previous model first
        _LOADED[key] = load_adapter(manifest, model)
    return _LOADED[key]


@task(name="eval", task_run_name="{title}", **GPU_TASK_OPTIONS)
def evaluate_one(
    manifest_path: str, stage: str, fingerprint: str, out_dir: str, title: str
) -> dict[str, Any]:
    """Evaluate one (model, benchmark) planned by the flow; `stage` is always "eval".

    Re-plans on the worker and checks the fingerprint matches (a different manifest, model file
    or benchmark file on the worker is an error, not a silent other result).
    """
    from trainer.evaluation.evaluate import eval_models, plan_eval, run_task, task_result

    manifest = read_manifest(manifest_path)
    tasks, _ = plan_eval(manifest, eval_models(manifest))
    mine = [t for t in tasks if t.title == title]
    if not mine or mine[0].fingerprint != fingerprint:
        raise RuntimeError(
            f"{title}: the worker planned {mine[0].fingerprint if mine else 'no such task'}, the "
            f"flow planned {fingerprint}; the manifest, model or benchmark files differ"
        )
    t = mine[0]
    if t.done:
        return task_result(t, "on disk")
    with _LOCK:
        run_task(t, manifest, _adapter_for(manifest, t.model), progress=False)
    return task_result(t, "computed")


def _how(res: dict[str, Any], state_name: str | None) -> str:
    return "cached" if state_name == "Cached" else res["how"]


def eval_stage(
    runner,
    resources: dict,
    manifest_path: str,
    manifest: Manifest,
    force: bool = False,
    wait_for=None,
) -> dict[str, Any]:
    """Submit one task per (model, benchmark), wait, publish the table and the probe grid."""
    from trainer.evaluation.evaluate import (
        EvalReport,
        eval_models,
        eval_table,
        format_table,
        plan_eval,
    )

    logger = get_run_logger()
    tasks, notes = plan_eval(manifest, eval_models(manifest))
    futures = {}
    for t in tasks:
        if force and t.done:
            (t.out_dir / "scores.json").unlink()
        run = evaluate_one.with_options(refresh_cache=True) if not t.done else evaluate_one
        params = {
            "manifest_path": manifest_path,
            "stage": "eval",
            "fingerprint": t.fingerprint,
            "out_dir": str(t.out_dir),
            "title": t.title,
        }
        futures[submit(runner, resources, run, params, wait_for)] = t
    results: dict[str, dict[str, Any]] = {}
    failures = []
    for fut in as_completed(list(futures)):
        t = futures[fut]
        try:
            res = dict(fut.result())
            res["how"] = _how(res, fut.state.name)
            results[t.title] = res
        except Exception as exc:
            failures.append(f"{t.title}: {type(exc).__name__}: {exc}")
    # the table in plan order (benchmarks, then models), as the CLI prints it
    ordered = {t.title: results[t.title] for t in tasks if t.title in results}
    report = EvalReport(tasks, ordered, notes)
    text = format_table(report)
    logger.info("eval:\n%s", text)
    rows = [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        for r in eval_table(list(ordered.values()))
    ]
    description = "base vs post-trained"
    if report.random_weights:
        description += ": RANDOM WEIGHTS (tiny-random), scores are noise"
    create_table_artifact(table=rows, key="unimrg-eval", description=description)
    grids = [r for r in ordered.values() if r["kind"] == "generation"]
    if grids:
        from pathlib import Path

        grid = Path(grids[-1]["path"]) / "grid.png"
        if grid.is_file():
            create_image_artifact(
                image_url=grid.resolve().as_uri(),
                key="unimrg-eval-generation-probe",
                description=f"generation probe, {grids[-1]['model']}: {grid}",
            )
    for n in notes:
        logger.info("eval: %s", n)
    if failures:
        raise DagError(f"{len(failures)} eval task(s) failed:\n" + "\n".join(failures))
    if not tasks:
        create_markdown_artifact(
            markdown="No eval tasks: " + "; ".join(notes), key="unimrg-eval-notes"
        )
    return {"table": text, "results": list(ordered.values()), "notes": notes}


@flow(name="unimrg-eval", flow_run_name="eval {manifest_path}", log_prints=True)
def eval_flow(manifest_path: str = "data_manifest.yaml", force: bool = False) -> dict[str, Any]:
    """Score the base model and the checkpoints on the manifest's benchmarks and probes."""
    manifest = read_manifest(manifest_path)
    with task_runner(manifest) as (runner, gpu):
        return eval_stage(runner, gpu, manifest_path, manifest, force)

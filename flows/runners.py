"""Where the flows' tasks run and how they are submitted; shared by flows/dag.py and flows/eval.py.

task_runner(manifest)   the per-shard tasks' runner: a bounded thread pool in this process,
                        or a DaskTaskRunner (the manifest's `executor` section)
submit(runner, ...)     submit a task with exactly the upstream edges it is given
DagError                some tasks failed; the message lists them
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import get_run_logger
from prefect.utilities.annotations import opaque, quote

from pipeline.manifest import Manifest
from pipeline.stage import STAGE_NAMES

__all__ = ["DagError", "label_threads", "submit", "task_runner"]


class DagError(RuntimeError):
    """Some tasks failed; the message lists them."""


@contextmanager
def task_runner(manifest: Manifest, dask_address: str | None = None) -> Iterator[tuple[Any, dict]]:
    """(task runner, Dask resources for GPU tasks) for the per-shard tasks of this flow run.

    Chosen at run time from the manifest (so a deployment honours its manifest's `executor`
    section too): a pool of `label_threads(manifest)` threads in this process, or a
    DaskTaskRunner started here.

    Not the flow's own thread pool: Prefect's ThreadPoolTaskRunner is unbounded by default and
    starts a thread for every task submitted while none is idle. Every such thread that runs
    torch ops keeps its own OpenMP team and its thread-local buffers (several MB) for as long
    as it lives, and a pool thread lives until the flow ends: one label task per shard made the
    process grow by about two OS threads and 16 MB per shard (BENCHMARKS.md, issue 21).
    """
    ex = manifest.executor
    address = dask_address or ex.dask_address
    if not address and ex.kind != "dask":
        from prefect.task_runners import ThreadPoolTaskRunner

        with ThreadPoolTaskRunner(max_workers=label_threads(manifest)) as runner:
            yield runner, {}
        return
    from prefect_dask import DaskTaskRunner

    gpu = {"GPU": ex.gpus_per_task} if ex.gpus_per_task else {}
    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": ex.n_workers,
                "processes": True,
                "threads_per_worker": 1,
                # Each local worker process stands for one GPU.
                "resources": {"GPU": max(1, ex.gpus_per_task)},
                "dashboard_address": ":0",
            }
        )
    with runner:
        get_run_logger().info(
            "per-shard tasks run on Dask (%s), GPU tasks need resources %s",
            address or f"LocalCluster, {ex.n_workers} worker processes",
            gpu or "none",
        )
        yield runner, gpu


def label_threads(manifest: Manifest) -> int:
    """Threads of the local task runner: `tasks_in_flight` per label stage (at least 2, so a
    task that waits on an upstream never holds the only thread)."""
    return max(2, len(STAGE_NAMES) * manifest.executor.tasks_in_flight)


def submit(runner, resources: dict, task, params: dict[str, Any], wait_for=None):
    """Submit `task` with its upstream edges exactly `wait_for`, and no others.

    Prefect also infers edges by object identity: any parameter value, or anything inside a
    `wait_for` state, that *is* an object a finished task returned (or holds at its top level)
    becomes an input from that task. Our results and parameters share interned strings (the
    stage name, dict keys such as "seconds"), so a shard submitted after another finished
    would show an edge from it, and a label task waiting on ingest's state an edge from the
    last label task to finish. Parameters are constants here, so they are `quote`d (passed
    through unchanged, never searched), and each upstream is `opaque` (waited on and recorded,
    its contents never searched).

    Not on Dask: a task there runs in a worker whose record of results starts empty (Prefect
    does not send it), so there is nothing to mistake; and Dask packs the annotations, being
    tuples, into plain tuples, which the task would then receive.
    """
    on_dask = type(runner).__name__ == "DaskTaskRunner"
    if not on_dask:
        params = {k: quote(v) for k, v in params.items()}
        wait_for = None if wait_for is None else [opaque(w) for w in wait_for]
    if resources and on_dask:
        import dask

        # prefect-dask submits through distributed.Client.submit, which picks up the
        # annotations active at submission time.
        with dask.annotate(resources=resources):
            return runner.submit(task, params, wait_for)
    return runner.submit(task, params, wait_for)

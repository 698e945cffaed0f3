"""Per-shard tasks on Dask through prefect-dask: a LocalCluster of two worker processes.

The manifest's `executor: {kind: dask}` section (no address) starts a LocalCluster with two
single-threaded worker processes that each declare one `GPU` resource; the GPU-tagged label
tasks, annotated with `resources={"GPU": 1}`, run there, one model load per worker process.
A second test routes tasks by resource: of two workers only the one declaring `GPU` gets them.
"""

from __future__ import annotations

import os

import yaml

from pipeline.ingest import ingest
from pipeline.manifest import load_manifest
from tests.conftest import encode, synthetic_image
from tests.flows.conftest import task_states


def _workspace(tmp_path, executor: dict) -> str:
    (tmp_path / "imgs").mkdir()
    for s in range(5):
        (tmp_path / "imgs" / f"{s}.png").write_bytes(encode(synthetic_image(s, (40, 32)), "PNG"))
    path = tmp_path / "m.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": "out",
                "shard_size": 1,
                "sources": [{"name": "imgs", "path": "imgs"}],
                "stages": {"depth": {"model": "tiny-random", "batch_size": 1, "input_size": 28}},
                "executor": executor,
            }
        )
    )
    ingest(load_manifest(path), progress=False)
    return str(path)


def test_label_tasks_run_on_a_local_dask_cluster(prefect_api, tmp_path):
    from flows.dag import label_flow

    manifest = _workspace(tmp_path, {"kind": "dask", "n_workers": 2, "gpus_per_task": 1})
    state = label_flow(manifest_path=manifest, stage="depth", return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert sorted(r["shard"] for r in rows) == [0, 1, 2, 3, 4]
    assert all(r["computed"] and r["rows"] == 1 for r in rows)
    workers = {r["worker"] for r in rows}
    # They ran in the cluster's worker processes, not in this one ...
    assert all(not w.endswith(f":{os.getpid()}") for w in workers)
    assert 1 <= len(workers) <= 2
    # ... and each worker process loaded the model once, however many shards it ran.
    assert {r["setups"] for r in rows} == {1}
    states = task_states(state.state_details.flow_run_id, expected=5)
    assert states == {f"depth shard-{n:05d}": "Completed" for n in range(5)}


def test_only_workers_declaring_gpu_get_gpu_tasks(prefect_api, tmp_path):
    from distributed import Nanny, Scheduler, SpecCluster

    from flows.dag import label_flow

    spec = {
        "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
        "cpu": {"cls": Nanny, "options": {"nthreads": 1}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=spec, scheduler=scheduler) as cluster:
        from distributed import Client

        with Client(cluster) as client:
            client.wait_for_workers(2)
            pids = client.run(os.getpid)  # worker address -> pid
            info = client.scheduler_info()["workers"]
            gpu_pid = next(pids[a] for a, w in info.items() if w.get("resources", {}).get("GPU"))
        manifest = _workspace(tmp_path, {"kind": "dask", "gpus_per_task": 1})
        state = label_flow(
            manifest_path=manifest,
            stage="depth",
            dask_address=cluster.scheduler_address,
            return_state=True,
        )
    assert state.is_completed(), state.message
    rows = state.result()
    assert len(rows) == 5
    assert {r["worker"].rsplit(":", 1)[1] for r in rows} == {str(gpu_pid)}


def test_the_dag_on_dask_records_the_ingest_edge(prefect_api, tmp_path):
    """Label tasks on Dask workers wait on ingest, which ran in the flow's process (its state
    travels to the worker; a thread future of this process could not)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.dag import unimrg_dag

    manifest = _workspace(tmp_path, {"kind": "dask", "n_workers": 1, "gpus_per_task": 1})
    state = unimrg_dag(manifest_path=manifest, only=["ingest", "depth"], return_state=True)
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    task_states(run_id, expected=6)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    by_name = {r.name: r for r in runs}
    ingest_id = by_name["ingest"].id
    labels = [r for n, r in by_name.items() if n.startswith("depth ")]
    assert len(labels) == 5
    assert all({i.id for i in r.task_inputs["wait_for"]} == {ingest_id} for r in labels)

"""What the Prefect UI shows of a run, read back from a real temporary API server.

- task runs carry their upstream task runs (`task_inputs["wait_for"]`): the run graph has
  edges ingest -> label shards -> train, and a failed upstream leaves train `NotReady`;
- the train task logs a line per logged step and publishes progress, loss-curve and probe
  artifacts, images as small thumbnails plus the file's path;
- a warning from a stage's own logger (depth's OOM batch halving) is in the task run's logs;
- flow runs are named for the manifest, the stages and the time, and tagged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.flows.conftest import task_states
from tests.flows.test_dag import _add_images, _manifest

#: An artifact holding an image must stay far below the old ~1 MB base64 preview.
MAX_IMAGE_ARTIFACT = 70_000


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _task_runs(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name: r for r in runs}, {r.id: r for r in runs}


def _logs(task_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    from flows.run_logs import drain_api_workers

    drain_api_workers()  # logs are sent in the background; make sure they have arrived
    with _client() as client:
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))
        )
    return [log.message for log in logs]


def _artifacts(flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key: dict = {}
    for a in sorted(arts, key=lambda a: a.created):
        by_key.setdefault(a.key, []).append(a)
    return by_key


def _describe(ids, by_id) -> list[str]:
    """Each task run id as `name (flow run, state)`, read from the API when not of this run."""
    out = []
    with _client() as client:
        for i in ids:
            r = by_id.get(i) or client.read_task_run(i)
            out.append(f"{r.name} (flow run {r.flow_run_id}, {r.state_name}, {i})")
    return out


def _wait_ids(run) -> set:
    return {i.id for i in run.task_inputs.get("wait_for", [])}


def _parameter_edges(run) -> dict:
    return {k: v for k, v in run.task_inputs.items() if k != "wait_for" and v}


def test_edges_are_only_wait_for(prefect_api):
    """A task submitted through the DAG's `_submit` has exactly the upstreams it was given.

    Prefect links a finished task's result, and each top-level item of it, to that task by
    object identity. Results here share interned strings with parameters (the stage name) and
    with an upstream's state (dict keys), so without quoting a shard submitted after another
    finished would show edges from it: deterministic here, since shard 1 finishes before
    shard 2 is submitted.
    """
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.runners import submit as _submit

    @task(task_run_name="{stage} shard-{shard}")
    def shard_task(stage: str, shard: int) -> dict:
        return {"stage": stage, "shard": shard, "seconds": 0.5 + shard}

    @flow
    def shards():
        up = shard_task.submit("depth", 0)
        up.result()
        with ThreadPoolTaskRunner(max_workers=1) as runner:
            for n in (1, 2):
                _submit(runner, {}, shard_task, {"stage": "depth", "shard": n}, [up.state]).wait()
        return up.task_run_id

    state = shards(return_state=True)
    upstream = state.result()
    task_states(state.state_details.flow_run_id, expected=3)
    runs, by_id = _task_runs(state.state_details.flow_run_id)
    for name in ("depth shard-1", "depth shard-2"):
        waits = _wait_ids(runs[name])
        assert waits == {upstream}, (name, _describe(waits, by_id))
        assert _parameter_edges(runs[name]) == {}, (name, _parameter_edges(runs[name]))


def test_the_run_as_the_ui_shows_it(prefect_api, tmp_path):
    """One DAG run: edges, train step logs and artifacts, name and tags."""
    from flows.dag import unimrg_dag

    ws = tmp_path / "demo"
    ws.mkdir()
    _add_images(ws, range(4))
    manifest = _manifest(ws)
    data = manifest.read_text().replace("max_steps: 1", "max_steps: 2")
    manifest.write_text(data)
    state = unimrg_dag(manifest_path=str(manifest), return_state=True)
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    task_states(run_id, expected=6)
    runs, by_id = _task_runs(run_id)

    # edges: every label task waits on ingest, train on every label task (looked up by id: the
    # edge must point at a task run of this flow run named ingest)
    labels = [r for n, r in runs.items() if n.startswith(("depth ", "segment "))]
    (train,) = [r for n, r in runs.items() if n.startswith("train ")]
    assert len(labels) == 4
    for r in labels:
        waits = _wait_ids(r)
        assert len(waits) == 1 and by_id.get(next(iter(waits))) is not None, (
            r.name,
            _describe(waits, by_id),
        )
        assert by_id[next(iter(waits))].name == "ingest", (r.name, _describe(waits, by_id))
    assert _wait_ids(train) == {r.id for r in labels}
    # ... and no edge Prefect inferred from a parameter (see test_edges_are_only_wait_for)
    for r in [*labels, train]:
        assert _parameter_edges(r) == {}, (r.name, _parameter_edges(r))

    # training you can watch: a log line per step, progress, loss curves, probe grid
    lines = _logs(train.id)
    assert any(m.startswith("step 1/2: ") and "total" in m for m in lines), lines
    assert any(m.startswith("step 2/2: ") for m in lines), lines
    arts = _artifacts(run_id)
    assert arts["unimrg-train-progress"][-1].data == 100.0
    out = Path(state.result()["train"]["path"])
    for key, file in (("unimrg-train-loss", out / "loss.png"), ("unimrg-train-probe", None)):
        published = arts[key]
        # loss curves at each checkpoint (save_every 1: steps 1 and 2); a probe per eval step
        assert len(published) == 2, (key, len(published))
        for a in published:
            assert a.type == "image" and a.data.startswith("data:image/")
            assert len(a.data) < MAX_IMAGE_ARTIFACT, (key, len(a.data))
        path = file or out / "probe" / "step_000002.png"
        assert f"`{path}`" in published[-1].description and path.is_file()
    assert "random weights" in arts["unimrg-train-loss"][-1].description
    # the preview: a thumbnail and the path of the full-size sheet, not a megabyte of base64
    (preview,) = arts["unimrg-preview"]
    assert (
        len(preview.data) < MAX_IMAGE_ARTIFACT and str(ws / "out" / "preview.png") in preview.data
    )

    # name and tags
    with _client() as client:
        fr = client.read_flow_run(run_id)
    assert fr.name.startswith("m ingest+depth+segment+train 20"), fr.name
    assert {"unimrg", "ingest", "depth", "segment", "train", "random-weights"} <= set(fr.tags)


def test_a_failed_upstream_leaves_train_not_run(prefect_api, tmp_path, monkeypatch):
    """A label shard that fails (an OOM: not retried) -> train is `NotReady`, the flow Failed."""
    from flows import tasks
    from flows.dag import unimrg_dag
    from pipeline import stage as stage_mod

    ws = tmp_path / "ws"
    ws.mkdir()
    _add_images(ws, range(2))
    manifest = _manifest(ws)
    real_build = stage_mod.build_stage

    def build(name, m):
        st = real_build(name, m)
        if name == "segment":

            def run_shard(*a, **k):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

            st.run_shard = run_shard
        return st

    monkeypatch.setattr(stage_mod, "build_stage", build)
    monkeypatch.setattr(tasks, "_STAGES", {})
    state = unimrg_dag(
        manifest_path=str(manifest), only=["ingest", "segment", "train"], return_state=True
    )
    assert state.is_failed()
    assert "segment shard-00000" in state.message
    run_id = state.state_details.flow_run_id
    states = task_states(run_id, expected=1)
    runs, _ = _task_runs(run_id)
    (train,) = [n for n in runs if n.startswith("train ")]
    assert states["segment shard-00000"] == "Failed"
    assert states[train] == "NotReady", states
    assert _wait_ids(runs[train]) == {runs["segment shard-00000"].id}


def test_a_stage_loggers_warning_reaches_the_task_run_logs(prefect_api, tmp_path, monkeypatch):
    """Depth halves its batch on a (simulated) CUDA OOM and says so on `pipeline.depth`."""
    import torch

    from flows import tasks
    from flows.dag import label_flow
    from pipeline import stage as stage_mod
    from pipeline.ingest import ingest
    from pipeline.manifest import load_manifest

    ws = tmp_path / "ws"
    ws.mkdir()
    _add_images(ws, range(2))
    manifest = _manifest(ws)
    ingest(load_manifest(manifest), progress=False)
    real_build = stage_mod.build_stage

    def build(name, m):
        st = real_build(name, m)
        real_setup = st.setup

        def setup():
            real_setup()
            real_forward = st._model_forward

            def forward(pixel_values):
                if pixel_values.shape[0] > 1:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
                return real_forward(pixel_values)

            st._model_forward = forward

        st.setup = setup
        return st

    monkeypatch.setattr(stage_mod, "build_stage", build)
    monkeypatch.setattr(tasks, "_STAGES", {})
    monkeypatch.setattr(tasks, "SETUP_COUNTS", {})
    state = label_flow(manifest_path=str(manifest), stage="depth", force=True, return_state=True)
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    task_states(run_id, expected=1)
    run = _task_runs(run_id)[0]["depth shard-00000"]
    lines = _logs(run.id)
    assert any("halving the batch to 1" in m for m in lines), lines


def test_run_names_say_manifest_stages_and_time():
    from datetime import datetime

    from flows.dag import run_name

    when = datetime(2026, 5, 1, 2, 0, 3)
    assert run_name("/data/nightly.yaml", ["ingest", "depth"], when) == (
        "nightly ingest+depth 2026-05-01 02:00:03"
    )
    # the default file name says nothing: its folder does
    assert run_name("/srv/demo/data_manifest.yaml", ["train"], when).startswith("demo train ")


@pytest.mark.parametrize("side", [64, 4000])
def test_thumbnails_stay_small(tmp_path, side):
    import base64

    import numpy as np
    from PIL import Image

    from flows.artifacts import THUMBNAIL_BYTES, thumbnail_uri

    noise = np.random.default_rng(0).integers(0, 256, (side, side // 2 + 1, 3), dtype=np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(noise).save(path)
    uri = thumbnail_uri(path)
    head, data = uri.split(",", 1)
    assert head.startswith("data:image/") and len(base64.b64decode(data)) <= THUMBNAIL_BYTES

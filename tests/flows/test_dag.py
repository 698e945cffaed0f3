"""The whole DAG under a real temporary Prefect API server, read back through the client.

One scenario on tiny data with the real `tiny-random` depth and segment stages and the real
tiny-random trainer:
1. first run computes every (stage, shard) and trains;
2. a rerun shows every label and train task `Cached`;
3. changing one depth parameter recomputes depth and train only, segment stays `Cached`;
4. new images: only the new shard's tasks run;
5. with Prefect's result storage wiped nothing is recomputed (tasks `Completed`, results say
   `computed: False`, files untouched), and the run after that is `Cached` again;
6. `force=["depth"]` recomputes depth only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.shards import Layout
from tests.conftest import encode, synthetic_image
from tests.flows.conftest import task_states


def _manifest(ws: Path, input_size: int = 28) -> Path:
    data = {
        "output_dir": "out",
        "shard_size": 2,
        "sources": [{"name": "imgs", "path": "imgs"}],
        "stages": {
            "depth": {"model": "tiny-random", "batch_size": 2, "input_size": input_size},
            "segment": {"model_type": "tiny-random", "points_per_side": 2, "batch_size": 2},
        },
        "trainer": {
            "model": "tiny-random",
            "batch_size": 1,
            "max_steps": 1,
            "save_every": 1,
            "eval_every": 1,
            "log_every": 1,
            "loss_weights": {
                "understanding": 0.0,
                "reconstruction": 1.0,
                "depth": 1.0,
                "segmentation": 1.0,
            },
        },
    }
    path = ws / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _add_images(ws: Path, seeds: range) -> None:
    (ws / "imgs").mkdir(exist_ok=True)
    for s in seeds:
        (ws / "imgs" / f"{s:03d}.jpg").write_bytes(encode(synthetic_image(s, (48, 40))))


def _run(manifest: Path, **kw):
    from flows.dag import unimrg_dag

    state = unimrg_dag(manifest_path=str(manifest), return_state=True, **kw)
    assert state.is_completed(), state.message
    return state.state_details.flow_run_id, state.result()


def _labels(states: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in states.items() if k.startswith(("depth ", "segment ", "train "))}


def _mtimes(layout: Layout) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (layout.root / "labels").rglob("*.parquet")}


def test_dag_caches_per_stage_and_shard(prefect_api, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    _add_images(ws, range(4))
    manifest = _manifest(ws)
    layout = Layout(ws / "out")

    # 1. first run: ingest, 2 shards x 2 stages, train; all computed
    run1, res1 = _run(manifest)
    s1 = task_states(run1, expected=6)
    assert s1["ingest"] == "Completed"
    labels1 = _labels(s1)
    assert sorted(labels1) == sorted(
        [
            "depth shard-00000",
            "depth shard-00001",
            "segment shard-00000",
            "segment shard-00001",
            f"train {res1['train']['fingerprint']}",
        ]
    ), s1
    assert set(labels1.values()) == {"Completed"}, labels1
    assert all(r["how"] == "computed" for r in res1["depth"] + res1["segment"])
    assert res1["train"]["computed"] and (ws / "out" / "preview.png").is_file()

    # the UI's artifacts: a table and a progress bar per stage, the preview sheet
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run1]))
        )
    by_key = {a.key: a for a in arts}
    for key in (
        "unimrg-depth-shards",
        "unimrg-segment-shards",
        "unimrg-depth-progress",
        "unimrg-segment-progress",
        "unimrg-preview",
    ):
        assert key in by_key, sorted(by_key)
    assert by_key["unimrg-depth-progress"].data == 100.0
    assert "data:image/" in by_key["unimrg-preview"].data
    assert "Random weights" in by_key["unimrg-preview"].data
    assert "2 computed, 0 cached" in by_key["unimrg-depth-shards"].description

    # 2. nothing changed: every label and train task is Cached
    run2, res2 = _run(manifest)
    labels2 = _labels(task_states(run2, expected=6))
    assert len(labels2) == 5 and set(labels2.values()) == {"Cached"}, labels2
    assert all(r["how"] == "cached" for r in res2["depth"] + res2["segment"])

    # 3. one depth parameter changes: depth and train recompute, segment stays Cached
    _manifest(ws, input_size=42)
    run3, res3 = _run(manifest)
    labels3 = _labels(task_states(run3, expected=6))
    assert res3["depth"][0]["fingerprint"] != res2["depth"][0]["fingerprint"]
    assert res3["train"]["fingerprint"] != res2["train"]["fingerprint"]
    for name, state in labels3.items():
        want = "Cached" if name.startswith("segment") else "Completed"
        assert state == want, (name, labels3)

    # 4. new images make a new shard: only its tasks (and train, whose data changed) run
    _add_images(ws, range(4, 6))
    run4, res4 = _run(manifest)
    assert res4["ingest"]["new"] == 2
    labels4 = _labels(task_states(run4, expected=8))
    assert len(labels4) == 7, labels4
    for name, state in labels4.items():
        want = "Completed" if name.endswith("shard-00002") or name.startswith("train") else "Cached"
        assert state == want, (name, labels4)

    # 5. Prefect's result storage wiped: the files are the truth, nothing recomputes
    before = _mtimes(layout)
    shutil.rmtree(prefect_api)
    prefect_api.mkdir()
    run5, res5 = _run(manifest)
    labels5 = _labels(task_states(run5, expected=8))
    assert set(labels5.values()) == {"Completed"}, labels5
    assert all(r["how"] == "on disk" for r in res5["depth"] + res5["segment"])
    assert res5["train"]["computed"] is False
    assert _mtimes(layout) == before
    # ... and those runs wrote the cache records again
    run6, _ = _run(manifest)
    assert set(_labels(task_states(run6, expected=8)).values()) == {"Cached"}

    # 6. --force depth: depth recomputes, segment and train stay Cached
    run7, res7 = _run(manifest, force=["depth"])
    labels7 = _labels(task_states(run7, expected=8))
    for name, state in labels7.items():
        assert state == ("Completed" if name.startswith("depth") else "Cached"), (name, labels7)
    assert all(r["how"] == "computed" for r in res7["depth"])


def test_out_of_memory_fails_the_task_clearly_without_retry(prefect_api, tmp_path, monkeypatch):
    """An OOM the stage cannot absorb fails its task at once, with a message that says what to do."""
    from flows import tasks
    from flows.dag import label_flow
    from pipeline import stage as stage_mod

    ws = tmp_path / "ws"
    ws.mkdir()
    _add_images(ws, range(2))
    manifest = _manifest(ws)
    from pipeline.ingest import ingest
    from pipeline.manifest import load_manifest

    ingest(load_manifest(manifest), progress=False)

    calls = []
    real_build = stage_mod.build_stage

    def build(name, m):
        st = real_build(name, m)

        def run_shard(*a, **k):
            calls.append(1)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        st.run_shard = run_shard
        return st

    monkeypatch.setattr(stage_mod, "build_stage", build)
    monkeypatch.setattr(tasks, "_STAGES", {})
    state = label_flow(manifest_path=str(manifest), stage="segment", return_state=True)
    assert state.is_failed()
    assert "out of memory" in state.message and "Not retried" in state.message
    assert "segment shard-00000" in state.message
    assert len(calls) == 1  # one shard (shard_size 2), tried once: no retry


@pytest.mark.parametrize("only", [["ingest", "train"], ["segment"]])
def test_only_checks_the_manifest(only, tmp_path):
    from flows.dag import _selected
    from pipeline.manifest import load_manifest

    ws = tmp_path
    _add_images(ws, range(1))
    m = load_manifest(_manifest(ws))
    assert _selected(m, only) == only
    bare = m.model_copy(update={"trainer": None})
    with pytest.raises(ValueError, match="not configured"):
        _selected(bare, ["train"])


def test_gpu_tag_limit_caps_gpu_tasks(prefect_api, tmp_path):
    """`prefect concurrency-limit create gpu 1`: GPU-tagged tasks of both stages never overlap."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ws = tmp_path / "ws"
    ws.mkdir()
    _add_images(ws, range(4))
    manifest = _manifest(ws)
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=1)
    # Prefect remembers "tag has no limit" for 5 s per process (earlier tests ran gpu tasks).
    from prefect.concurrency import services

    services._no_limits_cache.clear()
    try:
        run, _ = _run(manifest, only=["ingest", "depth", "segment"])
        task_states(run, expected=5)
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run]))
            )
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag("gpu")
    gpu = sorted((r.start_time, r.end_time, r.name) for r in runs if "gpu" in r.tags)
    assert len(gpu) == 4 and all(r[0] and r[1] for r in gpu), gpu
    for (_, end, a), (start, _, b) in zip(gpu, gpu[1:]):
        assert end <= start, f"{a} and {b} held the GPU at the same time"


def test_run_dag_is_the_cli_entry(prefect_api, tmp_path, capsys):
    """`unimrg run`: exit 0 and per-stage summaries; 1 with the reason when the DAG fails."""
    from flows.dag import run_dag

    ws = tmp_path / "ws"
    ws.mkdir()
    _add_images(ws, range(2))
    manifest = _manifest(ws)
    assert run_dag(manifest, only=["ingest", "segment"]) == 0
    out = capsys.readouterr().out
    assert "segment: 1 shard(s), 1 computed" in out and "preview: " in out
    data = yaml.safe_load(manifest.read_text())
    del data["trainer"]
    manifest.write_text(yaml.safe_dump(data))
    # checked before the flow starts: one line, exit 2, no flow run
    assert run_dag(manifest, only=["train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only train: not configured in the manifest" in err


def test_a_run_reads_the_manifest_once_and_builds_each_stage_once(
    prefect_api, tmp_path, monkeypatch
):
    """The driver parses the manifest and builds each label stage once per run and passes them
    down: the flow's name, tags, tasks, preview and the CLI's checks share them (in-process tasks
    set up the driver's stage objects)."""
    import flows.tasks
    import pipeline.stage
    from flows.dag import run_dag

    parses, builds = [], []
    load, build = flows.tasks.load_manifest, pipeline.stage.build_stage
    monkeypatch.setattr(flows.tasks, "load_manifest", lambda p: parses.append(p) or load(p))
    monkeypatch.setattr(pipeline.stage, "build_stage", lambda n, m: builds.append(n) or build(n, m))
    ws = tmp_path / "ws"
    ws.mkdir()
    _add_images(ws, range(3))
    manifest = _manifest(ws)
    assert run_dag(manifest, only=["ingest", "depth", "segment"]) == 0
    assert len(parses) == 1, parses
    assert sorted(builds) == ["depth", "segment"], builds


def test_run_dag_with_an_unreachable_api_is_one_line_exit_1(tmp_path, capsys):
    """PREFECT_API_URL pointing at no server: one line naming it and exit 1, no traceback."""
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.dag import run_dag

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    ws = tmp_path / "ws"
    ws.mkdir()
    _add_images(ws, range(1))
    url = f"http://127.0.0.1:{port}/api"
    with temporary_settings({PREFECT_API_URL: url}):
        assert run_dag(_manifest(ws), only=["ingest"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Prefect API at PREFECT_API_URL={url}" in err
    assert "Traceback" not in err
    assert not (ws / "out").exists()  # nothing ran


def test_a_truncated_label_shard_is_recomputed_despite_its_cache_record(prefect_api, tmp_path):
    """Prefect holds a cache record for the shard, but the file is damaged: the flow refreshes
    the key, the task sets the bad file aside (kept) and makes it again."""
    from flows.dag import label_flow
    from pipeline.ingest import ingest
    from pipeline.integrity import label_shard_problem
    from pipeline.manifest import load_manifest

    ws = tmp_path / "ws"
    ws.mkdir()
    _add_images(ws, range(2))
    manifest = _manifest(ws)
    ingest(load_manifest(manifest), progress=False)
    layout = Layout(ws / "out")

    def run():
        state = label_flow(manifest_path=str(manifest), stage="segment", return_state=True)
        assert state.is_completed(), state.message
        rows = state.result()
        return task_states(state.state_details.flow_run_id, expected=1), rows

    run()
    states, rows = run()
    assert states == {"segment shard-00000": "Cached"}
    label = Path(rows[0]["path"])
    data = label.read_bytes()
    label.write_bytes(data[:-200])

    states, rows = run()
    assert states == {"segment shard-00000": "Completed"}
    assert rows[0]["how"] == "computed" and "unreadable Parquet" in rows[0]["note"]
    assert label_shard_problem(label, layout.image_shard(0)) is None
    assert [p.read_bytes() for p in (label.parent / "_aside").glob("*[0-9]")] == [data[:-200]]


def test_a_data_error_fails_its_task_at_once_without_retry(prefect_api, tmp_path, monkeypatch):
    """A ValueError (bad config or data) would fail again: the task is tried once."""
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
    calls = []
    real_build = stage_mod.build_stage

    def build(name, m):
        st = real_build(name, m)

        def run_shard(*a, **k):
            calls.append(1)
            raise ValueError("stages.segment.points_per_side: 0 is not usable")

        st.run_shard = run_shard
        return st

    monkeypatch.setattr(stage_mod, "build_stage", build)
    monkeypatch.setattr(tasks, "_STAGES", {})
    state = label_flow(manifest_path=str(manifest), stage="segment", return_state=True)
    assert state.is_failed()
    assert "points_per_side: 0 is not usable" in state.message
    assert len(calls) == 1, "a config error must not be retried"

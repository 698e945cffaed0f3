"""The eval stage under a real temporary Prefect API: task names, Cached on rerun, artifacts."""

from __future__ import annotations

import yaml

from pipeline.manifest import load_manifest
from tests.flows.conftest import task_states
from tests.trainer.evaluation.conftest import save_checkpoint, write_mcq_tsv


def test_eval_flow_one_task_per_model_and_benchmark(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client

    from flows.eval import eval_flow

    write_mcq_tsv(tmp_path / "mini.tsv", n=4)
    m = tmp_path / "m.yaml"
    m.write_text(
        yaml.safe_dump(
            {
                "output_dir": "out",
                "sources": [],
                # No label stages or conversations here: reconstruction is the one task.
                "trainer": {
                    "model": "tiny-random",
                    "max_steps": 2,
                    "loss_weights": {"understanding": 0, "depth": 0, "segmentation": 0},
                },
                "eval": {
                    "benchmarks": [{"name": "mini", "path": "mini.tsv", "kind": "mcq"}],
                    "max_new_tokens": 2,
                },
            }
        )
    )
    save_checkpoint(load_manifest(m), 2, seed=4)
    first = eval_flow(manifest_path=str(m), return_state=True)
    assert first.is_completed(), first.message
    states = task_states(first.state_details.flow_run_id, expected=2)
    assert states == {"eval mini base": "Completed", "eval mini step_000002": "Completed"}
    out = first.result()
    assert "RANDOM WEIGHTS" in out["table"]
    assert {r["how"] for r in out["results"]} == {"computed"}

    again = eval_flow(manifest_path=str(m), return_state=True)
    states = task_states(again.state_details.flow_run_id, expected=2)
    assert set(states.values()) == {"Cached"}
    assert {r["how"] for r in again.result()["results"]} == {"cached"}

    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["unimrg-eval"]))
        )
    assert arts and arts[0].type == "table"
    assert "random weights" in (arts[0].description or "").lower()

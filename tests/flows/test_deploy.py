"""prefect.yaml and `unimrg deploy`: Prefect's own model accepts the file, its entrypoints are
real flows taking its parameters, and `unimrg deploy` (which runs `prefect deploy --all`) against
a temporary API server creates the `gpu` pool and GPU limit and registers both deployments with
the documented schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "prefect.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _deployment(config: dict, name: str) -> dict:
    (found,) = [d for d in config["deployments"] if d["name"] == name]
    return found


def test_prefect_yaml_matches_prefects_model(config):
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, WorkPoolConfig

    model = PrefectYamlModel.model_validate(config)
    assert sorted(d.name for d in model.deployments) == ["labels-nightly", "train"]
    # Prefect's model ignores unknown keys, so a typo ("schedule_s") would pass silently.
    for raw in config["deployments"]:
        assert not set(raw) - set(DeploymentConfig.model_fields), raw["name"]
        assert not set(raw["work_pool"]) - set(WorkPoolConfig.model_fields), raw["name"]
        assert raw["work_pool"]["name"] == "gpu"
        assert raw["concurrency_limit"] == 1


def test_label_schedule_is_nightly_utc(config):
    import asyncio
    from datetime import UTC, datetime

    from prefect.server.schemas.schedules import CronSchedule  # what the scheduler runs

    (schedule,) = _deployment(config, "labels-nightly")["schedules"]
    assert schedule == {"cron": "0 2 * * *", "timezone": "UTC", "active": True}
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    start = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    runs = asyncio.run(cron.get_dates(n=2, start=start))
    assert [d.astimezone(UTC).isoformat() for d in runs] == [
        "2026-01-02T02:00:00+00:00",
        "2026-01-03T02:00:00+00:00",
    ]
    assert _deployment(config, "train")["schedules"] == []


def test_entrypoints_are_flows_taking_the_parameters(config, monkeypatch):
    from prefect.flows import Flow, load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    for d in config["deployments"]:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert isinstance(flow, Flow), d["entrypoint"]
        flow.validate_parameters(d["parameters"])  # raises on an unknown or ill-typed one
        assert (ROOT / d["parameters"]["manifest_path"]).is_file()


@pytest.fixture
def server(prefect_api):
    """The session's test API server, without the `gpu` limit this module sets, afterwards
    (other tests in the session run GPU tasks)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    yield
    with get_client(sync_client=True) as client:
        try:
            client.delete_concurrency_limit_by_tag("gpu")
        except ObjectNotFound:
            pass


def test_unimrg_deploy_sets_up_the_server(server):
    """`unimrg deploy --gpus 2`: pool, GPU tag limit, then a real `prefect deploy --all`."""
    from prefect.client.orchestration import get_client

    from flows.cli import main

    assert main(["deploy", "--gpus", "2"]) == 0
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("gpu")
        gpu_limit = client.read_concurrency_limit_by_tag("gpu")
        deployments = {
            f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()
        }
    assert pool.type == "process"
    assert gpu_limit.concurrency_limit == 2

    assert {"unimrg-dag/labels-nightly", "unimrg-train/train"} <= set(deployments)
    for name in ("unimrg-dag/labels-nightly", "unimrg-train/train"):
        d = deployments[name]
        assert d.work_pool_name == "gpu"
        assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1
        # workers start flow runs in the checkout that ran `prefect deploy`
        assert d.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]
    labels = deployments["unimrg-dag/labels-nightly"]
    assert labels.parameters["only"] == ["ingest", "depth", "segment"]
    (schedule,) = labels.schedules
    assert schedule.active and schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == "UTC"
    train = deployments["unimrg-train/train"]
    assert train.schedules == []
    assert train.parameters == {"manifest_path": "data_manifest.yaml"}

    # Idempotent: a second run updates in place (the limit follows --gpus).
    assert main(["deploy", "--gpus", "1"]) == 0
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
        names = [d.name for d in client.read_deployments()]
    assert sorted(names).count("labels-nightly") == 1


def test_unimrg_deploy_registers_the_manifest_it_was_given(server, tmp_path):
    """`unimrg deploy -m /data/x.yaml`: both deployments run x.yaml, prefect.yaml is untouched."""
    from prefect.client.orchestration import get_client

    from flows.cli import main

    other = tmp_path / "x.yaml"
    other.write_text(yaml.safe_dump({"output_dir": "o", "sources": []}))
    before = PREFECT_YAML.read_text()
    assert main(["deploy", "-m", str(other)]) == 0
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
    for name in ("labels-nightly", "train"):
        assert deployments[name].parameters["manifest_path"] == str(other), name
    assert PREFECT_YAML.read_text() == before
    assert not list(ROOT.glob(".prefect.unimrg-*.yaml"))  # the temporary copy is gone


def test_unimrg_deploy_needs_a_server(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["deploy"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


def test_unimrg_deploy_with_an_unreachable_server_is_one_line_exit_1(capsys):
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    url = f"http://127.0.0.1:{port}/api"
    with temporary_settings({PREFECT_API_URL: url}):
        assert main(["deploy"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Prefect API at PREFECT_API_URL={url}" in err
    assert "Traceback" not in err

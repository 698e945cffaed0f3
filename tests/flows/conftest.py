"""Prefect fixtures: one temporary API server (prefect_test_harness) for the whole session.

Starting the harness costs seconds, so every flows test that needs an API shares this one.
Results storage (where Prefect keeps cache records) goes to a temporary folder the tests may
wipe, never ~/.prefect.
"""

from __future__ import annotations

import os
import time
from uuid import UUID

import pytest


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    # The server's telemetry heartbeat only adds "database is locked" noise to test logs.
    old = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
            yield storage
    if old is None:
        os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
    else:
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = old


def task_states(flow_run_id: UUID, expected: int, wait_s: float = 60.0) -> dict[str, str]:
    """task run name -> state name for one flow run, read back from the API.

    Prefect 3 records task-run states from events the engine emits, so they reach the API
    shortly after the flow returns: wait until `expected` task runs have a final state.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + wait_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        states = {r.name: r.state.name for r in runs if r.state is not None}
        final = [r for r in runs if r.state is not None and r.state.is_final()]
        if len(final) >= expected or time.monotonic() > deadline:
            return states
        time.sleep(0.2)

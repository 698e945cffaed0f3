"""The temporary local Prefect server `unimrg run` starts when PREFECT_API_URL is unset."""

from __future__ import annotations

import sqlite3

from flows.dag import _api_server


def test_the_temporary_server_records_every_task_state_before_it_stops(tmp_path):
    """Stopped as soon as the flow returned, the server cancelled its task-run recorder
    mid-write: 21 of these 300 task runs were recorded, 6 of them still Running."""
    from prefect import flow, task
    from prefect.futures import wait
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    @task
    def noop(i: int) -> int:
        return i

    @flow
    def many() -> None:
        wait([noop.submit(i) for i in range(300)])

    home = tmp_path / "prefect"
    with temporary_settings({PREFECT_HOME: home}, restore_defaults={PREFECT_API_URL}):
        with _api_server():
            many()
    with sqlite3.connect(home / "prefect.db") as db:
        states = dict(db.execute("SELECT state_type, count(*) FROM task_run GROUP BY state_type"))
    assert states == {"COMPLETED": 300}

"""The project's own loggers in the Prefect run logs, and a clean hand-over at exit.

`pipeline/` and `trainer/` log through the standard library (`pipeline.depth`, `unimrg.segment`,
...) and know nothing of Prefect. Prefect only sends its own run loggers (`prefect.flow_runs`,
`prefect.task_runs`) and those named in `PREFECT_LOGGING_EXTRA_LOGGERS` to the API, and reads
that setting once, when `prefect` is first imported. So `flows` attaches a handler to the
project's logger roots itself (`capture_project_loggers`, called when `flows.tasks` is
imported, which every process that runs a unimrg task does, Dask workers included): a warning
such as depth's "halving the batch" then shows in the UI under the task run that logged it.
Only records logged inside a flow or task run are sent; elsewhere (a notebook, `unimrg status`)
the handler does nothing, where Prefect's own handler would warn about a missing flow run.

`drain_api_workers` waits until Prefect's background workers (run logs, events; task-run
states reach the API as events) have sent what they hold. A temporary API server must not be
stopped before that: the workers otherwise drain at interpreter exit against a closed port and
retry each connection for about a minute before printing "Error logging to API".

`wait_for_task_run_records` waits, after that, until the server has written those states: its
task-run recorder turns events into rows behind the client. Stopped before it catches up, the
server cancels the recorder mid-write (an "Error flushing N events" traceback) and the run's
history keeps most task runs as Pending or Running: a 300-task flow kept 21 of 300.
"""

from __future__ import annotations

import inspect
import logging
import time
from datetime import datetime

from prefect.logging.handlers import APILogHandler

__all__ = [
    "PROJECT_LOGGERS",
    "RunLogHandler",
    "capture_project_loggers",
    "drain_api_workers",
    "wait_for_task_run_records",
]

#: Logger roots of the project's packages; their children (`pipeline.depth`) propagate here.
#: Their level stays the standard library's default (WARNING, from the root logger), so
#: warnings and errors reach the run logs and INFO chatter does not.
PROJECT_LOGGERS = ("pipeline", "trainer", "unimrg")


class RunLogHandler(APILogHandler):
    """Prefect's API log handler, silent outside a flow or task run."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if getattr(record, "flow_run_id", None) is None and not (
            FlowRunContext.get() or TaskRunContext.get()
        ):
            return
        super().emit(record)


def capture_project_loggers(names: tuple[str, ...] = PROJECT_LOGGERS) -> None:
    """Attach one RunLogHandler to each logger in `names` (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
            logger.addHandler(RunLogHandler())


def drain_api_workers(timeout: float = 30.0) -> None:
    """Block until Prefect's event and API-log workers have sent everything they hold.

    Events first: the task-run state changes travel as events. Both workers start afresh on the
    next item, so this is safe to call between runs. `prefect_test_harness` does the same
    before it stops its server. Synchronous code only (from a running event loop Prefect's
    `drain_all` returns a coroutine).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        waited = worker.drain_all(timeout=timeout)
        if inspect.isawaitable(waited):
            raise RuntimeError("drain_api_workers: call it from synchronous code")


#: Prefect's state types that are not final: a task run in one of these may still change.
_OPEN_STATES = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]


def wait_for_task_run_records(
    since: datetime,
    settle_s: float = 1.5,
    quiet_s: float = 5.0,
    timeout: float = 60.0,
    poll_s: float = 0.2,
) -> int:
    """Wait until the API has recorded the final state of every task run of flow runs started
    after `since`; return how many task runs were still open when it stopped waiting (0: all).

    Prefect 3 writes task-run states from events, asynchronously: the flow returns while the
    server's recorder still works through its queue, writing a batch at least every flush
    interval. Done when no task run is open and the counts have not changed for `settle_s`
    (longer than that interval: a task whose events are still queued has not been counted
    yet); or when nothing changed for `quiet_s` (a task run left Pending by a failed flow never
    closes); or after `timeout`.
    """
    from prefect.client.orchestration import get_client

    flow_runs = {"start_time": {"after_": since.isoformat()}}
    open_runs = {"state": {"type": {"any_": _OPEN_STATES}}}
    deadline = time.monotonic() + timeout
    last, changed = None, time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            counts = tuple(
                client.request("POST", "/task_runs/count", json={"flow_runs": flow_runs, **extra})
                .raise_for_status()
                .json()
                for extra in ({}, {"task_runs": open_runs})
            )
            now = time.monotonic()
            if counts != last:
                last, changed = counts, now
            elif now - changed >= (settle_s if counts[1] == 0 else quiet_s):
                return counts[1]
            if now >= deadline:
                return counts[1]
            time.sleep(poll_s)

"""One progress bar for every long loop: count, items/s (images/s by default) and time left (rich)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(
    label: str, total: int, enabled: bool = True, unit: str = "images"
) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n=1)`; draws nothing when `enabled` is false. The rate is `unit`/s."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    class _Rate(TextColumn):
        def render(self, task):  # images/s (questions/s...), the number people watch
            return f"{task.finished_speed or task.speed or 0.0:6.1f} {unit}/s"

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), _Rate(""), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)

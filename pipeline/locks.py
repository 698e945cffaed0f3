"""Folder locks: one writer per output folder, refused (not queued) when another holds it.

`flock` on a small lock file: the kernel drops the lock when its holder exits, even on
`kill -9`, so a killed run never leaves a stale lock behind. Used by ingest (`.ingest.lock` in
the output folder), `unimrg run` (`.run.lock`) and training (`.train.lock` in the run folder),
which hold them exclusively, and evals (`.eval.lock` in the output folder), which hold theirs
shared; `unimrg clean` takes all of them exclusively, and `unimrg export` takes the ones of
what it reads shared (several exports at once, no writer beside).

Usage:
    with exclusive(out / ".ingest.lock", "another ingest is running"):
        ...
    with shared(out / ".run.lock", "a `unimrg run` is writing there"):
        ...
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Busy", "exclusive", "shared"]


class Busy(RuntimeError):
    """Another process holds the folder's lock. The message names the folder and the lock."""


@contextmanager
def exclusive(lock_file: Path, busy: str) -> Iterator[None]:
    """Hold `lock_file`'s exclusive lock for the block; raise `Busy("<folder>: <busy> ...")`
    at once when another process holds it."""
    with _hold(lock_file, busy, fcntl.LOCK_EX):
        yield


@contextmanager
def shared(lock_file: Path, busy: str) -> Iterator[None]:
    """Hold `lock_file`'s shared lock for the block (readers together, no exclusive holder
    beside them); raise `Busy` at once when another process holds it exclusively."""
    with _hold(lock_file, busy, fcntl.LOCK_SH):
        yield


@contextmanager
def _hold(lock_file: Path, busy: str, mode: int) -> Iterator[None]:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(
                f"{lock_file.parent}: {busy} ({lock_file.name} is held); refused, not waiting: "
                "rerun when it has finished"
            ) from None
        yield

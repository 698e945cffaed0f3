"""Prefect cache policies that express DESIGN.md's cache keys, and the rule for what is retried.

A (stage, shard) task is keyed by

    (stage name, stage fingerprint, content hash of the input image shard, output directory)

The fingerprint names everything that changes the stage's output (model, weights, parameters);
image shards are append-only and never rewritten, so their content hash (memoised by path, size
and mtime in `pipeline.fingerprint.cached_file_hash`) identifies the input. The output directory
scopes the key to one dataset: the same images labelled into two output folders are two results.
The train task is keyed by (train fingerprint, output directory); the train fingerprint already
covers the label fingerprints, the image shards and the understanding data.

Prefect looks the key up in its result storage: a hit skips the task body and the UI shows the
task run as `Cached`. The files stay the truth in both directions, which the flow enforces when
it submits each task (see flows/dag.py): a key whose output file is gone or fails its integrity
check (`pipeline.integrity.reuse_problem`: unreadable, made from a different image shard, rows
that do not match) is refreshed (recomputed), and a body that runs while a sound output file
exists returns at once with `computed: False` (state `Completed`, not `Cached`, because Prefect
found no record). The label shard itself records the input hash this key is made of, so the
plain runner (no Prefect) applies the same key.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from pipeline.fingerprint import cached_file_hash, fingerprint

__all__ = [
    "FINGERPRINT_CACHE",
    "FingerprintCachePolicy",
    "is_out_of_memory",
    "is_transient",
    "retry_when_transient",
]


@dataclass
class FingerprintCachePolicy(CachePolicy):
    """Key from the task's `stage`, `fingerprint`, `out_dir` and (if given) `image_shard` inputs.

    Every other input (force flags, the manifest path, the shard number) is left out on
    purpose: they do not change what the task produces.
    """

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        parts = {
            "stage": inputs["stage"],
            "fingerprint": inputs["fingerprint"],
            "out_dir": str(inputs["out_dir"]),
        }
        if inputs.get("image_shard"):
            parts["input"] = cached_file_hash(inputs["image_shard"])
        # Readable prefix (stage, fingerprint) so the records in result storage can be told apart.
        return f"unimrg-{inputs['stage']}-{inputs['fingerprint']}-{fingerprint(parts, 24)}"


FINGERPRINT_CACHE = FingerprintCachePolicy()


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, without importing torch."""
    for e in _chain(exc):
        if type(e).__name__ in ("OutOfMemoryError", "StageOutOfMemory"):
            return True
        if "out of memory" in str(e).lower():
            return True
    return False


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


#: Failures that another try can fix: the network, a timeout, a lost Dask worker, a flaky
#: network filesystem. Matched by class name too, so neither distributed nor httpx is imported.
_TRANSIENT_NAMES = {
    "KilledWorker",
    "CommClosedError",
    "StreamClosedError",
    "FutureCancelledError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
    "RemoteProtocolError",
}
_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ESTALE,
    errno.EAGAIN,
}
#: Failures another try cannot fix: bad config or data, a missing or unwritable file, a full
#: disk. They fail at once with their own message.
_PERMANENT = (
    ValueError,
    PermissionError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    LookupError,
    TypeError,
)


def is_transient(exc: BaseException) -> bool:
    """True when running the same task again may succeed (see `_TRANSIENT_NAMES`)."""
    if is_out_of_memory(exc) or _is_permanent(exc):
        return False
    for e in _chain(exc):
        if isinstance(e, (TimeoutError, ConnectionError)) or type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _is_permanent(exc: BaseException) -> bool:
    import pyarrow as pa

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    # ManifestError is a ValueError; pyarrow's ArrowInvalid too, its other errors are not.
    return isinstance(exc, (*_PERMANENT, pa.ArrowException)) and not isinstance(
        exc, (TimeoutError, ConnectionError)
    )


def retry_when_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only what another try can fix (`is_transient`).

    Config and data errors (ValueError and ManifestError, Arrow errors, PermissionError,
    FileNotFoundError), a full disk and anything unknown (a bug) fail at once with their
    message. Out-of-memory errors are never retried either: a stage already absorbs the OOM it
    can (smaller batches), and the same shard on the same GPU would fail again.
    """
    try:
        state.result()
    except BaseException as exc:  # the task's own exception, re-raised by the state
        return is_transient(exc)
    return True

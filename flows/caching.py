"""Prefect cache policies that express DESIGN.md's cache keys, and the retry rule for GPU tasks.

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
it submits each task (see flows/dag.py): a key whose output file is gone is refreshed
(recomputed), and a body that runs while its output file exists returns at once with
`computed: False` (state `Completed`, not `Cached`, because Prefect found no record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from pipeline.fingerprint import cached_file_hash, fingerprint

__all__ = [
    "FINGERPRINT_CACHE",
    "FingerprintCachePolicy",
    "is_config_error",
    "is_out_of_memory",
    "retry_if_transient",
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


def is_config_error(exc: BaseException) -> bool:
    """A manifest or argument that cannot work (ManifestError): the same run fails again."""
    from pipeline.manifest import ManifestError

    return any(isinstance(e, ManifestError) for e in _chain(exc))


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures, never out of memory or a config
    error.

    A stage already absorbs OOM it can (smaller batches); one that reaches the task will not go
    away by running the same shard on the same GPU again, and a config error (ManifestError,
    e.g. a resume the schedule does not allow) fails identically each time: retrying only
    wastes time.
    """
    try:
        state.result()
    except BaseException as exc:  # the task's own exception, re-raised by the state
        return not (is_out_of_memory(exc) or is_config_error(exc))
    return True

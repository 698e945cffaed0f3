"""Fingerprints: short, stable hashes of everything that changes a stage's output.

A stage's fingerprint hashes its name, version, model identity (id, revision and a hash of the
weight files actually loaded) and its output-changing parameters. Label shards live under
`labels/<stage>/<fingerprint>/`, so changing any of these writes a new folder and switching back
finds the old one.

Hashing multi-GB weight files on every `unimrg status` would be slow, so file hashes are memoised
in `<cache_dir>/file-hashes.json`, keyed by (absolute path, size, mtime_ns), and each process keeps
its copy of that memo in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from pipeline.shards import atomic_write_bytes, file_sha256

__all__ = [
    "cache_dir",
    "cached_file_hash",
    "fingerprint",
    "hash_files",
    "hub_snapshot",
    "is_hub_snapshot",
    "tiny_random_cache",
]


def cache_dir() -> Path:
    """Where tiny-random models and the file-hash memo live (`$UNIMRG_CACHE`, default ~/.cache/unimrg)."""
    d = Path(os.environ.get("UNIMRG_CACHE", Path.home() / ".cache" / "unimrg"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def tiny_random_cache(name: str, builder_version: str, libraries: tuple[str, ...]) -> Path:
    """The cache folder of one tiny-random model: `<cache_dir>/tiny-random/<name>/<key>`.

    `key` names the builder's version and hashes the installed versions of the `libraries` whose
    classes and defaults shape the saved files, so a folder built by other code or another
    library release is never taken for today's build (it is rebuilt beside it instead).
    """
    from importlib.metadata import PackageNotFoundError, version

    def installed(lib: str) -> str:
        try:
            return version(lib)
        except PackageNotFoundError:
            return "absent"

    made_by = {"builder": builder_version, **{lib: installed(lib) for lib in libraries}}
    return cache_dir() / "tiny-random" / name / f"{builder_version}-{fingerprint(made_by, 12)}"


def fingerprint(parts: dict[str, Any], length: int = 16) -> str:
    """Hash a JSON-able mapping of output-changing settings into a short hex id."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


#: This process's copy of each memo file (memo path -> key -> hash), so a hit reads no file.
_MEMO: dict[Path, dict[str, str]] = {}
_MEMO_LOCK = threading.Lock()


def cached_file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised by (absolute path, size, mtime_ns).

    The memo is `<cache_dir>/file-hashes.json`, shared by every process; each process reads it
    once and keeps it in memory, so a hit costs one `stat`. A miss hashes the file and writes
    the memo back merged with what other processes added meanwhile, without the entries of
    that file's earlier versions.
    """
    return cached_file_hashes([path])[0]


def cached_file_hashes(paths: list[str | Path]) -> list[str]:
    """`cached_file_hash` of many files, writing the memo once for all the misses (not per file)."""
    keyed = []
    for p in paths:
        path = Path(p).resolve()
        st = path.stat()
        keyed.append((path, f"{path}|{st.st_size}|{st.st_mtime_ns}"))
    memo_path = cache_dir() / "file-hashes.json"
    with _MEMO_LOCK:
        memo = _MEMO.get(memo_path)
        if memo is None:
            memo = _MEMO[memo_path] = _read_memo(memo_path)
        known = {key: memo[key] for _, key in keyed if key in memo}
    # Hashing happens outside the lock: other threads' hits need not wait.
    new = {key: file_sha256(path) for path, key in keyed if key not in known}
    if new:
        # A file's new (size, mtime) supersedes its older entries: the memo holds one entry per
        # file, not one per version of it.
        changed = {key.rsplit("|", 2)[0] for key in new}
        with _MEMO_LOCK:
            merged = {**_read_memo(memo_path), **_MEMO[memo_path]}
            memo = {k: v for k, v in merged.items() if k.rsplit("|", 2)[0] not in changed}
            memo = _MEMO[memo_path] = {**memo, **new}
            atomic_write_bytes(memo_path, json.dumps(memo, indent=0).encode())
    return [known.get(key) or new[key] for _, key in keyed]


def _read_memo(memo_path: Path) -> dict[str, str]:
    try:
        return json.loads(memo_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def hash_files(paths: list[str | Path]) -> str:
    """One hash over several files' contents, taken in file-name order.

    Names are not hashed: renaming or moving a checkpoint keeps its fingerprint.
    """
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(cached_file_hash(p).encode())
    return h.hexdigest()[:16]


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local Hugging Face cache's snapshot folder of `repo_id` at `revision` (none: the
    cached `main`), or None when it is not cached. The folder is named by the commit, which is
    what a fingerprint and a lineage record should name (a tag or `main` moves)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached, or not even a valid repo id
        return None


def is_hub_snapshot(path: str | Path) -> bool:
    """True for a folder `.../models--org--name/snapshots/<commit>` of the hub cache."""
    p = Path(path)
    return p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--")

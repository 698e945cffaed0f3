"""Lineage records: what made an output folder, in a small JSON file inside it.

Every `labels/<stage>/<fingerprint>/` and `train/<fingerprint>/` folder holds `lineage.json`,
written atomically before the folder's first output, so a folder named by a bare hash still says
which model, revision, weights and parameters made it, long after the manifest changed:

    {
      "kind": "labels",                      labels | train | eval
      "stage": "depth", "stage_version": "1",
      "fingerprint": "7dc0736e76e23d11",
      "model": {"spec": "depth-anything/...", "revision": "<commit>", "weights": "<hash>", ...},
      "parameters": {...every parameter of the stage or trainer...},
      "covers": {...exactly what the fingerprint hashes...},
      "random_weights": false,
      "libraries": {"torch": "2.14.1", "transformers": "5.24.0", ...},
      "created": "2026-12-01T16:20:28Z"
    }

Usage:
    from pipeline.lineage import read_lineage
    read_lineage("out/labels/depth/7dc0736e76e23d11")["model"]["spec"]
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.shards import atomic_write_json

__all__ = ["LINEAGE_FILE", "describe", "ensure_lineage", "library_versions", "read_lineage"]

LINEAGE_FILE = "lineage.json"


def library_versions(names: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """Installed versions of the distributions that compute an output (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ensure_lineage(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write `folder/lineage.json` unless it is there already (the first writer's creation time
    is kept). `record` gets `created` when it has none."""
    path = Path(folder) / LINEAGE_FILE
    if path.is_file():
        return path
    atomic_write_json(path, {**record, "created": record.get("created") or utc_now()})
    return path


def read_lineage(folder: str | Path) -> dict[str, Any] | None:
    """The folder's lineage record, or None when it has none (made before records existed)."""
    path = Path(folder) / LINEAGE_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def describe(record: dict[str, Any] | None) -> str:
    """One line naming what made a folder: model, revision and key parameters."""
    if not record:
        return "no lineage record"
    model = record.get("model") or {}
    text = str(model.get("spec") or "?")
    rev = model.get("revision")
    if rev:
        text += f"@{str(rev)[:12]}"
    keys = record.get("key_parameters") or {}
    if keys:
        text += " " + " ".join(f"{k}={v}" for k, v in keys.items())
    if record.get("random_weights"):
        text += " (random weights)"
    return text

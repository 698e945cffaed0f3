"""From a manifest's `trainer.model` to a local model folder and its fingerprint identity.

Shared by the adapters (janus.py, emu3.py), so every family resolves a spec the same way:
`tiny-random`, a local directory (a training checkpoint `step_NNNNNN/` means its `model/`), or a
hub id, which must be in the local Hugging Face cache and resolves to its snapshot folder, named
by the commit. The identity of a hub id names that commit, so `revision: null` still pins the
weights actually loaded (a tag or `main` moves). Not an adapter (its name starts with `_`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.fingerprint import hash_files, hub_snapshot, is_hub_snapshot

#: Our own file in a model folder: which adapter wrote it, whether the weights are random.
META_FILE = "unimrg_adapter.json"
#: The folder inside a training checkpoint `step_NNNNNN/` that holds the model.
MODEL_SUBDIR = "model"
WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def read_json(folder: str | Path, name: str) -> dict | None:
    """The JSON file `name` in `folder`, or None when the folder has none."""
    p = Path(folder) / name
    return json.loads(p.read_text()) if p.is_file() else None


def resolve_model(
    spec: str,
    base_dir: Path | None,
    revision: str | None,
    tiny_random_dir: Callable[[], Path],
) -> tuple[Path, dict[str, Any]]:
    """(local folder, the content of its META_FILE or {}) for a model spec; `tiny_random_dir`
    builds (once) and returns the family's tiny-random folder. A relative directory is taken
    against `base_dir` (the manifest's folder)."""
    if spec == "tiny-random":
        p = tiny_random_dir()
        return p, read_json(p, META_FILE) or {}
    p = Path(spec).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if p.is_dir():
        if (p / MODEL_SUBDIR / "config.json").is_file():
            p = p / MODEL_SUBDIR
        return p, read_json(p, META_FILE) or {}
    snapshot = hub_snapshot(spec, revision)
    if snapshot is None:
        raise ValueError(
            f"trainer.model: {spec!r} (revision {revision or 'main'}) is not a local directory "
            f"({p}) and not in the local Hugging Face cache. Download it where the hub is "
            f"reachable (`hf download {spec}`), or set trainer.model to a local directory or "
            "`tiny-random`."
        )
    return snapshot, {}


def model_identity(spec: str, folder: Path, random_weights: bool) -> dict[str, Any]:
    """The fingerprint's identity of the weights in `folder` (resolved from `spec`): their
    hash, whether they are random, and where they come from; a hub snapshot is named by its id
    and commit, not by the cache path (which differs between machines)."""
    files = [f for g in WEIGHT_GLOBS for f in folder.glob(g)]
    ident: dict[str, Any] = {
        "weights": hash_files(files) if files else None,
        "random_weights": random_weights,
        "model": "tiny-random" if spec == "tiny-random" else str(folder),
    }
    if is_hub_snapshot(folder):
        ident.update(model=spec, revision=folder.name)
    return ident

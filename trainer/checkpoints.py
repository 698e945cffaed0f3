"""A training run's checkpoints: the `step_NNNNNN/` folders, their RNG states, their export.

    step_000500/
        model/            save_pretrained form (`checkpoint_model_dir`)
        trainer_state.pt  optimizer, scheduler, step and batch position
        rng_rank<r>.pt    each rank's RNG states (`_rng_to_saved`: weights_only-loadable)
        config.yaml       the resolved config

`checkpoints` lists the complete ones oldest first (an incomplete one has a dotted temp name),
`prune_checkpoints` keeps the newest `trainer.keep_last` plus the final one, and
`export_checkpoint` (`unimrg export --checkpoint`) copies a checkpoint's model into a clean
hub-ready folder. Written and read by `Trainer` (trainer/loop.py, which re-exports these names).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.locks import shared
from pipeline.shards import make_readable

STEP_PREFIX = "step_"


MODEL_SUBDIR = "model"
TRAINER_STATE = "trainer_state.pt"


def step_dir(out: Path, step: int) -> Path:
    return out / f"{STEP_PREFIX}{step:06d}"


def checkpoints(out: Path) -> list[Path]:
    """Complete `step_NNNNNN` folders, oldest first (incomplete ones have a dotted temp name)."""
    if not out.is_dir():
        return []
    steps = [
        p
        for p in out.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
    ]
    return sorted(steps, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete `step_NNNNNN`."""
    found = checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: Path, keep_last: int, final_step: int) -> list[Path]:
    """Remove all but the newest `keep_last` checkpoints (the final one always stays)."""
    found = checkpoints(out)
    old = [p for p in found[: max(0, len(found) - keep_last)] if p != step_dir(out, final_step)]
    for p in old:
        shutil.rmtree(p)
    return old


def checkpoint_model_dir(ckpt: Path) -> Path:
    """The model folder of a checkpoint (older checkpoints kept it at the top level)."""
    sub = Path(ckpt) / MODEL_SUBDIR
    return sub if (sub / "config.json").is_file() else Path(ckpt)


def export_checkpoint(ckpt: str | Path, to: str | Path) -> Path:
    """Copy a checkpoint's model into `to` as a clean hub-ready folder: the weights, configs,
    tokenizer, processor and chat template, plus a README.md model card saying what made it
    (no trainer state, no project files). `push_to_hub`/`hf upload` take the folder as it is.
    Written into a temporary folder of its own beside `to`, then renamed; refused while a
    training (or `unimrg clean`) holds the run folder's `.train.lock`."""
    import yaml

    ckpt, to = Path(ckpt), Path(to)
    model = checkpoint_model_dir(ckpt)
    if not (model / "config.json").is_file():
        raise ValueError(f"--checkpoint: {ckpt} holds no model (no config.json)")
    if to.exists() and any(to.iterdir()):
        raise ValueError(f"--to: {to} exists and is not empty")
    meta_path = model / "unimrg_adapter.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    cfg_path = ckpt / "config.yaml"
    resolved = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    with ExitStack() as lock:
        # Training rotates its checkpoints: none is copied while one holds the run folder.
        if (ckpt.parent / ".train.lock").is_file():
            busy = "a training is running in it (its checkpoints rotate)"
            lock.enter_context(shared(ckpt.parent / ".train.lock", busy))
        to.parent.mkdir(parents=True, exist_ok=True)
        # A temporary folder of its own, never one that was there (`.<to>.tmp` was removed).
        tmp = Path(tempfile.mkdtemp(dir=to.parent, prefix=f".{to.name}.", suffix=".tmp"))
        try:
            for f in sorted(model.iterdir()):
                if f.is_file() and f.name != meta_path.name:
                    shutil.copy2(f, tmp / f.name)
            (tmp / "README.md").write_text(_model_card(ckpt, meta, resolved))
            make_readable(tmp)
            if to.exists():
                to.rmdir()
            os.rename(tmp, to)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else half-written
    return to


def _model_card(ckpt: Path, meta: dict, resolved: dict) -> str:
    base = meta.get("base") or resolved.get("trainer", {}).get("model", "unknown")
    random_weights = meta.get("random_weights") or resolved.get("random_weights")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: any-to-any",
        "tags: [unimrg, janus]",
        "---",
        "",
        f"# UniMRG post-trained {base}",
        "",
        f"Exported from `{ckpt.name}` of training run `{resolved.get('fingerprint', '?')}`.",
        "",
    ]
    if random_weights:
        lines += ["**Random weights (tiny-random): this model's outputs are noise.**", ""]
    lines += [
        "Loads with `AutoModelForImageTextToText.from_pretrained(folder)`, "
        "`AutoProcessor.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`.",
        "",
    ]
    return "\n".join(lines)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states; on CUDA only the rank's own device (`torch.cuda.set_device`).

    Not `get_rng_state_all`: restoring a list of every visible device's state fails on a machine
    that shows fewer devices (IndexError), e.g. resuming an 8-GPU run on 4 GPUs.
    """
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's state
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda, device)


def _rng_to_saved(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states as tensors, numbers and lists only, so `torch.load(weights_only=True)` reads
    them back (numpy's state is an array inside a tuple)."""
    import torch

    kind, keys, pos, has_gauss, gauss = state["numpy"]
    out = dict(state)
    out["python"] = list(state["python"][:1]) + [list(state["python"][1]), state["python"][2]]
    out["numpy"] = {
        "kind": kind,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    return out


def _rng_from_saved(saved: dict[str, Any]) -> dict[str, Any]:
    state = dict(saved)
    py = saved["python"]
    state["python"] = (py[0], tuple(py[1]), py[2])
    n = saved["numpy"]
    if isinstance(n, dict):
        keys = n["keys"].numpy().astype(np.uint32)
        state["numpy"] = (n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"])
    return state

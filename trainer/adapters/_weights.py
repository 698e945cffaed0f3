"""Saving a transformers model in its training dtype's storage precision (shared by the adapters).

Not an adapter (the leading underscore keeps it out of `available_adapters()`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_weights(model: Any, path: Path, dtype: Any = None) -> None:
    """`model.save_pretrained(path)` with floating-point weights stored in `dtype` (the training
    dtype: bf16 on CUDA; None or float32: as they are). The config records the storage dtype so
    `from_pretrained(dtype="auto")` loads it as saved."""
    import torch

    state = None
    if dtype is not None and dtype != torch.float32:
        state = {
            k: v.detach().to(dtype) if v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
    model.save_pretrained(path, state_dict=state)
    if state is not None:
        set_config_dtype(Path(path), str(dtype).removeprefix("torch."))


def set_config_dtype(path: Path, dtype: str) -> None:
    """Record the storage dtype in a saved config.json (save_pretrained writes the live model's
    float32 master dtype even when the state dict it was given is bf16)."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for sub in (cfg, *(v for v in cfg.values() if isinstance(v, dict) and "dtype" in v)):
        sub["dtype"] = dtype
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

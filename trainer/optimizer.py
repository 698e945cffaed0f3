"""The optimizer recipe: which parameters train, their AdamW groups, the learning-rate schedule.

Shared by training and by the resume check (trainer/loop.py), which must build the same groups
to tell whether a saved optimizer state fits this run. `cfg` is the manifest's `trainer`
section.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

from pipeline.manifest import ManifestError

__all__ = ["lr_factor", "param_groups", "select_trainable"]


def select_trainable(adapter, cfg) -> list:
    """The parameters `trainer.trainable` selects (minus the adapter's frozen ones), in
    model order; the others get requires_grad False."""
    model = adapter.model
    frozen = tuple(adapter.frozen_patterns)
    params = []
    for name, p in model.named_parameters():
        train = any(fnmatch.fnmatchcase(name, pat) for pat in cfg.trainable) and not any(
            fnmatch.fnmatchcase(name, pat) for pat in frozen
        )
        p.requires_grad_(train)
        if train:
            params.append(p)
    if not params:
        raise ManifestError(
            f"trainer.trainable: {cfg.trainable} matches no trainable parameter of "
            f"{cfg.model} (frozen: {list(frozen)})"
        )
    return params


def param_groups(adapter, params: list, cfg) -> list[dict[str, Any]]:
    """AdamW groups of `params` (trainable parameters of `adapter`): weight decay on matrices
    only; the understanding encoder's parameters (the adapter's `encoder_patterns`) at
    `lr x trainer.encoder_lr_scale`. Empty groups are left out, so the released setting
    (scale 1) has the two decay groups it always had. A resumed optimizer state is checked
    against the same groups."""
    patterns = tuple(getattr(adapter, "encoder_patterns", ()))
    trainable = {id(p) for p in params}
    named = [(n, p) for n, p in adapter.model.named_parameters() if id(p) in trainable]
    scale = float(cfg.encoder_lr_scale)
    is_encoder = {
        id(p): scale != 1.0 and any(fnmatch.fnmatchcase(n, pat) for pat in patterns)
        for n, p in named
    }
    if scale != 1.0 and not any(is_encoder.values()):
        raise ManifestError(
            f"trainer.encoder_lr_scale: {scale} but {cfg.adapter}'s understanding encoder "
            f"has no trainable parameters here (encoder patterns {list(patterns)}"
            + (
                "; its images enter as codes of the frozen VQ model"
                if not patterns
                else f", trainer.trainable {cfg.trainable}"
            )
            + "); leave encoder_lr_scale at 1.0"
        )
    groups = []
    for encoder in (False, True):
        for decay in (True, False):
            params = [
                p for _, p in named if is_encoder[id(p)] == encoder and (p.ndim >= 2) == decay
            ]
            if params:
                groups.append(
                    {
                        "params": params,
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "lr": cfg.lr * (scale if encoder else 1.0),
                    }
                )
    return groups


def lr_factor(step: int, max_steps: int, warmup_ratio: float) -> float:
    """Linear warmup over ceil(warmup_ratio * max_steps) steps, then cosine to 0."""
    warmup = math.ceil(warmup_ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

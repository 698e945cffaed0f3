"""Which checkpoint a `--resume` continues from.

The newest candidate that loads completely (`weights_only=True`: nothing in it runs) and can
be resumed from: its step, batch position, scheduler and optimizer state (against the AdamW
groups this run builds, trainer/optimizer.py) and RNG states are all checked
(`check_resumable`, trainer/checkpoints.py) before any of it is applied; each one skipped is
printed with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.adapters import adapter_class
from trainer.checkpoints import (
    TRAINER_STATE,
    capture_rng_state,
    check_resumable,
    checkpoint_model_dir,
    restore_rng_state,
    rng_from_saved,
)
from trainer.optimizer import param_groups, select_trainable
from trainer.ranks import Dist

__all__ = ["check_rng_state", "open_resumable"]


def open_resumable(
    candidates: list[Path], adapter: Any, cfg, dist: Dist, micro_per_step: int
) -> tuple[Any, tuple[Path, dict, dict]]:
    """The adapter and states of the newest candidate that loads completely and can be
    resumed from; each one skipped is printed with the reason. Loads with
    `weights_only=True`: a checkpoint holding anything but tensors and plain containers
    fails to load (nothing in it runs). Every value of its state is checked against this
    run (`check_resumable`) before any of it is applied, so a refused state never leaves
    part of itself behind."""
    import torch

    cls = adapter_class(cfg.adapter)
    is_main = dist.rank == 0
    skipped = []
    for ckpt in candidates:
        candidate = adapter
        try:
            state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
            if cfg.parallel == "fsdp":  # model and optimizer shards in step_N/dcp/
                from trainer.parallel import DCP_DIR

                if not (ckpt / DCP_DIR).is_dir():
                    raise ValueError(f"no {DCP_DIR}/ (sharded state) in it")
            rng = ckpt / f"rng_rank{dist.rank}.pt"
            if not rng.exists():
                rng = ckpt / "rng_rank0.pt"
            rng_state = torch.load(rng, map_location="cpu", weights_only=True)
            if candidate is None and cfg.parallel == "ddp":
                # FSDP starts from the base model and reads its shards in Trainer._load_state.
                candidate = cls.load(
                    str(checkpoint_model_dir(ckpt)),
                    device=dist.device,
                    image_size=cfg.image_size,
                )
                candidate.random_weights = candidate.random_weights or cfg.model == "tiny-random"
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next older one
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            skipped.append(f"{ckpt.name} ({reason})")
            if is_main:
                print(f"resume: skipping {ckpt}: it does not load completely: {reason}")
            continue
        try:
            # The AdamW groups this run builds; under FSDP the model is not loaded yet and
            # DCP checks the optimizer shards when it reads them.
            groups = None
            if candidate is not None:
                groups = param_groups(candidate, select_trainable(candidate, cfg), cfg)
            check_resumable(
                ckpt,
                state,
                max_steps=cfg.max_steps,
                micro_per_step=micro_per_step,
                parallel=cfg.parallel,
                groups=len(groups) if groups is not None else None,
                param_shapes=[[tuple(p.shape) for p in g["params"]] for g in groups]
                if groups is not None and cfg.parallel == "ddp"
                else None,
            )
            rng_state = check_rng_state(rng_state, rng.name)
        except ValueError as exc:
            skipped.append(f"{ckpt.name} ({exc})")
            if is_main:
                print(f"resume: skipping {ckpt}: it cannot be resumed from: {exc}")
            continue
        if is_main:
            print(f"resume: from {ckpt}")
        return candidate, (ckpt, state, rng_state)
    raise ValueError(
        f"resume: no checkpoint under {candidates[0].parent} can be resumed from: "
        f"{'; '.join(skipped)}"
    )


def check_rng_state(saved: dict, name: str) -> dict:
    """The RNG states of `saved` (an `rng_rank<r>.pt`), tried on this process and put back:
    ValueError naming the file when they cannot be set."""
    before = capture_rng_state()
    try:
        state = rng_from_saved(saved)
        restore_rng_state(state)
    except Exception as exc:  # noqa: BLE001 - any failure: the states cannot be resumed
        raise ValueError(
            f"{name}: the RNG states cannot be set ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        restore_rng_state(before)
    return state

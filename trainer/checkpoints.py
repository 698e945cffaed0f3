"""A training run's checkpoints: the `step_NNNNNN/` folders, their RNG states, their export.

    step_000500/
        model/            save_pretrained form (`checkpoint_model_dir`)
        trainer_state.pt  optimizer, scheduler, step and batch position
        rng_rank<r>.pt    each rank's RNG states (`rng_to_saved`: weights_only-loadable)
        config.yaml       the resolved config

`checkpoints` lists the complete ones oldest first (an incomplete one has a dotted temp name),
`prune_checkpoints` keeps the newest `trainer.keep_last` plus the final one, and
`export_checkpoint` (`unimrg export --checkpoint`) copies a checkpoint's model into a clean
hub-ready folder. Written and read by `Trainer` (trainer/loop.py).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.locks import shared
from pipeline.shards import make_readable

STEP_PREFIX = "step_"


MODEL_SUBDIR = "model"
TRAINER_STATE = "trainer_state.pt"


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Any error writing `path` as an OSError naming it: `write()`, pyarrow, torch's zip writer
    (a RuntimeError with no errno) and safetensors name no file, and a full disk should end in
    one line saying which file it was (flows/cli.py prints OSErrors so)."""
    try:
        yield
    except OSError as exc:
        if exc.filename and exc.errno != errno.ENOSPC:
            raise
        why = exc.strerror or str(exc)
        raise OSError(exc.errno or errno.EIO, why, str(path)) from exc
    except Exception as exc:
        text = str(exc)
        if "No space left" in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc
        if (
            type(exc).__name__ == "SafetensorError"
            or "PytorchStreamWriter" in text
            or "inline_container" in text
        ):
            first = text.splitlines()[0] if text else type(exc).__name__
            raise OSError(errno.EIO, f"could not be written ({first})", str(path)) from exc
        raise


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


#: What resuming needs of a LambdaLR state (torch's own load_state_dict checks none of it).
SCHEDULER_KEYS = ("base_lrs", "last_epoch", "_step_count", "_last_lr", "lr_lambdas")
#: What every AdamW parameter group holds (newer torch keys get defaults on load).
OPTIMIZER_GROUP_KEYS = ("params", "lr", "betas", "eps", "weight_decay")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_resumable(
    ckpt: Path,
    state: Any,
    *,
    max_steps: int,
    micro_per_step: int,
    parallel: str,
    groups: int | None,
    param_shapes: list[list[tuple[int, ...]]] | None,
) -> None:
    """Raise ValueError saying why training cannot resume from `ckpt`'s trainer state `state`
    (as `torch.load` returned it), checking every value before any of it is applied: the step
    (an integer, the folder's own number, before `max_steps`), the batch position (`step` x
    `micro_per_step`), the parallelism, the scheduler state (its keys, at the same step, one
    learning rate per AdamW group: `groups` of them, as the run builds them, when known) and,
    when `param_shapes` (per AdamW group, the shapes of the trainable parameters) is given, the
    optimizer state (its groups, each moment's shape, all finite)."""
    if not isinstance(state, dict):
        raise ValueError(f"{TRAINER_STATE} holds a {type(state).__name__}, not a dict")
    folder_step = int(ckpt.name[len(STEP_PREFIX) :])
    step = state.get("step")
    if not _is_int(step):
        raise ValueError(f"{TRAINER_STATE}: step {step!r} is not an integer")
    if step != folder_step:
        raise ValueError(f"{TRAINER_STATE}: step {step} disagrees with the folder {ckpt.name}")
    if not 0 < step < max_steps:
        raise ValueError(f"{TRAINER_STATE}: step {step} is not between 1 and {max_steps - 1}")
    batches = state.get("batches")
    if not _is_int(batches) or batches != step * micro_per_step:
        raise ValueError(
            f"{TRAINER_STATE}: batches {batches!r} is not step {step} x {micro_per_step} "
            "micro-batches per step"
        )
    if state.get("parallel", "ddp") != parallel:
        raise ValueError(
            f"{TRAINER_STATE}: written with parallel {state.get('parallel')!r}, this run is "
            f"{parallel!r}"
        )
    world = state.get("world_size", 1)
    if not _is_int(world) or world < 1:
        raise ValueError(f"{TRAINER_STATE}: world_size {world!r} is not a positive integer")
    _check_scheduler(state.get("scheduler"), step, groups)
    if param_shapes is not None:
        _check_optimizer(state.get("optimizer"), param_shapes)


def _finite_numbers(value: Any, n: int) -> bool:
    import math

    return (
        isinstance(value, (list, tuple))
        and len(value) == n
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
    )


def _check_scheduler(sched: Any, step: int, groups: int | None) -> None:
    if not isinstance(sched, dict):
        raise ValueError(f"{TRAINER_STATE}: no scheduler state (got {type(sched).__name__})")
    missing = [k for k in SCHEDULER_KEYS if k not in sched]
    if missing:
        raise ValueError(f"{TRAINER_STATE}: the scheduler state lacks {missing}")
    if sched["last_epoch"] != step or not _is_int(sched["last_epoch"]):
        raise ValueError(
            f"{TRAINER_STATE}: the scheduler state is at step {sched['last_epoch']!r}, the "
            f"checkpoint at step {step}"
        )
    if groups is None:  # the run's groups are not known here: the state must agree with itself
        groups = len(sched["base_lrs"]) if isinstance(sched["base_lrs"], list | tuple) else 0
        groups = max(groups, 1)
    for key in ("base_lrs", "_last_lr"):
        if not _finite_numbers(sched[key], groups):
            raise ValueError(
                f"{TRAINER_STATE}: the scheduler's {key} {sched[key]!r} is not {groups} finite "
                "numbers"
            )
    if not isinstance(sched["lr_lambdas"], list) or len(sched["lr_lambdas"]) != groups:
        raise ValueError(f"{TRAINER_STATE}: the scheduler's lr_lambdas is not a list of {groups}")


def _check_optimizer(opt: Any, param_shapes: list[list[tuple[int, ...]]]) -> None:
    import torch

    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
        raise ValueError(f"{TRAINER_STATE}: no optimizer state (got {type(opt).__name__})")
    if not isinstance(opt.get("state"), dict):
        raise ValueError(f"{TRAINER_STATE}: the optimizer state has no per-parameter 'state'")
    groups = opt["param_groups"]
    if len(groups) != len(param_shapes):
        raise ValueError(
            f"{TRAINER_STATE}: the optimizer state has {len(groups)} parameter groups, this "
            f"run {len(param_shapes)}"
        )
    shape_of: dict[Any, tuple[int, ...]] = {}
    for i, (group, shapes) in enumerate(zip(groups, param_shapes, strict=True)):
        missing = [k for k in OPTIMIZER_GROUP_KEYS if not isinstance(group, dict) or k not in group]
        if missing:
            raise ValueError(f"{TRAINER_STATE}: optimizer group {i} lacks {missing}")
        ids = group["params"]
        if not isinstance(ids, list) or len(ids) != len(shapes):
            n = len(ids) if isinstance(ids, list) else ids
            raise ValueError(
                f"{TRAINER_STATE}: optimizer group {i} holds {n} parameters, this run trains "
                f"{len(shapes)}"
            )
        shape_of.update(zip(ids, shapes, strict=True))
    for key, moments in opt["state"].items():
        if key not in shape_of:
            raise ValueError(f"{TRAINER_STATE}: optimizer state for parameter {key!r} of no group")
        for name in ("exp_avg", "exp_avg_sq"):
            t = moments.get(name) if isinstance(moments, dict) else None
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{TRAINER_STATE}: optimizer state {key}: no {name} tensor")
            if tuple(t.shape) != shape_of[key]:
                raise ValueError(
                    f"{TRAINER_STATE}: optimizer state {key}: {name} has shape "
                    f"{tuple(t.shape)}, the parameter {shape_of[key]}"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{TRAINER_STATE}: optimizer state {key}: {name} is not finite")


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


def capture_rng_state() -> dict[str, Any]:
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


def restore_rng_state(state: dict[str, Any]) -> None:
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


def rng_to_saved(state: dict[str, Any]) -> dict[str, Any]:
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


def rng_from_saved(saved: dict[str, Any]) -> dict[str, Any]:
    state = dict(saved)
    py = saved["python"]
    state["python"] = (py[0], tuple(py[1]), py[2])
    n = saved["numpy"]
    if isinstance(n, dict):
        keys = n["keys"].numpy().astype(np.uint32)
        state["numpy"] = (n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"])
    return state

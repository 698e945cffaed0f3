"""FSDP2 for the trainer (`trainer.parallel: fsdp`): sharded weights, gradients and optimizer state.

    torchrun --nproc_per_node N -m trainer -m MANIFEST      (with trainer.parallel: fsdp)

What `FSDP(adapter, ...)` does to the adapter's model, for any adapter:

- every transformer block is its own FSDP unit (`fully_shard`): the modules whose class the
  model lists in `_no_split_modules` (transformers' own "never split this" list: the decoder
  layers, and for Janus also the SigLIP encoder layers), outside the frozen parts;
- the rest (embeddings, heads, norms, the vision stem) is the root unit, which is the
  `LossModule` wrapping the model: the adapter's loss functions call submodules directly
  (`lm_head`, `generation_head`, the text model), so the root's all-gather and gradient
  reduce-scatter must be tied to one forward call around the whole loss, not to the HF model's
  own `forward`, which the adapters never call;
- the frozen parameters (`adapter.frozen_patterns`, the VQ models) are left out of FSDP
  (`ignored_params`): replicated on every rank in float32, as the adapters run them, no
  communication;
- on CUDA with bf16: parameters are all-gathered in bf16, gradients reduced in float32, master
  weights and AdamW state stay float32 shards (`MixedPrecisionPolicy(bf16, fp32)`); on CPU
  (gloo) everything is float32;
- activation checkpointing (`gradient_checkpointing: true`) is the adapter's own (transformers'
  non-reentrant checkpoint around each decoder layer), enabled before sharding: the recomputed
  forward all-gathers the layer again.

Checkpoints (`save`, `load`) go through torch.distributed.checkpoint: `step_N/dcp/` holds the
model and optimizer shards of every rank (`get_state_dict`), loadable onto any number of ranks
(DCP reshards on load) or into a plain model in one process (`load_model_state`). The last step
also holds a consolidated `save_pretrained` export (`export`), so `trainer.model: <step_N>` and
the evaluation read it like a DDP checkpoint.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FSDP", "LossModule", "block_modules", "load_model_state"]

DCP_DIR = "dcp"


class LossModule(nn.Module):
    """`forward(fn, *args)` returns `fn(*args)`: any adapter computation run as one forward of a
    module that owns the model, so FSDP's root hooks wrap it (all-gather before, gradient
    reduce-scatter after backward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _frozen(adapter) -> set[nn.Parameter]:
    pats = tuple(adapter.frozen_patterns)
    return {
        p
        for n, p in adapter.model.named_parameters()
        if any(fnmatch.fnmatchcase(n, pat) for pat in pats)
    }


def block_modules(model: nn.Module, frozen: set[nn.Parameter] = frozenset()) -> list[nn.Module]:
    """The transformer blocks to shard one by one: instances of the classes named in any
    `_no_split_modules` of the model's PreTrainedModel parts, none holding a frozen parameter
    (outermost only: a block inside another block stays with it)."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside or type(m).__name__ not in names:
            continue
        params = list(m.parameters())
        if not params or any(p in frozen for p in params):
            continue
        blocks.append(m)
        inside |= {id(x) for x in m.modules()}
    return blocks


class FSDP:
    """One model sharded with FSDP2 over all ranks of the default process group."""

    def __init__(self, adapter, device: str, param_dtype: torch.dtype | None = None):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.adapter = adapter
        model = adapter.model
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.mesh = init_device_mesh(device_type, (dist.get_world_size(),))
        frozen = _frozen(adapter)
        self.mp = MixedPrecisionPolicy(
            param_dtype=param_dtype if device_type == "cuda" else None,
            reduce_dtype=torch.float32 if param_dtype is not None else None,
        )
        self.blocks = block_modules(model, frozen)
        if not self.blocks:
            raise ValueError(
                f"trainer.parallel: fsdp: {type(model).__name__} lists no blocks to shard "
                "(_no_split_modules)"
            )
        kw = {"mesh": self.mesh, "mp_policy": self.mp}
        for block in self.blocks:
            fully_shard(block, **kw)
        self.root = LossModule(model)
        fully_shard(self.root, ignored_params=frozen, **kw)

    # ---- running

    def task_loss(self, adapter, task: str, batch: dict[str, Any]):
        """`Objective.task_loss` inside the root's forward (so its hooks wrap the loss)."""
        from trainer.objective import Objective

        return self.root(Objective.task_loss, adapter, task, batch)

    def run(self, fn, *args, **kwargs):
        """Any other computation on the sharded model (the probe): every rank must call it."""
        return self.root(fn, *args, **kwargs)

    @staticmethod
    def clip_grad_norm(params: list, max_norm: float) -> float:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(total.full_tensor() if hasattr(total, "full_tensor") else total)

    # ---- checkpoints

    def save(self, path: Path, optimizer) -> None:
        """Model and optimizer shards of every rank into `path/dcp/` (all ranks call it)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.root, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(path) / DCP_DIR))

    def load(self, path: Path, optimizer) -> None:
        """Load `path/dcp/` (written by any number of ranks) into the sharded model and optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.root, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
        set_state_dict(
            self.root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    def export(self, path: Path, is_main: bool, dtype=None) -> None:
        """Consolidated `adapter.save(path, dtype)` (save_pretrained) on the main rank: the full
        weights gathered to CPU (every rank takes part in the gather)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not is_main:
            return
        prefix = "model."
        full = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in full.items()}
        model = self.adapter.model
        # save_pretrained reads model.state_dict(); serve it the gathered copy for this call.
        model.state_dict = lambda *a, **k: full
        try:
            self.adapter.save(path, dtype=dtype)
        finally:
            del model.state_dict


def load_model_state(model: nn.Module, path: Path) -> None:
    """Load the model weights of an FSDP checkpoint `path` (a step folder) into a plain model,
    in one process without a process group (DCP reads every rank's shards)."""
    import torch.distributed.checkpoint as dcp

    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.load({"model": state}, checkpoint_id=str(Path(path) / DCP_DIR))
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items()})

"""The job's ranks: torchrun's environment read once, the process group opened and closed.

`Dist.setup` reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (one process when unset),
picks the rank's device (`cuda:<local_rank>` when CUDA is there, else the CPU) and opens a
process group for more than one rank, or for one when FSDP needs it. Used by trainer/loop.py
and benchmarks/train_throughput.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: str
    owns_group: bool

    @classmethod
    def setup(cls, group: bool = False) -> Dist:
        """Ranks from torchrun's environment; `group`: a process group even for one process
        (FSDP needs one)."""
        import torch
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        cuda = torch.cuda.is_available()
        device = f"cuda:{local}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(local)
        owns = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
            owns = True
        elif group and not dist.is_initialized():
            dist.init_process_group(
                "nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1
            )
            owns = True
        return cls(rank, world, local, local_world, device, owns)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()

"""Data-parallel training with torch.distributed, launched by torchrun (`trainer.strategy=ddp`).

    torchrun --nproc_per_node=N train.py trainer.strategy=ddp [hydra.run.dir=...]

nccl on CUDA, gloo on CPU. Every rank draws the same global batch indices and keeps its own contiguous slice, so N
ranks see exactly the samples one process would; DDP's gradient average gives the global batch mean. Only rank 0
logs, prints and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global batch."""
        n = len(indices) // self.world
        return indices[self.rank * n : (self.rank + 1) * n]

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (early stopping, non-finite stops)."""
        if not self.enabled:
            return flag
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def all_gather(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order, on every rank (a checkpoint keeps each rank's RNG state)."""
        if not self.enabled:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(strategy: str, device_name: str) -> tuple[Dist, str]:
    """Join the process group for strategy=ddp; returns the rank info and the device name to use."""
    if strategy == "single":
        return Dist(), device_name
    if strategy != "ddp":
        raise ConfigError(f"trainer.strategy={strategy!r}: use single or ddp")
    if "RANK" not in os.environ:
        raise ConfigError("trainer.strategy=ddp needs torchrun: torchrun --nproc_per_node=N train.py "
                          "trainer.strategy=ddp ... (RANK/WORLD_SIZE are not set)")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
    if cuda:
        torch.cuda.set_device(local)
        return Dist(rank, world, local), f"cuda:{local}"
    return Dist(rank, world, local), "cpu" if device_name == "auto" else device_name


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

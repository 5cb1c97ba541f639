"""The processes of a run, as torchrun or ``accelerate launch`` started them (one process when neither did).

Launchers set RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; this module only joins
the process group they describe (gloo on CPU, nccl on GPU) and offers the few collectives the
trainer needs. Starting processes is the launcher's job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import SparseLLMError


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """Element-wise mean of per-process numbers (losses for the log)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return (tensor / self.world).tolist()

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (the others pass a tensor of the same shape and dtype)."""
        if self.distributed:
            moved = tensor.to(self.device)
            dist.broadcast(moved, 0)
            tensor.copy_(moved.cpu() if tensor.device.type == "cpu" else moved)
        return tensor

    def gather_objects(self, value) -> list:
        if not self.distributed:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def join(device: str | None = None) -> Processes:
    """Join the launcher's process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in (None, "cpu", "cuda"):
        raise SparseLLMError(f"unknown device '{device}': use cpu or cuda")
    wants_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise SparseLLMError("--device cuda was asked for, but torch sees no CUDA device")
    chosen = torch.device("cuda", local_rank) if wants_cuda else torch.device("cpu")
    if wants_cuda:
        torch.cuda.set_device(chosen)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if wants_cuda else "gloo")
    return Processes(rank, world, local_rank, chosen)

"""torch.distributed through torchrun's environment: NCCL on GPUs, gloo on CPUs; one process otherwise."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import DsdError

__all__ = ["DistEnv", "init_distributed", "all_reduce_sum", "all_equal", "from_main_rank", "broadcast_module"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; pick the device and the process-group backend."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DsdError("device: cuda asked for, but this machine has no CUDA GPU; use device=cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, world_size, local_rank, target)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_equal(value: torch.Tensor, env: DistEnv) -> bool:
    """Whether every rank holds the same (scalar) value."""
    if not env.distributed:
        return True
    gathered = [torch.zeros_like(value) for _ in range(env.world_size)]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def from_main_rank(make: Callable[[], Any], env: DistEnv) -> Any:
    """``make()`` run on rank 0 only, its result (a picklable value) on every rank; where it raises there, every rank
    raises (the others with a :class:`DsdError` that says so) instead of waiting on it."""
    if not env.distributed:
        return make()
    box: list = [None]
    if env.is_main:
        try:
            box = [("value", make())]
        except Exception as error:
            dist.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise DsdError(f"rank 0 failed: {value}")
    return value


def broadcast_module(module: nn.Module, env: DistEnv) -> nn.Module:
    """``module`` on ``env.device`` with rank 0's parameters and buffers on every rank (as DDP does when it wraps a
    model)."""
    module.to(env.device)
    if env.distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
    return module

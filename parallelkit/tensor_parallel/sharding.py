"""How a tensor-parallel layer finds its group and keeps its shard of a full weight.

Every sharded parameter carries ``tp_shard_dim`` (the dim split across TP ranks, or None when it
is replicated), so checkpointing and conversion code can rebuild the full tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallelkit.distributed import mpu


def resolve_tp_group(tp_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The group passed in, else the MPU's TP group (a clear error if the MPU is not set up)."""
    return tp_group if tp_group is not None else mpu.get_tp_group()


def divide(size: int, tp: int, what: str) -> int:
    """``size / tp``, or a ValueError naming ``what`` and the fix."""
    if size % tp:
        raise ValueError(f"{what}={size} is not divisible by the tensor-parallel size tp={tp}; "
                         f"choose a size that is a multiple of {tp} (or pad it) or a smaller tp")
    return size // tp


def copy_shard_(param: torch.Tensor, full: torch.Tensor, dim: int | None,
                group: dist.ProcessGroup) -> None:
    """Copy this rank's chunk of ``full`` along ``dim`` (all of it when dim is None) into param."""
    if dim is not None:
        full = full.chunk(dist.get_world_size(group), dim)[dist.get_rank(group)]
    with torch.no_grad():
        param.copy_(full)
    param.tp_shard_dim = dim


def new_parameter(shape: tuple[int, ...], dtype, device, shard_dim: int | None) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
    param.tp_shard_dim = shard_dim
    return param

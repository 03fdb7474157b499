"""How a tensor-parallel layer checks its arguments and inputs and keeps its shard of a full
weight (its group: ``parallelkit.distributed.groups``).

Every sharded parameter carries ``tp_shard_dim`` (the dim split across TP ranks, or None when it
is replicated), so checkpointing and conversion code can rebuild the full tensor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallelkit.distributed import rank_groups


def check_positive_int(owner: str, name: str, value) -> None:
    """``value`` must be an int (not a bool or a float) >= 1: caught at construction, not as a
    raw error deep in a kernel or a pybind signature later."""
    rank_groups.check_positive_int(f"{owner} {name}", value)


def check_eps(owner: str, eps, allow_none: bool = False) -> None:
    """A norm's eps: a finite float > 0 (a negative one makes rsqrt of a zero variance NaN)."""
    if eps is None and allow_none:
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps <= 0:
        none = " or None (the dtype's machine epsilon)" if allow_none else ""
        raise ValueError(f"{owner} eps={eps!r} must be a finite number > 0{none}, e.g. 1e-5")


def check_input(owner: str, x, weight: torch.Tensor | None, *, same_dtype: bool = True) -> None:
    """``x`` is a floating tensor on the weight's device (and, with ``same_dtype``, of its dtype
    unless autocast is on), so a mistake names the layer rather than surfacing as a matmul error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner} expects a floating-point input, got {x.dtype}; cast it with "
                        f"x.float() (token ids go to an embedding first)")
    if weight is None:
        return
    if x.device != weight.device:
        raise ValueError(f"{owner} has its parameters on {weight.device} but got an input on "
                         f"{x.device}; move one of them (x.to({str(weight.device)!r}) or "
                         f"layer.to({str(x.device)!r}))")
    if same_dtype and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{owner} has {weight.dtype} parameters but got a {x.dtype} input; cast "
                        f"the input (x.to({weight.dtype})) or the layer (layer.to({x.dtype})), "
                        f"or run under torch.autocast")


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

"""Collectives on parallelkit's groups. The one module that talks to the communication backend.

No function modifies its input (with a group of one it may return it), so autograd Functions can
call them on tensors autograd still needs. ``count_traffic()`` records what every collective moved, which is how the
benchmarks show that a layer communicates no more than its algorithm needs.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

# torch 2.14 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Traffic:
    """Payload bytes per collective kind: the all-reduced tensor, the gathered output, the
    reduce-scattered input. ``wire_bytes`` converts them to what each rank sends on a ring."""

    payload: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    wire: float = 0.0

    def add(self, kind: str, nbytes: int, group_size: int) -> None:
        self.payload[kind] += nbytes
        self.calls[kind] += 1
        share = (group_size - 1) / group_size  # ring: each rank sends (p-1)/p of the payload ...
        self.wire += nbytes * share * (2 if kind == "all_reduce" else 1)  # ... twice to all-reduce


_traffic: Traffic | None = None


@contextlib.contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count every collective issued through this module inside the block (on this rank)."""
    global _traffic
    outer, _traffic = _traffic, Traffic()
    try:
        yield _traffic
    finally:
        _traffic = outer


def record_traffic(kind: str, nbytes: int, group: dist.ProcessGroup) -> None:
    """Count a collective's payload (also called by native ops that communicate themselves)."""
    if _traffic is not None:
        _traffic.add(kind, nbytes, dist.get_world_size(group))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup, op: str = "sum") -> torch.Tensor:
    """Elementwise ``op`` ("sum" or "max") of ``x`` over the group, on every member."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"op={op!r} must be one of {sorted(_REDUCE_OPS)}")
    if dist.get_world_size(group) == 1:
        return x
    out = x.contiguous().clone()
    record_traffic("all_reduce", _nbytes(out), group)
    dist.all_reduce(out, op=_REDUCE_OPS[op], group=group)
    return out


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Members' ``x`` concatenated along ``dim`` in group-rank order: size p * x.size(dim)."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    front = x.movedim(dim, 0).contiguous()  # the single-tensor collective stacks along dim 0
    out = front.new_empty((p * front.shape[0], *front.shape[1:]))
    record_traffic("all_gather", _nbytes(out), group)
    _all_gather_single(out, front, group=group)
    return out.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This member's chunk (group-rank order) along ``dim`` of the sum of ``x`` over the group."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    check_divisible(x, dim, p, "reduce-scatter")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // p, *front.shape[1:]))
    record_traffic("reduce_scatter", _nbytes(front), group)
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


def split(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This member's chunk of ``x`` along ``dim`` (no communication)."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    check_divisible(x, dim, p, "split")
    return x.chunk(p, dim)[dist.get_rank(group)].contiguous()


def check_divisible(x: torch.Tensor, dim: int, parts: int, what: str) -> None:
    if x.shape[dim] % parts:
        raise ValueError(f"cannot {what} a tensor of shape {tuple(x.shape)} along dim {dim} into "
                         f"{parts} equal parts: {x.shape[dim]} is not divisible by {parts}; "
                         f"pad or choose a size divisible by the group size")


def group_members(group: dist.ProcessGroup, device: torch.device | str = "cpu") -> list[int]:
    """Global ranks of the processes that actually answer a collective on ``group``.

    Each member adds 1 at its own global rank to a vector all-reduced (SUM) over the group by the
    native op, so the result proves membership through the communicator itself rather than
    trusting its bookkeeping. A count other than 0 or 1 means a broken group and raises.
    """
    from parallelkit._native import native

    counts = native.group_membership(group, dist.get_rank(), dist.get_world_size(),
                                     torch.device(device)).tolist()
    if any(c not in (0, 1) for c in counts):
        raise RuntimeError(f"group membership counts {counts} are not all 0 or 1: some rank "
                           "joined the all-reduce twice or with another group")
    return [rank for rank, count in enumerate(counts) if count == 1]

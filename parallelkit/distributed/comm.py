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


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int,
               group: dist.ProcessGroup) -> torch.Tensor:
    """Chunk ``x`` along ``scatter_dim`` and send chunk i to group rank i; concatenate the chunks
    received, in rank order, along ``gather_dim``."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    check_divisible(x, scatter_dim, p, "all-to-all")
    # all_to_all_single exchanges slabs of dim 0: put the scattered dim first.
    front = x.movedim(scatter_dim, 0).contiguous()
    received = torch.empty_like(front)
    record_traffic("all_to_all", _nbytes(front), group)
    dist.all_to_all_single(received, front, group=group)
    chunks = received.movedim(0, scatter_dim).chunk(p, scatter_dim)
    return torch.cat(chunks, gather_dim)


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


# --- Flat buffers, asynchronously: data parallelism's gradient and parameter buckets -------------
# Unlike the functions above, these write into buffers the caller owns (a bucket's flat gradient
# or parameter storage, tens of MB): that is their point, no copy per bucket. Each returns a
# handle at once so the caller can keep computing (the rest of backward) while the bytes move.


class Handle:
    """A collective in flight. ``wait()`` blocks until its output is written, then returns it."""

    def __init__(self, work: dist.Work | None, result: torch.Tensor):
        self._work, self.result = work, result

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self.result


def _check_flat(buffer: torch.Tensor, what: str) -> None:
    if buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(f"{what} needs a contiguous 1-D buffer, got shape {tuple(buffer.shape)} "
                         f"(contiguous={buffer.is_contiguous()})")


def all_reduce_async_(buffer: torch.Tensor, group: dist.ProcessGroup) -> Handle:
    """Sum ``buffer`` [n] over the group, in place; the handle's ``wait()`` returns ``buffer``."""
    _check_flat(buffer, "all_reduce_async_")
    if dist.get_world_size(group) == 1:
        return Handle(None, buffer)
    record_traffic("all_reduce", _nbytes(buffer), group)
    return Handle(dist.all_reduce(buffer, group=group, async_op=True), buffer)


def reduce_scatter_async(buffer: torch.Tensor, out: torch.Tensor,
                         group: dist.ProcessGroup) -> Handle:
    """``out`` [n/p] ← this member's chunk (group-rank order) of the sum of ``buffer`` [n].

    ``buffer`` is left as it was; ``out`` must not overlap it (gloo does not promise in-place).
    """
    _check_flat(buffer, "reduce_scatter_async")
    p = dist.get_world_size(group)
    check_divisible(buffer, 0, p, "reduce-scatter")
    if out.shape != (buffer.numel() // p,):
        raise ValueError(f"reduce_scatter_async: out has shape {tuple(out.shape)}, expected "
                         f"({buffer.numel() // p},): the buffer's {buffer.numel()} elements over "
                         f"the group's {p} members")
    if p == 1:
        out.copy_(buffer)
        return Handle(None, out)
    record_traffic("reduce_scatter", _nbytes(buffer), group)
    return Handle(_reduce_scatter_single(out, buffer, group=group, async_op=True), out)


def all_gather_async_(buffer: torch.Tensor, group: dist.ProcessGroup) -> Handle:
    """Fill ``buffer`` [n] in place from every member's own chunk ``buffer.chunk(p)[rank]``.

    In place on purpose (the chunk is a view of the output, which NCCL and gloo both support): a
    distributed optimizer gathers updated parameter shards straight into the parameters' storage.
    """
    _check_flat(buffer, "all_gather_async_")
    p = dist.get_world_size(group)
    check_divisible(buffer, 0, p, "all-gather")
    if p == 1:
        return Handle(None, buffer)
    record_traffic("all_gather", _nbytes(buffer), group)
    shard = buffer.chunk(p)[dist.get_rank(group)]
    return Handle(_all_gather_single(buffer, shard, group=group, async_op=True), buffer)

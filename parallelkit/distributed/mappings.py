"""Autograd-aware communication between tensor-parallel regions (Megatron's "mappings").

Each function is an autograd Function whose backward is the adjoint of its forward:

    forward                              backward                    used by
    copy_to_tp_region       identity     all-reduce                  column-parallel input
    reduce_from_tp_region   all-reduce   identity                    row-parallel output
    scatter_to_tp_region    split ..-1   all-gather ..-1             row-parallel, full input
    gather_from_tp_region   all-gather -1  split -1                  column-parallel, gather_output
    scatter_to_sp_region    split dim d  all-gather dim d            entering sequence parallel
    gather_from_sp_region   all-gather d reduce-scatter d (or split) column-parallel under SP
    reduce_scatter_to_sp_region  reduce-scatter d  all-gather d      row-parallel under SP
    all_to_all              split a, gather b   split b, gather a    Ulysses context parallelism

Sequence-parallel tensors are sequence-first by default, ``[s/tp, b, h]`` as in Megatron, so the
sequence is dim ``d = 0`` and every collective works on contiguous slabs. Batch-first models
(Hugging Face, ``[b, s/tp, h]``) pass ``dim=1``; the collectives then move the sequence to the
front and back, one extra copy per call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallelkit.distributed import comm


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Scatter(torch.autograd.Function):
    """Forward keeps this rank's chunk along ``dim``, of ``x`` itself or (``reduce``) of the sum
    of all ranks' ``x``; backward all-gathers the gradient either way."""

    @staticmethod
    def forward(ctx, x, dim, group, reduce):
        ctx.dim, ctx.group = dim, group
        return comm.reduce_scatter(x, dim, group) if reduce else comm.split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.dim, ctx.group), None, None, None


class _Gather(torch.autograd.Function):
    """Forward all-gathers along ``dim``; backward reduce-scatters the gradient (when each rank's
    consumer of the gathered tensor contributed a partial gradient) or keeps this rank's chunk
    (when the gradient is already the same on all ranks)."""

    @staticmethod
    def forward(ctx, x, dim, group, reduce_grad):
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return comm.all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return comm.reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return comm.split(grad, ctx.dim, ctx.group), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return comm.all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return comm.all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def copy_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x`` replicated on the TP ranks enters a region whose ranks each use all of it."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Partial sums ``x`` (one per TP rank) leave the region as their total, on every rank."""
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x: [..., h]`` replicated → ``[..., h/tp]``, this rank's slice of the last dim."""
    return _Scatter.apply(x, -1, group, False)


def gather_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x: [..., h/tp]`` → ``[..., h]``, the slices of all TP ranks in rank order."""
    return _Gather.apply(x, -1, group, False)


def scatter_to_sp_region(x: torch.Tensor, group: dist.ProcessGroup, *,
                         dim: int = 0) -> torch.Tensor:
    """``x: [s, b, h]`` replicated → ``[s/tp, b, h]``, this rank's part of the sequence; with
    ``dim=1``, ``x: [b, s, h]`` → ``[b, s/tp, h]``."""
    return _Scatter.apply(x, dim, group, False)


def gather_from_sp_region(x: torch.Tensor, group: dist.ProcessGroup,
                          tp_output_grad: bool = True, *, dim: int = 0) -> torch.Tensor:
    """``x: [s/tp, b, h]`` → ``[s, b, h]`` on every TP rank; with ``dim=1``,
    ``x: [b, s/tp, h]`` → ``[b, s, h]``.

    With ``tp_output_grad`` (the usual case: the full sequence feeds a column-parallel matmul,
    so each rank's gradient is a partial sum) the backward reduce-scatters; without it the
    gradient is taken to be identical on all ranks and is only split.
    """
    return _Gather.apply(x, dim, group, tp_output_grad)


def reduce_scatter_to_sp_region(x: torch.Tensor, group: dist.ProcessGroup, *,
                                dim: int = 0) -> torch.Tensor:
    """Partial sums ``x: [s, b, h]`` → ``[s/tp, b, h]``, this rank's part of their total; with
    ``dim=1``, ``x: [b, s, h]`` → ``[b, s/tp, h]``."""
    return _Scatter.apply(x, dim, group, True)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int,
               group: dist.ProcessGroup) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` across the group and concatenate what every rank sent
    along ``gather_dim`` (rank order); backward is the reverse all-to-all. Ulysses uses it to
    trade a sequence split ([b, h, s/p, d]) for a head split ([b, h/p, s, d])."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


# What a sequence-parallel layer checks of its ``sequence_dim`` before it calls the regions above.
def check_sequence_dim(owner: str, sequence_dim) -> None:
    """A layer's ``sequence_dim`` argument is an int; the input it must fit is checked at forward
    by :func:`sequence_dim_of`."""
    if isinstance(sequence_dim, bool) or not isinstance(sequence_dim, int):
        raise ValueError(f"{owner} sequence_dim={sequence_dim!r} must be an int: 0 for "
                         f"sequence-first [s, b, h] activations, 1 for batch-first [b, s, h]")


def sequence_dim_of(owner: str, shape: tuple[int, ...], sequence_dim: int,
                    what: str = "input") -> int:
    """``sequence_dim`` as a dim >= 0 of an activation ``[..., h]`` of ``shape``, which must have
    that dim and must not be the last (the features): else a ValueError naming the valid ones."""
    ndim = len(shape)
    dim = sequence_dim + ndim if sequence_dim < 0 else sequence_dim
    if not 0 <= dim < ndim - 1:
        valid = (f"one of 0..{ndim - 2} (or {-ndim}..-2)" if ndim > 1
                 else "a dim other than the features, and it has none")
        raise ValueError(f"{owner} sequence_dim={sequence_dim} does not name a sequence dim of its "
                         f"{what} of shape {tuple(shape)}: it must be {valid}, not the last dim "
                         f"(the features); 0 for [s, b, h], 1 for [b, s, h]")
    return dim


def check_sequence_divisible(owner: str, shape: tuple[int, ...], dim: int, tp: int) -> None:
    """The sequence (dim ``dim`` of an activation ``[..., h]`` of ``shape``) splits ``tp`` ways."""
    if shape[dim] % tp:
        others = len(shape) - 2
        names = ["b"] if others == 1 else [f"b{i}" for i in range(others)]
        names.insert(dim, "s")
        layout = ", ".join(names + ["h"])
        raise ValueError(
            f"{owner}(sequence_parallel=True) splits the sequence (dim {dim} of [{layout}]) "
            f"across tp={tp} ranks, but s={shape[dim]} is not divisible by {tp}; pad the "
            f"sequence to a multiple of {tp}")

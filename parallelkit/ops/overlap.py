"""Sequence-parallel matmuls with their collective fused in (native ring ops of parallelkit._C).

``all_gather_matmul`` replaces all-gather-then-matmul in a column-parallel layer and
``matmul_reduce_scatter`` replaces matmul-then-reduce-scatter in a row-parallel one. Each is a
ring of tp steps (times ``chunks_per_rank``) in which one piece's matmul runs while the next piece
travels, so the communication hides behind the math. Each one's backward is the other: the input
gradient of an all-gather matmul is a matmul reduce-scatter, and vice versa, and the weight
gradient uses the gathered tensor the forward (or backward) ring produced anyway.

The native rings are the dispatcher ops ``parallelkit::all_gather_matmul`` and
``parallelkit::matmul_reduce_scatter`` (TORCH_LIBRARY in csrc/bindings.cpp, the group by name;
their fake kernels below), so ``torch.compile`` puts them in its graph as they are. An eager call
first picks the group's ring transport (``ring_transport.py`` registers it with the native side);
a compiled graph uses the one registered, else the group's own send/recv.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import parallelkit._native  # noqa: F401  (loads _C: the ops' TORCH_LIBRARY registration)
from parallelkit.distributed import comm
from parallelkit.ops.ring_transport import for_group as ring_transport_for


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _all_gather_matmul_op(rows: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup,
                          chunks_per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(all_gather(rows) @ weight^T, all_gather(rows)): rows [m, k], weight [n, k] → [tp·m, n],
    [tp·m, k], through ``torch.ops.parallelkit.all_gather_matmul``."""
    if not comm.compiling():  # eager: pick (and register) the transport, count the bytes
        ring_transport_for(group, rows.device, "all_gather_matmul")
        comm.record_traffic("all_gather", rows.numel() * dist.get_world_size(group) *
                            rows.element_size(), group)
    return torch.ops.parallelkit.all_gather_matmul(rows, weight, comm.group_name(group),
                                                   chunks_per_rank)


def _matmul_reduce_scatter_op(rows: torch.Tensor, weight: torch.Tensor,
                              group: dist.ProcessGroup, chunks_per_rank: int) -> torch.Tensor:
    """reduce_scatter(rows @ weight^T, dim 0): rows [m, k], weight [n, k] → [m/tp, n], through
    ``torch.ops.parallelkit.matmul_reduce_scatter``."""
    if not comm.compiling():
        ring_transport_for(group, rows.device, "matmul_reduce_scatter")
        comm.record_traffic("reduce_scatter", rows.shape[0] * weight.shape[0] *
                            rows.element_size(), group)
    return torch.ops.parallelkit.matmul_reduce_scatter(rows, weight, comm.group_name(group),
                                                       chunks_per_rank)


# The shapes of the native ops (registered in csrc/bindings.cpp) for torch.compile's tracing.
@torch.library.register_fake("parallelkit::all_gather_matmul")
def _(rows, weight, group, chunks_per_rank):
    tp = dist.get_world_size(comm.group_by_name(group))
    return (rows.new_empty((tp * rows.shape[0], weight.shape[0])),
            rows.new_empty((tp * rows.shape[0], rows.shape[1])))


@torch.library.register_fake("parallelkit::matmul_reduce_scatter")
def _(rows, weight, group, chunks_per_rank):
    tp = dist.get_world_size(comm.group_by_name(group))
    return rows.new_empty((rows.shape[0] // tp, weight.shape[0]))


class AllGatherMatmulFunction(torch.autograd.Function):
    """(``all_gather(x) @ cat(weights)^T``, ``all_gather(x)``), the gather fused into the matmul's
    ring (``fused``) or done first.

    The gathered input is returned too: the ring assembles it anyway, and a caller that needs it
    (a region whose module reads the whole sequence) then gets it without a second all-gather;
    its gradient, if it is used, is reduce-scattered into ``x``'s. Only this rank's ``x`` is
    saved for backward, which gathers it again for the weight gradient (as Megatron's
    sequence-parallel linear does): the gathered ``[s, b, k]`` does not outlive the forward,
    which is most of what sequence parallelism saves. Several weights (q, k and v) are
    concatenated for the forward only, so no copy of them is kept either.
    """

    @staticmethod
    def forward(ctx, x, group, chunks_per_rank, fused, *weights):
        tp = dist.get_world_size(group)
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        if fused:
            y, gathered = _all_gather_matmul_op(_rows(x), weight, group, chunks_per_rank)
        else:
            with comm.entry_checked():
                gathered = comm.all_gather(_rows(x), 0, group)
            y = gathered @ weight.t()
        ctx.save_for_backward(x, *weights)
        ctx.group, ctx.chunks, ctx.fused = group, chunks_per_rank, fused
        ctx.set_materialize_grads(False)
        lead = (tp * x.shape[0], *x.shape[1:-1])
        return y.view(*lead, weight.shape[0]), gathered.view(*lead, x.shape[-1])

    @staticmethod
    def backward(ctx, grad_y, grad_gathered):
        x, *weights = ctx.saved_tensors
        rows, group = _rows(x), ctx.group
        grad_x, grad_weights = None, [None] * len(weights)
        if grad_y is not None:
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            grad_rows = _rows(grad_y)
            if ctx.fused:
                grad_x = _matmul_reduce_scatter_op(grad_rows, weight.t(), group, ctx.chunks)
            else:
                with comm.entry_checked():
                    grad_x = comm.reduce_scatter(grad_rows @ weight, 0, group)
            with comm.entry_checked():
                gathered = comm.all_gather(rows, 0, group)
            grad_weights = (grad_rows.t() @ gathered).split([w.shape[0] for w in weights])
        if grad_gathered is not None:
            with comm.entry_checked():
                more = comm.reduce_scatter(_rows(grad_gathered), 0, group)
            grad_x = more if grad_x is None else grad_x + more
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return (grad_x, None, None, None, *grad_weights)


class MatmulReduceScatterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group, chunks_per_rank):
        tp = dist.get_world_size(group)
        y = _matmul_reduce_scatter_op(_rows(x), weight, group, chunks_per_rank)
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.chunks = group, chunks_per_rank
        return y.view(x.shape[0] // tp, *x.shape[1:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x, gathered_grad = _all_gather_matmul_op(_rows(grad_y), weight.t(), ctx.group,
                                                      ctx.chunks)
        grad_weight = gathered_grad.t() @ _rows(x)
        return grad_x.view(x.shape), grad_weight, None, None


def all_gather_matmul(x: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup,
                      chunks_per_rank: int = 1) -> torch.Tensor:
    """``all_gather(x, dim 0) @ weight^T`` with the gather overlapped.

    x: ``[s/tp, b, k]`` (any leading dims; dim 0 is the sequence), weight: ``[n, k]``.
    Returns ``[s, b, n]``. ``(s/tp) * b`` must divide by ``chunks_per_rank``. Every rank's x
    travels the ring: the ranks must agree on its shape and dtype, and on ``chunks_per_rank``.
    """
    return all_gather_matmul_and_input(x, [weight], group, chunks_per_rank)[0]


def all_gather_matmul_and_input(x: torch.Tensor, weights: list[torch.Tensor],
                                group: dist.ProcessGroup, chunks_per_rank: int = 1, *,
                                fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_gather(x) @ cat(weights)^T, all_gather(x))``: :func:`all_gather_matmul` against
    several weights ``[n_i, k]`` at once (a region's q, k and v), also returning the gathered
    ``x`` ``[s, b, k]`` (see :class:`AllGatherMatmulFunction`); both outputs are
    differentiable. ``fused=False`` gathers first, then multiplies (same results, same saved
    tensors)."""
    comm.check_ranks_agree(group, "all_gather_matmul", ranks="tensor-parallel",
                           x_shape=x.shape, dtype=x.dtype, chunks_per_rank=chunks_per_rank,
                           fix="every TP rank must pass its s/tp tokens of the same batch (equal "
                               "x shapes) in one dtype, with the same chunks_per_rank")
    return AllGatherMatmulFunction.apply(x, group, chunks_per_rank, fused, *weights)


def matmul_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup,
                          chunks_per_rank: int = 1) -> torch.Tensor:
    """``reduce_scatter(x @ weight^T, dim 0)`` with the reduce-scatter overlapped.

    x: ``[s, b, k/tp]``, weight: ``[n, k/tp]``. Returns ``[s/tp, b, n]``, this rank's part of the
    sequence. ``s * b`` must divide by ``tp * chunks_per_rank``. Partial sums ``[rows, n]``
    travel the ring: the ranks must agree on x's token dims, on n, the dtype and the chunks.
    """
    comm.check_ranks_agree(group, "matmul_reduce_scatter", ranks="tensor-parallel",
                           token_dims=x.shape[:-1], output_features=weight.shape[:1],
                           dtype=x.dtype, chunks_per_rank=chunks_per_rank,
                           fix="every TP rank must pass the same tokens (same sequence length "
                               "and batch) and weights of the same output size, in one dtype, "
                               "with the same chunks_per_rank")
    return MatmulReduceScatterFunction.apply(x, weight, group, chunks_per_rank)

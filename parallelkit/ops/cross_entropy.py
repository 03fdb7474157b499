"""Softmax cross-entropy of logits whose vocabulary is split across tensor-parallel ranks.

A column-parallel LM head leaves TP rank r the logits of vocabulary columns
``[r·V_local, (r+1)·V_local)`` (slices may also be uneven: rank r holds the ``V_r`` columns after
the earlier ranks' ``V_0 + ... + V_{r-1}``). Gathering them would cost every rank the full
``[T, V]``; instead each rank reduces its slice to a few numbers per token and only those travel:

    forward   local stats: m_r = max x, Σ exp(x - m_r), x_target, Σ (x - m_r)   (one read)
              all-reduce max → M; one all-reduce sum of the terms moved to the global max:
              [Σexp·exp(m_r - M),  x_target (0 off its owner),  Σ(x - m_r) + V_local·(m_r - M)]
              loss_row = (1-ε)(lse - x_target) + ε(lse - Σx / V),   lse = M + log Σexp
    backward  grad = (softmax(x) - (1-ε)·onehot(target) - ε/V) · d loss / d loss_row
              (local: no communication)

which is ``F.cross_entropy(full_logits, targets, label_smoothing=ε)`` row by row. The local steps
run as Triton kernels (``parallelkit.kernels.cross_entropy``) when
``parallelkit.ops._backend.use_triton`` says so and the logits are float32/bfloat16/float16, and
as the same math in torch otherwise (CPU, float64).

Each call first learns every rank's slice size (one tiny all-gather, and a host sync on the GPU,
unless the caller passes ``vocab_sizes``), and, where ``comm.validation_enabled``, checks that the
TP ranks agree on the token shape, dtype and options (unequal token counts would abort the
all-reduces). The targets must be the same on every TP rank; their values are not compared.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from parallelkit.distributed import comm, mpu
from parallelkit.ops._backend import use_triton

REDUCTIONS = ("mean", "sum", "none")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_CHUNK_ELEMENTS = 2**24  # logits per step of the torch path: 64 MB of float32 temporaries


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                 tp_group: dist.ProcessGroup | None = None, *,
                                 label_smoothing: float = 0.0, ignore_index: int = -100,
                                 reduction: str = "mean", inplace_backward: bool = False,
                                 vocab_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Cross-entropy over the full vocabulary from this rank's slice of the logits.

    Args:
        logits: [..., V_local], e.g. [s, b, V/tp] from a column-parallel LM head (class dim last):
            TP rank r's slice of the vocabulary, the columns after the earlier ranks' slices
            (all equal: [r·V_local, (r+1)·V_local)). Floating point; the same [...] on every rank.
        targets: [...] integer global class ids in [0, V), or ``ignore_index``; the same on
            every TP rank.
        tp_group: the ranks the vocabulary is split over; default ``mpu.get_tp_group()``. A group
            of one is the plain unsharded cross-entropy (no collectives).
        label_smoothing: ε in [0, 1), as in ``F.cross_entropy``.
        ignore_index: rows with this target add 0 and leave the 'mean' denominator.
        reduction: 'mean' (over rows not ignored; nan when all are, as torch), 'sum' or 'none'.
        inplace_backward: write the gradient over the logits' memory instead of allocating a
            second [..., V_local] tensor. Only when nothing else reads the logits after this
            loss (true of an LM head's output); their version counter is bumped, so autograd
            raises if something does.
        vocab_sizes: every TP rank's V_local in rank order, if the caller knows them (a layer
            does): saves the all-gather that otherwise learns them.

    Returns:
        loss: scalar, or [...] for 'none'; float32 (float64 for float64 logits), equal on every
        TP rank. Its gradient w.r.t. ``logits`` has the logits' dtype.
    """
    if tp_group is None and not mpu.is_initialized():  # a bad input is named before that
        _check_inputs(logits, targets, label_smoothing, reduction)
    group = tp_group if tp_group is not None else mpu.get_tp_group()

    def local_checks():
        _check_inputs(logits, targets, label_smoothing, reduction)
        if vocab_sizes is not None:
            _check_vocab_sizes(group, logits.shape[-1], vocab_sizes)

    comm.check_ranks_agree(
        group, "vocab_parallel_cross_entropy", ranks="tensor-parallel", check=local_checks,
        token_shape=targets.shape, logits_dtype=logits.dtype, label_smoothing=label_smoothing,
        ignore_index=ignore_index, reduction=reduction, vocab_sizes=vocab_sizes,
        fix="every TP rank must pass the logits of the same tokens (same sequence length and "
            "batch) and the same targets and options")
    n_local = logits.shape[-1]
    if vocab_sizes is None and comm.compiling():
        # A compiled graph cannot exchange Python ints: the slices are taken as even (as every
        # parallelkit layer makes them); pass vocab_sizes for uneven ones.
        vocab_sizes = (n_local,) * dist.get_world_size(group)
    elif vocab_sizes is None:  # the slices may be uneven: learn each rank's size
        vocab_sizes = comm.all_gather_ints(group, n_local)
    vocab_sizes = tuple(int(v) for v in vocab_sizes)
    # Tokens are independent rows: take them in the logits' memory order, so that logits which
    # are a permuted view (a sequence-parallel head's [b, s, V/tp] of an [s, b, V/tp] result)
    # flatten without a copy, which the loss would keep for backward beside the original.
    order = memory_order(logits)
    flat_logits = logits.permute(*order, -1).reshape(-1, n_local)
    if flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()
    flat_targets = targets.permute(*order).reshape(-1).long().contiguous()
    loss = VocabParallelCrossEntropyFunction.apply(
        flat_logits, flat_targets, group, float(label_smoothing), int(ignore_index), reduction,
        bool(inplace_backward), vocab_sizes)
    if reduction != "none":
        return loss
    lead = [targets.shape[d] for d in order]
    return loss.view(lead).permute(*sorted(range(len(order)), key=order.__getitem__))


def memory_order(t: torch.Tensor) -> list[int]:
    """The dims of ``t`` before the last, outermost first in memory (largest stride first;
    ties keep their order)."""
    return sorted(range(t.dim() - 1), key=lambda d: -t.stride(d))


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Autograd of :func:`vocab_parallel_cross_entropy` on flattened inputs: logits [T, V_local]
    (last dim contiguous), targets [T] int64, ``vocab_sizes`` every rank's V_local. Returns the
    reduced loss, or [T] for 'none'."""

    @staticmethod
    def forward(ctx, logits, targets, tp_group, label_smoothing, ignore_index, reduction,
                inplace_backward, vocab_sizes):
        n_local, rank = logits.shape[1], dist.get_rank(tp_group)
        vocab_size, vocab_start = sum(vocab_sizes), sum(vocab_sizes[:rank])
        _check_targets(targets, vocab_size, ignore_index, vocab_sizes)
        kernels = logits.dtype in _KERNEL_DTYPES and use_triton(logits)
        if kernels:
            from parallelkit.kernels.cross_entropy import cross_entropy_stats_forward as local_stats
        else:
            local_stats = _stats_torch
        stats = local_stats(logits, targets, vocab_start)  # [4, T]: m_r, Σexp, x_target, Σ(x-m_r)

        with comm.entry_checked():  # [T] on every rank: the entry checked the token shape
            row_max = comm.all_reduce(stats[0], tp_group, op="max")
        # Moved to the global max M, every rank's terms add up (a rank whose slice is all -inf
        # has m_r = -inf and adds 0 and -inf). Σ(x - M) is needed, and sent, only for smoothing.
        sums = stats[1:4 if label_smoothing else 3]
        sums[0] *= torch.exp(stats[0] - row_max)
        if label_smoothing:
            sums[2] += n_local * (stats[0] - row_max)
        with comm.entry_checked():
            sums = comm.all_reduce(sums, tp_group)
        log_sum = torch.log(sums[0])
        # lse - x as (M - x) + log Σ: M - x is exact for logits far from 0 where lse - x is not;
        # likewise lse - Σx/V = log Σ - Σ(x - M)/V.
        loss = (row_max - sums[1]) + log_sum
        if label_smoothing:
            smooth = log_sum - sums[2] / vocab_size
            loss = (1 - label_smoothing) * loss + label_smoothing * smooth
        kept = targets != ignore_index
        loss = torch.where(kept, loss, 0.0)
        n_kept = kept.sum()

        ctx.save_for_backward(logits, targets, row_max, log_sum, n_kept)
        ctx.options = (kernels, vocab_start, vocab_size, label_smoothing, ignore_index, reduction,
                       inplace_backward)
        if reduction == "mean":
            return loss.sum() / n_kept
        return loss.sum() if reduction == "sum" else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, targets, row_max, log_sum, n_kept = ctx.saved_tensors
        kernels, vocab_start, vocab_size, smoothing, ignore_index, reduction, inplace = ctx.options
        grad_row = grad_loss.to(row_max.dtype)
        if reduction == "mean":
            grad_row = grad_row / n_kept
        grad_row = grad_row.expand(targets.shape).contiguous()
        if kernels:
            from parallelkit.kernels.cross_entropy import cross_entropy_backward as local_grad
        else:
            local_grad = _grad_torch
        grad = local_grad(logits, targets, row_max, log_sum, grad_row, vocab_start, vocab_size,
                          smoothing, ignore_index, inplace=inplace)
        if inplace:
            torch.autograd.graph.increment_version(logits)  # a kernel's writes do not count
        return grad, None, None, None, None, None, None, None


def _stats_torch(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """The forward kernel's [4, T] statistics in torch (float32, or float64 for float64 logits)."""
    acc = _accumulation_dtype(logits.dtype)
    stats = torch.empty(4, logits.shape[0], dtype=acc, device=logits.device)
    for rows in _row_chunks(logits):
        x = logits[rows].to(acc)
        row_max = x.amax(dim=1)
        shift = torch.where(row_max == float("-inf"), 0.0, row_max)  # a row of -inf sums to 0
        local, owned = _local_targets(targets[rows], vocab_start, x.shape[1])
        target_logit = torch.where(owned, x.gather(1, local[:, None]).squeeze(1), 0.0)
        shifted = x - shift[:, None]
        shifted_sum = shifted.sum(dim=1)
        stats[:, rows] = torch.stack([row_max, shifted.exp_().sum(dim=1), target_logit,
                                      shifted_sum])
        del shifted  # before the next chunk allocates its own
    return stats


def _grad_torch(logits, targets, row_max, log_sum, grad_row, vocab_start, vocab_size,
                label_smoothing=0.0, ignore_index=-100, *, inplace=False) -> torch.Tensor:
    """The backward kernel's gradient in torch; the arguments are the kernel launcher's."""
    acc = row_max.dtype
    grad = logits if inplace else torch.empty_like(logits)
    for rows in _row_chunks(logits):
        if logits.dtype == acc:  # work in the output itself
            g = grad[rows] if inplace else grad[rows].copy_(logits[rows])
        else:
            g = logits[rows].to(acc)
        g.sub_(row_max[rows, None]).sub_(log_sum[rows, None]).exp_()
        local, owned = _local_targets(targets[rows], vocab_start, logits.shape[1])
        g.scatter_add_(1, local[:, None], owned.to(acc)[:, None] * (label_smoothing - 1.0))
        if label_smoothing:
            g.sub_(label_smoothing / vocab_size)
        ignored = targets[rows] == ignore_index
        g.mul_(grad_row[rows, None]).masked_fill_(ignored[:, None], 0.0)  # 0 even for inf x
        if logits.dtype != acc:
            grad[rows] = g
    return grad


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    """Row ranges of about TORCH_CHUNK_ELEMENTS logits: the torch path's temporaries stay within
    64 MB (float32) whatever [T, V_local] is, as the kernels' stay within registers."""
    step = max(1, TORCH_CHUNK_ELEMENTS // logits.shape[1])
    return [slice(i, i + step) for i in range(0, logits.shape[0], step)]


def _local_targets(targets: torch.Tensor, vocab_start: int, n_local: int):
    """Targets as columns of this slice (clamped into it) and whether this slice holds them."""
    local = targets - vocab_start
    owned = (local >= 0) & (local < n_local)
    return local.clamp(0, n_local - 1), owned


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_options(label_smoothing: float, reduction: str) -> None:
    """The option errors, shared with the module so that it can fail at construction."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1): 0 turns "
                         "smoothing off, and at 1 the target would carry no weight")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float,
                  reduction: str) -> None:
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point [..., V_local], got {logits.dtype}; "
                        "pass the LM head's output (e.g. logits.float())")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class ids, got {targets.dtype}; "
                        "pass targets.long()")
    if logits.device != targets.device:
        raise ValueError(f"logits are on {logits.device} but targets on {targets.device}; "
                         f"move targets with targets.to({str(logits.device)!r})")
    if logits.dim() == 0 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits [..., V_local] must have the targets' shape "
                         f"{tuple(targets.shape)} as leading dims (class dim last), got logits "
                         f"{tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary slice (last dim 0)")
    validate_options(label_smoothing, reduction)


def _check_vocab_sizes(group: dist.ProcessGroup, n_local: int, given: Sequence[int]) -> None:
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(given) != tp or given[rank] != n_local:
        raise ValueError(f"vocab_sizes={list(given)} must list the {tp} TP ranks' slice sizes in "
                         f"rank order, but this rank ({rank}) holds {n_local} columns")


def _check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int,
                   vocab_sizes: Sequence[int]) -> None:
    """Out-of-range ids would silently count as 'on another rank': refuse them. Raised before any
    collective, so every TP rank (holding the same targets) raises instead of hanging."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    tp = len(vocab_sizes)
    slices = (f"V_local {vocab_sizes[0]} x tp {tp}" if len(set(vocab_sizes)) == 1 else
              f"slices of {', '.join(map(str, vocab_sizes))} over tp {tp}")
    message = (f"targets must be class ids in [0, {vocab_size}) ({slices}) or "
               f"ignore_index={ignore_index}")
    # No host sync on the GPU, nor a data-dependent branch in a compiled graph: the check fails
    # the stream (or the compiled step) instead.
    if targets.is_cuda or comm.compiling():
        torch._assert_async(~bad.any(), message)
    elif bad.any():
        where = int(bad.nonzero()[0])
        raise IndexError(f"{message}; got {int(targets[where])} at flattened position {where}: "
                         "check the vocabulary size (pad it to a multiple of tp) and ignore_index")

"""Softmax cross-entropy over one rank's slice of the vocabulary: the two Triton kernels.

A rank's logits are ``[T, V_local]``: columns ``[vocab_start, vocab_start + V_local)`` of the full
vocabulary. The forward kernel reads them once and writes four numbers per row, which combine
over the ranks with one max and one sum all-reduce (``parallelkit.ops.cross_entropy`` does that;
a kernel never sees a group). The backward kernel turns the combined log-sum-exp into this rank's
slice of the gradient, optionally over the logits themselves.

Statistics are float32 whatever the logits' dtype (float32, bfloat16 or float16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parallelkit.kernels._launch import cuda_options

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows of the buffer cross_entropy_stats_forward returns.
ROW_MAX, SUM_EXP, TARGET_LOGIT, SHIFTED_SUM = range(4)


@triton.jit
def _cross_entropy_stats_kernel(logits_ptr, targets_ptr, stats_ptr, n_rows, n_cols, stride_row,
                                vocab_start, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row  # T * V can pass 2**31
    run_max = tl.full((ROWS,), float("-inf"), tl.float32)
    run_sum = tl.zeros((ROWS,), tl.float32)  # Σ exp(x - shift)
    run_shifted = tl.zeros((ROWS,), tl.float32)  # Σ (x - shift)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        # shift = the max so far; a row that has met only -inf shifts by 0 instead, so that exp
        # and the differences never meet -inf - (-inf).
        old_shift = tl.where(run_max == float("-inf"), 0.0, run_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        # Online softmax: a new max rescales Σexp by a factor ...
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        # ... and moves Σ(x - shift) by an addend. Summing x - max rather than x keeps label
        # smoothing's Σx/V exact for logits far from 0 (1e4 + N(0, 1) in float32).
        run_shifted += start * (old_shift - shift) + tl.sum(
            tl.where(mask, x - shift[:, None], 0.0), axis=1)
        run_max = new_max
    # One load per row for the target; ids outside this slice (ignore_index too) give 0.
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1) - vocab_start
    owned = row_ok & (target >= 0) & (target < n_cols)
    target_logit = tl.load(row_ptr + target, mask=owned, other=0.0).to(tl.float32)
    tl.store(stats_ptr + rows, run_max, mask=row_ok)
    tl.store(stats_ptr + n_rows + rows, run_sum, mask=row_ok)
    tl.store(stats_ptr + 2 * n_rows + rows, target_logit, mask=row_ok)
    tl.store(stats_ptr + 3 * n_rows + rows, run_shifted, mask=row_ok)


@triton.jit
def _cross_entropy_backward_kernel(logits_ptr, grad_ptr, targets_ptr, row_max_ptr, log_sum_ptr,
                                   grad_row_ptr, n_rows, n_cols, stride_logits, stride_grad,
                                   vocab_start, ignore_index, target_weight, uniform_weight,
                                   ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    x_row = logits_ptr + rows.to(tl.int64) * stride_logits
    g_row = grad_ptr + rows.to(tl.int64) * stride_grad
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    keep = target != ignore_index
    local_target = target - vocab_start
    row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    log_sum = tl.load(log_sum_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(grad_row_ptr + rows, mask=row_ok, other=0.0)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_row[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        # lse = max + log_sum kept in two parts: x - max is exact for logits far from 0 (1e4 in
        # float32), where x - lse would round away the probabilities' low bits.
        p = tl.exp((x - row_max[:, None]) - log_sum[:, None])
        hit = cols[None, :] == local_target[:, None]
        d = p - uniform_weight - tl.where(hit, target_weight, 0.0)
        # where, not a multiply by 0: an ignored row may hold inf/nan (padding) and must give 0.
        grad = tl.where(keep[:, None], d * scale[:, None], 0.0)
        # In place (grad_ptr == logits_ptr) is safe: each element is read before this program
        # writes it, and no other program touches the row.
        tl.store(g_row[:, None] + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)


def cross_entropy_stats_forward(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int = 0,
                                *, out: torch.Tensor | None = None,
                                block_v: int | None = None) -> torch.Tensor:
    """Per-row statistics of this rank's logits, from one read of them.

    Args:
        logits: [T, V_local] float32/bfloat16/float16, last dim contiguous: columns
            [vocab_start, vocab_start + V_local) of the full vocabulary.
        targets: [T] int64 global class ids; one outside this slice (ignore_index included)
            has no target logit here.
        out: optional [4, T] float32 contiguous buffer to write into.
        block_v: vocabulary columns per loop step (a power of 2; default by device).

    Returns:
        stats: [4, T] float32, rows ``ROW_MAX`` m = max x, ``SUM_EXP`` Σ exp(x - m),
        ``TARGET_LOGIT`` x[target - vocab_start] or 0, ``SHIFTED_SUM`` Σ (x - m). A row of only
        -inf has m = -inf, Σexp = 0 and Σ(x - m) = -inf.
    """
    n_rows, n_cols = _check_logits(logits, targets)
    if out is None:
        out = torch.empty(4, n_rows, dtype=torch.float32, device=logits.device)
    elif out.shape != (4, n_rows) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [4, {n_rows}] tensor, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if n_rows:
        rows, block_v, options = _launch_config(n_rows, n_cols, logits.device, block_v)
        _cross_entropy_stats_kernel[(triton.cdiv(n_rows, rows),)](
            logits, targets, out, n_rows, n_cols, logits.stride(0), vocab_start,
            ROWS=rows, BLOCK_V=block_v, **options)
    return out


def cross_entropy_backward(logits: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor,
                           log_sum: torch.Tensor, grad_row: torch.Tensor, vocab_start: int,
                           vocab_size: int, label_smoothing: float = 0.0, ignore_index: int = -100,
                           *, inplace: bool = False, out: torch.Tensor | None = None,
                           block_v: int | None = None) -> torch.Tensor:
    """This rank's slice of d loss / d logits.

        grad[t, v] = (softmax(x)[t, v] - (1-ε)·[v = target_t] - ε/vocab_size) · grad_row[t]

    with softmax over the full vocabulary, whose log-sum-exp per row is ``row_max + log_sum``;
    rows whose target is ``ignore_index`` get 0.

    Args:
        logits: [T, V_local] as for :func:`cross_entropy_stats_forward`.
        targets: [T] int64 global class ids or ignore_index.
        row_max, log_sum: [T] float32, the global max and log Σ exp(x - max) of each row.
        grad_row: [T] float32, d loss / d loss_row (1/n for 'mean', the upstream grad for 'none').
        vocab_size: V_total, the full vocabulary.
        inplace: write the gradient over ``logits`` and return it (no second [T, V_local] tensor).
        out: optional [T, V_local] buffer of logits' dtype, last dim contiguous (not with inplace).

    Returns:
        grad: [T, V_local], logits' dtype.
    """
    n_rows, n_cols = _check_logits(logits, targets)
    for name, t in (("row_max", row_max), ("log_sum", log_sum), ("grad_row", grad_row)):
        if t.shape != (n_rows,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [{n_rows}] tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if inplace and out is not None:
        raise ValueError("pass either inplace=True or out, not both")
    grad = logits if inplace else out if out is not None else torch.empty_like(logits)
    if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.stride(-1) != 1:
        raise ValueError(f"out must be a {logits.dtype} {tuple(logits.shape)} tensor with a "
                         f"contiguous last dim, got {grad.dtype} {tuple(grad.shape)}")
    if n_rows:
        rows, block_v, options = _launch_config(n_rows, n_cols, logits.device, block_v)
        _cross_entropy_backward_kernel[(triton.cdiv(n_rows, rows),)](
            logits, grad, targets, row_max, log_sum, grad_row, n_rows, n_cols, logits.stride(0),
            grad.stride(0), vocab_start, ignore_index, 1.0 - label_smoothing,
            label_smoothing / vocab_size, ROWS=rows, BLOCK_V=block_v, **options)
    return grad


def _check_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    if logits.dim() != 2 or logits.dtype not in KERNEL_DTYPES or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [T, V_local] float32/bfloat16/float16 with a contiguous "
                         f"last dim, got {logits.dtype} {tuple(logits.shape)} with strides "
                         f"{logits.stride()}")
    if targets.shape != logits.shape[:1] or targets.dtype != torch.int64 or targets.stride(0) != 1:
        raise ValueError(f"targets must be a contiguous int64 [{logits.shape[0]}] tensor, got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    return logits.shape


def _launch_config(n_rows: int, n_cols: int, device: torch.device,
                   block_v: int | None) -> tuple[int, int, dict]:
    """(rows per program, BLOCK_V, launch options).

    On a GPU one program per row streams the vocabulary in blocks of up to 4096 columns. In the
    interpreter (CPU tensors) each program costs milliseconds of Python, so a program takes as
    many rows as fit a ~64k-element tile instead.
    """
    if block_v is None:
        block_v = min(triton.next_power_of_2(n_cols), 4096 if device.type == "cuda" else 2048)
    if device.type == "cuda":
        return 1, block_v, cuda_options(8 if block_v >= 2048 else 4)
    return min(triton.next_power_of_2(n_rows), max(1, 2**16 // block_v)), block_v, {}

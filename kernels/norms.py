"""Triton kernels of LayerNorm and RMSNorm over rows whose hidden dim may be split across ranks.

Each rank holds ``[T, N]`` with ``N = H/tp`` columns of every row. A row's statistics need all H,
so the forward is two kernels around a collective the caller issues (this module never sees a
group), and the backward likewise; with the whole row local (tp=1) one kernel does each direction:

    forward   _norm_stats_kernel   s = x (+ residual); per-row partials over the N local columns:
                                   LayerNorm (mean, M2 = sum (s - mean)^2), RMSNorm sum s^2
              (caller)             combine the ranks' partials into the row's mean and rstd
              _norm_apply_kernel   y = (s - mean) * rstd * w + b,  or  s * rstd * w
              tp=1: _norm_apply_kernel computes the statistics itself, one read of the row
    backward  _norm_backward_sums_kernel   per-row sum g and sum g*xhat over the local columns,
                                           g = dy * w (RMSNorm: sum g*xhat only)
              (caller)             all-reduce the sums
              _norm_backward_kernel        dx = rstd (g - sum_g/H - xhat sum_gxhat/H)
                                   (RMSNorm: rstd (g - xhat sum_gxhat/H)) + the residual stream's
                                   gradient; dw, db partials over the rows each program handles
              tp=1: _norm_backward_kernel computes the sums itself, one read of the row

LayerNorm partials are a mean and M2 rather than sum s and sum s^2: for a row like 1e4 + noise,
sum s^2 - (sum s)^2 / n cancels catastrophically in float32, while M2 is a sum of small squares
(merged across column blocks and ranks with Chan's parallel formula).

The weight and bias gradients are reduced in the dx kernel, not the sums kernel: there a program
owns a column block and a set of rows, so it accumulates them in registers however many blocks a
row has. Statistics are float32 for float16/bfloat16/float32 inputs and float64 for float64.
Inputs are 2-D and contiguous; ``parallelkit.ops.norms`` flattens leading dims.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from parallelkit.kernels._launch import cuda_options

_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics (and of dw/db before the caller casts them) for inputs of
    ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- row helpers shared by the kernels ------------------------------------------------------

@triton.jit
def _tile(rows, cols, n_rows, n_cols):
    """Offsets and mask of the [BLOCK_M, BLOCK_N] tile at rows x cols of a [n_rows, n_cols]
    row-major tensor (int64 offsets: T * N may pass 2^31)."""
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return offsets, (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


@triton.jit
def _load_input(x_ptr, residual_ptr, s_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr,
                ACC: tl.constexpr):
    """s = x, or x + residual rounded to x's dtype (as eager would) and stored as the new
    residual stream; returned in ACC."""
    s = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        s = (s.to(ACC) + r.to(ACC)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offsets, s, mask=mask)
    return s.to(ACC)


@triton.jit
def _moments(s, mask, count):
    """Mean and M2 of each row's ``count`` valid elements, two passes over registers."""
    mean = tl.sum(s, 1) / count
    centered = tl.where(mask, s - mean[:, None], 0.0)
    return mean, tl.sum(centered * centered, 1)


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """(count, mean, M2) of the union of two disjoint sets (Chan, Golub & LeVeque)."""
    count = count_a + count_b
    delta = mean_b - mean_a
    share = count_b / count
    return count, mean_a + delta * share, m2_a + m2_b + delta * delta * count_a * share


@triton.jit
def _load_row_stats(mean_ptr, rstd_ptr, rows, n_rows, IS_RMS: tl.constexpr):
    rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
    if IS_RMS:
        mean = tl.zeros_like(rstd)  # RMSNorm has none; _normalize ignores it
    else:
        mean = tl.load(mean_ptr + rows, mask=rows < n_rows, other=0.0)
    return mean, rstd


@triton.jit
def _normalize(s, mean, rstd, IS_RMS: tl.constexpr):
    if IS_RMS:
        xhat = s * rstd[:, None]
    else:
        xhat = (s - mean[:, None]) * rstd[:, None]
    return xhat


@triton.jit
def _load_grad_tile(s_ptr, dy_ptr, w_ptr, mean, rstd, rows, cols, n_rows, n_cols,
                    HAS_WEIGHT: tl.constexpr, IS_RMS: tl.constexpr, ACC: tl.constexpr):
    """xhat, dy and g = dy * w of one tile, from the saved input and its row statistics."""
    offsets, mask = _tile(rows, cols, n_rows, n_cols)
    xhat = _normalize(tl.load(s_ptr + offsets, mask=mask, other=0.0).to(ACC), mean, rstd, IS_RMS)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    return offsets, mask, xhat, dy, g


@triton.jit
def _store_row_pair(ptr, rows, n_rows, first, second, ONLY_SECOND: tl.constexpr):
    """Row-wise values as a [2, n_rows] tensor, or [1, n_rows] holding ``second`` alone."""
    if ONLY_SECOND:
        tl.store(ptr + rows, second, mask=rows < n_rows)
    else:
        tl.store(ptr + rows, first, mask=rows < n_rows)
        tl.store(ptr + n_rows + rows, second, mask=rows < n_rows)


# --- kernels ---------------------------------------------------------------------------------

@triton.jit
def _norm_stats_kernel(x_ptr, residual_ptr, s_ptr, stats_ptr, n_rows, n_cols,
                       HAS_RESIDUAL: tl.constexpr, IS_RMS: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    count = tl.zeros([BLOCK_M], dtype=ACC)  # float64 inputs need the shares below in float64
    mean = tl.zeros([BLOCK_M], dtype=ACC)
    m2 = tl.zeros([BLOCK_M], dtype=ACC)  # RMSNorm: the sum of squares
    for start in range(0, n_cols, BLOCK_N):
        offsets, mask = _tile(rows, start + tl.arange(0, BLOCK_N), n_rows, n_cols)
        s = _load_input(x_ptr, residual_ptr, s_ptr, offsets, mask, HAS_RESIDUAL, ACC)
        if IS_RMS:
            m2 += tl.sum(s * s, 1)
        else:
            block_count = tl.minimum(n_cols - start, BLOCK_N).to(ACC)
            block_mean, block_m2 = _moments(s, mask, block_count)
            count, mean, m2 = _chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    _store_row_pair(stats_ptr, rows, n_rows, mean, m2, IS_RMS)


@triton.jit
def _norm_apply_kernel(x_ptr, residual_ptr, s_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                       n_rows, n_cols, eps: tl.float64,
                       STATS_GIVEN: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets, mask = _tile(rows, cols, n_rows, n_cols)
    s = _load_input(x_ptr, residual_ptr, s_ptr, offsets, mask, HAS_RESIDUAL, ACC)
    if STATS_GIVEN:
        mean, rstd = _load_row_stats(mean_ptr, rstd_ptr, rows, n_rows, IS_RMS)
    else:  # the whole row is in this tile (BLOCK_N >= n_cols)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=ACC)
            var = tl.sum(s * s, 1) / n_cols
        else:
            mean, m2 = _moments(s, mask, n_cols)
            var = m2 / n_cols
            tl.store(mean_ptr + rows, mean, mask=rows < n_rows)
        rstd = 1.0 / tl.sqrt((var + eps).to(ACC))
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    y = _normalize(s, mean, rstd, IS_RMS)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_sums_kernel(s_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, sums_ptr,
                               n_rows, n_cols, HAS_WEIGHT: tl.constexpr, IS_RMS: tl.constexpr,
                               ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mean, rstd = _load_row_stats(mean_ptr, rstd_ptr, rows, n_rows, IS_RMS)
    sum_g = tl.zeros([BLOCK_M], dtype=ACC)
    sum_gxhat = tl.zeros([BLOCK_M], dtype=ACC)
    for start in range(0, n_cols, BLOCK_N):
        _, _, xhat, _, g = _load_grad_tile(s_ptr, dy_ptr, w_ptr, mean, rstd, rows,
                                           start + tl.arange(0, BLOCK_N), n_rows, n_cols,
                                           HAS_WEIGHT, IS_RMS, ACC)
        sum_g += tl.sum(g, 1)
        sum_gxhat += tl.sum(g * xhat, 1)
    _store_row_pair(sums_ptr, rows, n_rows, sum_g, sum_gxhat, IS_RMS)


@triton.jit
def _norm_backward_kernel(s_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, sums_ptr, ds_ptr, dx_ptr,
                          dw_ptr, db_ptr, n_rows, n_cols, n_full,
                          SUMS_GIVEN: tl.constexpr, HAS_RESIDUAL_GRAD: tl.constexpr,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    # Persistent over row tiles: few programs, so few [programs, N] weight-gradient partials.
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mean, rstd = _load_row_stats(mean_ptr, rstd_ptr, rows, n_rows, IS_RMS)
        offsets, mask, xhat, dy, g = _load_grad_tile(s_ptr, dy_ptr, w_ptr, mean, rstd, rows,
                                                     cols, n_rows, n_cols, HAS_WEIGHT, IS_RMS, ACC)
        if SUMS_GIVEN:
            if IS_RMS:
                sum_g = tl.zeros([BLOCK_M], dtype=ACC)
                sum_gxhat = tl.load(sums_ptr + rows, mask=rows < n_rows, other=0.0)
            else:
                sum_g = tl.load(sums_ptr + rows, mask=rows < n_rows, other=0.0)
                sum_gxhat = tl.load(sums_ptr + n_rows + rows, mask=rows < n_rows, other=0.0)
        else:  # the whole row is in this tile
            sum_g = tl.sum(g, 1)
            sum_gxhat = tl.sum(g * xhat, 1)
        dx = g - xhat * (sum_gxhat / n_full)[:, None]
        if not IS_RMS:
            dx -= (sum_g / n_full)[:, None]
        dx *= rstd[:, None]
        if HAS_RESIDUAL_GRAD:  # the new residual stream's own gradient flows into x and residual
            dx += tl.load(ds_ptr + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    partial = tl.program_id(0).to(tl.int64) * n_cols + cols
    if HAS_WEIGHT:
        tl.store(dw_ptr + partial, dw, mask=cols < n_cols)
    if HAS_BIAS:
        tl.store(db_ptr + partial, db, mask=cols < n_cols)


# --- launchers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class NormBlocks:
    """How a launch tiles ``[T, N]``: ``block_m`` rows x ``block_n`` columns per tile (powers of
    two), ``programs`` row-programs of the backward (its weight-gradient partials)."""

    block_m: int
    block_n: int
    programs: int
    num_warps: int

    def fits(self, n_cols: int) -> bool:
        return self.block_n >= n_cols


def norm_blocks(n_rows: int, n_cols: int, device, max_block_n: int | None = None,
                max_tile: int | None = None, dtype: torch.dtype = torch.float32) -> NormBlocks:
    """The tiling for ``[n_rows, n_cols]`` of ``dtype`` on ``device``: rows up to
    ``max_block_n`` columns are one block (one read on the fused paths); a tile holds at most
    ``max_tile`` elements.

    On CUDA a tile is sized for registers: 8192 units over 16 warps, where an element costs 1
    unit (16 per thread), 2 in rows whose length is not a multiple of 16 (Triton cannot prove
    vector alignment and loads element by element, each with its own 64-bit address), and 4
    with float64 statistics (two registers a value). At 16 elements per thread the fused
    backward needs about the 128 registers a 512-thread block allows; unaligned fp16 rows and
    float64 spilt there. In the interpreter (CPU) big tiles mean few programs, which is what
    costs there."""
    cuda = torch.device(device).type == "cuda"
    cost = (4 if stats_dtype(dtype) == torch.float64 else 1) * (2 if n_cols % 16 else 1)
    max_block_n = max_block_n or (8192 // cost if cuda else 4096)
    max_tile = max_tile or (8192 // cost if cuda else 1 << 16)
    if max_block_n & (max_block_n - 1) or max_tile < max_block_n:
        raise ValueError(f"max_block_n={max_block_n} must be a power of two <= max_tile={max_tile}")
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), max_block_n)
    block_m = max(1, min(triton.next_power_of_2(max(n_rows, 1)), max_tile // block_n))
    column_blocks = triton.cdiv(n_cols, block_n)
    slots = 2 * _sm_count(torch.device(device)) if cuda else 2
    programs = max(1, min(triton.cdiv(n_rows, block_m), slots // column_blocks))
    load = block_m * block_n * cost
    num_warps = 16 if load >= 8192 else 8 if load >= 2048 else 4
    return NormBlocks(block_m, block_n, programs, num_warps)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_grid(n_rows, blocks):
    return (triton.cdiv(n_rows, blocks.block_m),)


def norm_stats_forward(x: torch.Tensor, residual: torch.Tensor | None = None, *, rms: bool,
                       blocks: NormBlocks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row partial statistics over this rank's columns.

    Args:
        x, residual: ``[T, N]`` contiguous, one dtype; residual may be None.
    Returns:
        s: ``x + residual`` ([T, N], x's dtype), or x itself without a residual.
        stats: LayerNorm ``[2, T]`` (mean, M2) over the N columns; RMSNorm ``[1, T]`` (sum s^2);
        in ``stats_dtype(x.dtype)``.
    """
    n_rows, n_cols = x.shape
    blocks = blocks or norm_blocks(n_rows, n_cols, x.device, dtype=x.dtype)
    s = x if residual is None else _empty(x.shape, x.dtype, x.device)
    stats = _empty((1 if rms else 2, n_rows), stats_dtype(x.dtype), x.device)
    if n_rows:
        _norm_stats_kernel[_rows_grid(n_rows, blocks)](
            x, x if residual is None else residual, s, stats, n_rows, n_cols,
            HAS_RESIDUAL=residual is not None, IS_RMS=rms, ACC=_ACC[x.dtype],
            BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, **cuda_options(blocks.num_warps))
    return s, stats


def _apply(x, residual, weight, bias, mean, rstd, eps, rms, blocks, stats_given):
    n_rows, n_cols = x.shape
    s = x if residual is None else _empty(x.shape, x.dtype, x.device)
    y = _empty(x.shape, x.dtype, x.device)
    if not stats_given:
        rstd = _empty((n_rows,), stats_dtype(x.dtype), x.device)
        mean = None if rms else _empty((n_rows,), rstd.dtype, x.device)
    if n_rows:
        grid = (triton.cdiv(n_rows, blocks.block_m), triton.cdiv(n_cols, blocks.block_n))
        _norm_apply_kernel[grid](
            x, x if residual is None else residual, s, _or(weight, x), _or(bias, x), y,
            _or(mean, rstd), rstd, n_rows, n_cols, eps, STATS_GIVEN=stats_given,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, IS_RMS=rms, ACC=_ACC[x.dtype],
            BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, **cuda_options(blocks.num_warps))
    return s, y, mean, rstd


def norm_apply_forward(s: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       mean: torch.Tensor | None, rstd: torch.Tensor, *, rms: bool,
                       blocks: NormBlocks | None = None) -> torch.Tensor:
    """y = (s - mean) * rstd * weight + bias (RMSNorm: s * rstd * weight), in s's dtype.

    Args:
        s: ``[T, N]``; weight, bias: ``[N]`` or None; mean (None for RMSNorm), rstd: ``[T]`` in
        ``stats_dtype(s.dtype)``, of the full row.
    """
    blocks = blocks or norm_blocks(*s.shape, s.device, dtype=s.dtype)
    return _apply(s, None, weight, bias, mean, rstd, 0.0, rms, blocks, stats_given=True)[1]


def fused_norm_forward(x: torch.Tensor, residual: torch.Tensor | None,
                       weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                       rms: bool, blocks: NormBlocks | None = None):
    """The whole norm of full rows (tp=1): one kernel, one read of each row when a row fits a
    block, else statistics then apply.

    Returns ``(s, y, mean, rstd)``: s as in :func:`norm_stats_forward`, y ``[T, N]`` in x's dtype,
    mean (None for RMSNorm) and rstd ``[T]`` in ``stats_dtype(x.dtype)``.
    """
    blocks = blocks or norm_blocks(*x.shape, x.device, dtype=x.dtype)
    if blocks.fits(x.shape[1]):
        return _apply(x, residual, weight, bias, None, None, eps, rms, blocks, stats_given=False)
    s, stats = norm_stats_forward(x, residual, rms=rms, blocks=blocks)
    mean, rstd = None if rms else stats[0], torch.rsqrt(stats[-1] / x.shape[1] + eps)
    return s, norm_apply_forward(s, weight, bias, mean, rstd, rms=rms, blocks=blocks), mean, rstd


def norm_sums_backward(s: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None,
                       mean: torch.Tensor | None, rstd: torch.Tensor, *, rms: bool,
                       blocks: NormBlocks | None = None) -> torch.Tensor:
    """Per-row partial sums over this rank's columns, g = dy * weight: LayerNorm ``[2, T]``
    (sum g, sum g*xhat), RMSNorm ``[1, T]`` (sum g*xhat); in ``stats_dtype(s.dtype)``.

    Args: s, dy ``[T, N]``; weight ``[N]`` or None; mean, rstd as from the forward.
    """
    n_rows, n_cols = s.shape
    blocks = blocks or norm_blocks(n_rows, n_cols, s.device, dtype=s.dtype)
    sums = _empty((1 if rms else 2, n_rows), rstd.dtype, s.device)
    if n_rows:
        _norm_backward_sums_kernel[_rows_grid(n_rows, blocks)](
            s, dy, _or(weight, s), _or(mean, rstd), rstd, sums, n_rows, n_cols,
            HAS_WEIGHT=weight is not None, IS_RMS=rms, ACC=_ACC[s.dtype],
            BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, **cuda_options(blocks.num_warps))
    return sums


def norm_dx_backward(s: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None,
                     mean: torch.Tensor | None, rstd: torch.Tensor, sums: torch.Tensor | None,
                     n_full: int, residual_grad: torch.Tensor | None = None, *, rms: bool,
                     has_bias: bool, blocks: NormBlocks | None = None):
    """dx of this rank's columns from the full row's sums, and this rank's dw, db.

    Args:
        sums: the all-reduced :func:`norm_sums_backward` of every rank; None: the kernel sums
            each row itself, which needs whole rows in one block (tp=1). n_full: H.
        residual_grad: ``[T, N]`` gradient of the new residual stream (fused residual), or None.
    Returns:
        dx ``[T, N]`` in s's dtype; dw, db ``[N]`` in ``stats_dtype(s.dtype)`` (None without a
        weight / without ``has_bias``).
    """
    n_rows, n_cols = s.shape
    blocks = blocks or norm_blocks(n_rows, n_cols, s.device, dtype=s.dtype)
    if sums is None and (n_full != n_cols or not blocks.fits(n_cols)):
        raise ValueError(f"norm_dx_backward without sums needs whole rows in one block: "
                         f"n_full={n_full}, {n_cols} columns, block_n={blocks.block_n}")
    dx = _empty(s.shape, s.dtype, s.device)
    partial = (blocks.programs, n_cols)
    dw = None if weight is None else _empty(partial, rstd.dtype, s.device)
    db = _empty(partial, rstd.dtype, s.device) if has_bias else None
    if n_rows:
        grid = (blocks.programs, 1 if sums is None else triton.cdiv(n_cols, blocks.block_n))
        _norm_backward_kernel[grid](
            s, dy, _or(weight, s), _or(mean, rstd), rstd, _or(sums, rstd),
            _or(residual_grad, s), dx, _or(dw, rstd), _or(db, rstd), n_rows, n_cols, n_full,
            SUMS_GIVEN=sums is not None, HAS_RESIDUAL_GRAD=residual_grad is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, IS_RMS=rms, ACC=_ACC[s.dtype],
            BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, **cuda_options(blocks.num_warps))
    else:
        dw, db = (None if t is None else t.zero_() for t in (dw, db))
    return dx, None if dw is None else dw.sum(0), None if db is None else db.sum(0)


def fused_norm_backward(s: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None,
                        mean: torch.Tensor | None, rstd: torch.Tensor,
                        residual_grad: torch.Tensor | None = None, *, rms: bool, has_bias: bool,
                        blocks: NormBlocks | None = None):
    """The whole backward of full rows (tp=1): one kernel when a row fits a block (the sums come
    from the same read), else sums then dx. Returns ``(dx, dw, db)`` as
    :func:`norm_dx_backward`."""
    n_cols = s.shape[1]
    blocks = blocks or norm_blocks(*s.shape, s.device, dtype=s.dtype)
    sums = None
    if not blocks.fits(n_cols):
        sums = norm_sums_backward(s, dy, weight, mean, rstd, rms=rms, blocks=blocks)
    return norm_dx_backward(s, dy, weight, mean, rstd, sums, n_cols, residual_grad, rms=rms,
                            has_bias=has_bias, blocks=blocks)


def _or(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor; the kernel's constexpr flag keeps it unread."""
    return placeholder if t is None else t

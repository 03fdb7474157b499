"""Flash attention over ONE block of keys, returning the log-sum-exp: the Triton kernels.

Ring attention sees the keys one block at a time. For each block it needs the softmax attention
over that block's keys alone plus the log-sum-exp of the scores, which the log-sum-exp merge
(``parallelkit.ops.attention_merge``) folds into the running result. The backward of one block
takes the FINAL out and lse (merged over all blocks), so that P = exp(s - lse) is this block's
slice of the full softmax and the block's dq, dk, dv are its exact share of the gradients.

Masks: query i of batch row b sees keys ``key_start[b, i] <= j < key_end[b, i]``, and key j is
seen by queries ``query_start[b, j] <= i < query_end[b, j]`` (``parallelkit.ops.attention_mask``
builds these ranges for causal blocks at global offsets and for packed documents). That one rule
covers the diagonal block, blocks entirely in the past, blocks entirely in the future (every row
masked: lse = -inf, out = 0), zigzag chunks and document boundaries. A program loops only over
the union of its rows' ranges: key (forward, dq) or query (dk/dv) tiles no row sees are never
loaded.

GQA: query head h reads kv head h // (H // Hkv). The dk/dv kernel loops over the query heads of
its kv head, so it writes each dk/dv element once (no atomics).

Numerics: scores are kept in log2 units (scale · log2(e) folded into one multiply) so the kernels
use exp2; every accumulator is float32. In Triton's interpreter (CPU tensors) 16-bit tl.dot is
wrong, so the tiles are upcast to float32 there; on a GPU, 16-bit inputs use the tensor-core dot
with float32 accumulation, and float32 inputs use IEEE float32 dots (Triton's default TF32 would
give up float32's accuracy).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from parallelkit.kernels._launch import ATTENTION_TILES, Tiles

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Larger head dims would need smaller tiles to fit registers/shared memory; untested, so refused.
MAX_HEAD_DIM = 128
_LOG2E = math.log2(math.e)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _load_ranges(start_ptr, end_ptr, idx, n):
    """[start, end) of rows idx of a range table (rows past n: an empty range)."""
    start = tl.load(start_ptr + idx, mask=idx < n, other=2147483647)
    end = tl.load(end_ptr + idx, mask=idx < n, other=0)
    return start, end


@triton.jit
def _load_tile(base, idx, n_rows, stride_row, dims, head_dim, DTYPE: tl.constexpr):
    """[len(idx), BLOCK_D] rows idx of a [n_rows, head_dim] matrix, zero outside it."""
    ptrs = base + idx[:, None].to(tl.int64) * stride_row + dims[None, :]  # S·H·D can pass 2**31
    mask = (idx[:, None] < n_rows) & (dims[None, :] < head_dim)
    return tl.load(ptrs, mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _store_tile(base, idx, n_rows, dims, head_dim, value):
    """Stores value into rows idx of a contiguous [n_rows, head_dim] matrix."""
    ptrs = base + idx[:, None].to(tl.int64) * head_dim + dims[None, :]
    tl.store(ptrs, value, mask=(idx[:, None] < n_rows) & (dims[None, :] < head_dim))


@triton.jit
def _load_row_stats(lse_ptr, delta_ptr, rows, seq_q):
    """(lse in log2 units, delta) of the given query rows. A row with lse = -inf (no visible key
    anywhere) gets +inf instead, so exp2(s - lse) = 0 and it contributes nothing."""
    lse = tl.load(lse_ptr + rows, mask=rows < seq_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # · log2(e)
    return lse, tl.load(delta_ptr + rows, mask=rows < seq_q, other=0.0)


@triton.jit
def _query_head(bh, n_heads, group_size):
    """(batch, query head, kv head) of the program index bh = b·H + h, int64 for the offsets.
    GQA: the group_size = H / Hkv consecutive query heads kv_h·group_size + g share kv head kv_h."""
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    return b, h, h // group_size


@triton.jit
def _loop_bounds(start, end, BLOCK: tl.constexpr):
    """[begin, end) of the tile loop over the union of the rows' non-empty ranges, begin rounded
    down to a whole tile; (0, 0) when every range is empty."""
    nonempty = end > start
    first = tl.min(tl.where(nonempty, start, 2147483647), axis=0)
    last = tl.max(tl.where(nonempty, end, 0), axis=0)
    return tl.where(last > 0, (first // BLOCK) * BLOCK, 0), last


@triton.jit
def _in_range(idx, start, end):
    """Mask of idx inside [start, end), broadcasting a row's range over idx."""
    return (idx >= start) & (idx < end)


@triton.jit
def _attention_block_forward_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, key_start_ptr, key_end_ptr,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_rb,
        n_heads, group_size, seq_q, seq_k, head_dim, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # One program: BLOCK_M queries of one (batch, head), streaming the keys they see.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h, kv_h = _query_head(bh, n_heads, group_size)
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, rows, seq_q, stride_qs, dims, head_dim,
                   DOT_DTYPE)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    key_start, key_end = _load_ranges(key_start_ptr + b * stride_rb, key_end_ptr + b * stride_rb,
                                      rows, seq_q)

    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # max score so far (log2 units)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)  # Σ exp2(s - run_max)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # Σ exp2(s - run_max) · v
    begin_n, end_n = _loop_bounds(key_start, key_end, BLOCK_N)
    for start_n in range(begin_n, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, seq_k, stride_ks, dims, head_dim, DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(_in_range(cols[None, :], key_start[:, None], key_end[:, None]), s,
                     float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        # A row that has seen only masked keys shifts by 0, never by -inf: -inf - -inf is NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp2(run_max - shift)
        p = tl.exp2(s - shift[:, None])
        run_sum = run_sum * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_base, cols, seq_k, stride_vs, dims, head_dim, DOT_DTYPE)
        acc = tl.dot(p.to(DOT_DTYPE), v, acc * alpha[:, None], input_precision=PRECISION)
        run_max = new_max

    seen = run_sum > 0  # False for rows with no visible key: out 0, lse -inf
    safe_sum = tl.where(seen, run_sum, 1.0)
    out = acc / safe_sum[:, None]
    # Back from log2 units to the natural log the merge and the backward use: · ln(2).
    lse = tl.where(seen, (run_max + tl.log2(safe_sum)) * 0.6931471805599453, float("-inf"))
    _store_tile(out_ptr + bh.to(tl.int64) * seq_q * head_dim, rows, seq_q, dims, head_dim, out)
    tl.store(lse_ptr + bh.to(tl.int64) * seq_q + rows, lse, mask=rows < seq_q)


@triton.jit
def _attention_block_backward_dq_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, key_start_ptr, key_end_ptr,
        query_start_ptr, query_end_ptr,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds, stride_rb, stride_cb,
        n_heads, group_size, seq_q, seq_k, head_dim, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # One program: dq of BLOCK_M queries of one (batch, head), streaming the keys they see.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h, kv_h = _query_head(bh, n_heads, group_size)
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, rows, seq_q, stride_qs, dims, head_dim,
                   DOT_DTYPE)
    dout = _load_tile(dout_ptr + b * stride_db + h * stride_dh, rows, seq_q, stride_ds, dims,
                      head_dim, DOT_DTYPE)
    lse, delta = _load_row_stats(lse_ptr + bh.to(tl.int64) * seq_q,
                                 delta_ptr + bh.to(tl.int64) * seq_q, rows, seq_q)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    key_start, key_end = _load_ranges(key_start_ptr + b * stride_rb, key_end_ptr + b * stride_rb,
                                      rows, seq_q)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    begin_n, end_n = _loop_bounds(key_start, key_end, BLOCK_N)
    for start_n in range(begin_n, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, seq_k, stride_ks, dims, head_dim, DOT_DTYPE)
        v = _load_tile(v_base, cols, seq_k, stride_vs, dims, head_dim, DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = _in_range(cols[None, :], key_start[:, None], key_end[:, None])
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)  # this block's slice of softmax
        dp = tl.dot(dout, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=PRECISION)
    _store_tile(dq_ptr + bh.to(tl.int64) * seq_q * head_dim, rows, seq_q, dims, head_dim,
                dq * scale)


@triton.jit
def _attention_block_backward_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, key_start_ptr,
        key_end_ptr, query_start_ptr, query_end_ptr,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds, stride_rb, stride_cb,
        n_heads, group_size, seq_q, seq_k, head_dim, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # One program: dk, dv of BLOCK_N keys of one (batch, kv head), streaming the queries that see
    # them, of every query head that reads this kv head. Scores are computed transposed
    # ([keys, queries]) so that both updates are plain dots with no transpose of P.
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    n_kv_heads = n_heads // group_size
    b = (bkv // n_kv_heads).to(tl.int64)
    kv_h = (bkv % n_kv_heads).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr + b * stride_kb + kv_h * stride_kh, cols, seq_k, stride_ks, dims,
                   head_dim, DOT_DTYPE)
    v = _load_tile(v_ptr + b * stride_vb + kv_h * stride_vh, cols, seq_k, stride_vs, dims,
                   head_dim, DOT_DTYPE)
    query_start, query_end = _load_ranges(query_start_ptr + b * stride_cb,
                                          query_end_ptr + b * stride_cb, cols, seq_k)
    begin_m, end_m = _loop_bounds(query_start, query_end, BLOCK_M)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for g in range(0, group_size):
        h = kv_h * group_size + g
        bh = b * n_heads + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        dout_base = dout_ptr + b * stride_db + h * stride_dh
        for start_m in range(begin_m, end_m, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(q_base, rows, seq_q, stride_qs, dims, head_dim, DOT_DTYPE)
            dout = _load_tile(dout_base, rows, seq_q, stride_ds, dims, head_dim, DOT_DTYPE)
            lse, delta = _load_row_stats(lse_ptr + bh * seq_q, delta_ptr + bh * seq_q, rows, seq_q)
            key_start, key_end = _load_ranges(key_start_ptr + b * stride_rb,
                                              key_end_ptr + b * stride_rb, rows, seq_q)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            visible = _in_range(cols[:, None], key_start[None, :], key_end[None, :])
            p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(DOT_DTYPE), dout, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(dout), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(DOT_DTYPE), q, dk, input_precision=PRECISION)
    out_base = bkv.to(tl.int64) * seq_k * head_dim
    _store_tile(dk_ptr + out_base, cols, seq_k, dims, head_dim, dk * scale)
    _store_tile(dv_ptr + out_base, cols, seq_k, dims, head_dim, dv)


def flash_attention_block_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor,
        key_end: torch.Tensor, *, scale: float | None = None, out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None, block_m: int | None = None,
        block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over this block of keys, and its log-sum-exp.

    Args:
        q: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D] with H % Hkv == 0; one dtype of KERNEL_DTYPES,
            last dim contiguous, D <= MAX_HEAD_DIM. Shapes are assumed consistent (the op
            ``parallelkit.ops.attention_block`` checks them).
        key_start, key_end: contiguous int32 [B or 1, Sq]: query i of batch row b sees keys
            key_start[b, i] <= j < key_end[b, i], 0 <= both <= Sk (see ``KeyRanges``).
        scale: score multiplier, default D ** -0.5.
        out, lse: optional contiguous float32 buffers [B, H, Sq, D] and [B, H, Sq] to write.
        block_m, block_n: query/key tile sizes (powers of 2, >= 16; default by device, kernel
            and dtype, see _launch_config).

    Returns:
        out: [B, H, Sq, D] float32, normalised over this block's visible keys (0 for a row with
        none); lse: [B, H, Sq] float32 log-sum-exp of the scaled scores (-inf for such a row).
    """
    batch, n_heads, seq_q, head_dim = q.shape
    n_kv_heads, seq_k = k.shape[1], k.shape[2]
    _check_kernel_inputs(q=q, k=k, v=v)
    stride_rb = _range_batch_stride(key_start, key_end, rows=seq_q, batch=batch)
    out = _output(out, "out", (batch, n_heads, seq_q, head_dim), q.device)
    lse = _output(lse, "lse", (batch, n_heads, seq_q), q.device)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    dots = _dot_options(q, k, v)
    tensor_cores = _tensor_core_dtype(q, k, v) is not None
    if out.numel():
        tiles = _launch_config("forward", q.device, tensor_cores, head_dim, seq_q, seq_k,
                               block_m, block_n)
        grid = (triton.cdiv(seq_q, tiles.block_m), batch * n_heads)
        _attention_block_forward_kernel[grid](
            q, k, v, out, lse, key_start, key_end, *_strides(q), *_strides(k), *_strides(v),
            stride_rb, n_heads, n_heads // n_kv_heads, seq_q, seq_k, head_dim, scale * _LOG2E,
            **tiles.meta(head_dim), **dots)
    return out, lse


def flash_attention_block_backward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        dout: torch.Tensor, lse: torch.Tensor, key_start: torch.Tensor, key_end: torch.Tensor,
        query_start: torch.Tensor, query_end: torch.Tensor, *, scale: float | None = None,
        dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
        dv: torch.Tensor | None = None, block_m: int | None = None,
        block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of the attention gradients, given the FINAL out and lse.

        P = exp(scale · q kᵀ - lse)   (masked: 0; lse = -inf rows: 0)
        dS = P ∘ (dout vᵀ - delta),  delta = Σ_d dout ∘ out
        dq = scale · dS k,  dk = scale · dSᵀ q,  dv = Pᵀ dout

    Args:
        q, k, v, key_start, key_end, scale: as for :func:`flash_attention_block_forward`.
        out: [B, H, Sq, D] float, the output merged over ALL key blocks (only delta reads it).
        dout: [B, H, Sq, D] one of KERNEL_DTYPES, last dim contiguous: d loss / d out.
        lse: [B, H, Sq] float32, the log-sum-exp merged over all key blocks.
        query_start, query_end: contiguous int32 [B or 1, Sk], the same mask seen from the keys:
            key j is seen by queries query_start[b, j] <= i < query_end[b, j].
        dq, dk, dv: optional contiguous float32 buffers [B, H, Sq, D], [B, Hkv, Sk, D] x2.

    Returns:
        dq: [B, H, Sq, D]; dk, dv: [B, Hkv, Sk, D] summed over the query heads of each kv head;
        all float32.
    """
    batch, n_heads, seq_q, head_dim = q.shape
    n_kv_heads, seq_k = k.shape[1], k.shape[2]
    _check_kernel_inputs(q=q, k=k, v=v, dout=dout)
    if lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32, got {lse.dtype}")
    stride_rb = _range_batch_stride(key_start, key_end, rows=seq_q, batch=batch)
    stride_cb = _range_batch_stride(query_start, query_end, rows=seq_k, batch=batch)
    lse = lse.contiguous()
    # Σ_d dout·out per row: O(Sq·D), negligible next to the O(Sq·Sk·D) kernels.
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    dq = _output(dq, "dq", (batch, n_heads, seq_q, head_dim), q.device)
    dk = _output(dk, "dk", (batch, n_kv_heads, seq_k, head_dim), q.device)
    dv = _output(dv, "dv", (batch, n_kv_heads, seq_k, head_dim), q.device)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    # The dq kernel reads only the key ranges and the dk/dv kernel both; one argument list.
    args = (key_start, key_end, query_start, query_end, *_strides(q), *_strides(k),
            *_strides(v), *_strides(dout), stride_rb, stride_cb, n_heads, n_heads // n_kv_heads,
            seq_q, seq_k, head_dim, scale * _LOG2E, scale)
    dots = _dot_options(q, k, v, dout)
    tensor_cores = _tensor_core_dtype(q, k, v, dout) is not None
    if dq.numel():
        tiles = _launch_config("dq", q.device, tensor_cores, head_dim, seq_q, seq_k, block_m,
                               block_n)
        _attention_block_backward_dq_kernel[(triton.cdiv(seq_q, tiles.block_m), batch * n_heads)](
            q, k, v, dout, lse, delta, dq, *args, **tiles.meta(head_dim), **dots)
    if dk.numel():
        tiles = _launch_config("dkdv", q.device, tensor_cores, head_dim, seq_q, seq_k, block_m,
                               block_n)
        _attention_block_backward_dkdv_kernel[(triton.cdiv(seq_k, tiles.block_n),
                                               batch * n_kv_heads)](
            q, k, v, dout, lse, delta, dk, dv, *args, **tiles.meta(head_dim), **dots)
    return dq, dk, dv


def _check_kernel_inputs(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in KERNEL_DTYPES or t.stride(-1) != 1:
            raise ValueError(f"{name} must be float32/bfloat16/float16 with a contiguous last dim, "
                             f"got {t.dtype} with strides {t.stride()}")
    head_dim = tensors["q"].shape[-1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is larger than the kernels' {MAX_HEAD_DIM}")


def _range_batch_stride(start: torch.Tensor, end: torch.Tensor, rows: int, batch: int) -> int:
    """The batch stride of a range table [B or 1, rows]: 0 when every batch row shares it."""
    if start.shape != end.shape:
        raise ValueError(f"a range's start and end tables differ in shape: {list(start.shape)} "
                         f"and {list(end.shape)}")
    for t in (start, end):
        if (t.dtype != torch.int32 or not t.is_contiguous() or t.dim() != 2
                or t.shape[1] != rows or t.shape[0] not in (1, batch)):
            raise ValueError(f"a range table must be a contiguous int32 [{batch} or 1, {rows}] "
                             f"tensor, got {t.dtype} {list(t.shape)}")
    return 0 if start.shape[0] == 1 else rows


def _output(buffer: torch.Tensor | None, name: str, shape: tuple, device) -> torch.Tensor:
    if buffer is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if buffer.shape != shape or buffer.dtype != torch.float32 or not buffer.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 {list(shape)} tensor, got "
                         f"{buffer.dtype} {list(buffer.shape)}")
    return buffer


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and sequence strides of a [B, H, S, D] tensor (D is contiguous)."""
    return t.stride(0), t.stride(1), t.stride(2)


def _tensor_core_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype all the inputs share, which a GPU's dots take on the tensor cores; None
    when any is float32 (or they differ): IEEE float32 dots on the FMA units."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 and torch.float32 not in dtypes else None


def _dot_options(*tensors: torch.Tensor) -> dict:
    """DOT_DTYPE, the tiles' dtype in the dots, and PRECISION, tl.dot's input_precision.

    The inputs' 16-bit dtype on a GPU when they all share it (tensor cores, float32
    accumulation); float32 otherwise, and always in the interpreter, where 16-bit tl.dot is
    wrong. Float32 dots are IEEE: Triton's default TF32 would round the inputs to 10 bits.
    """
    dtype = _tensor_core_dtype(*tensors)
    if tensors[0].is_cuda and dtype is not None:
        return {"DOT_DTYPE": _TL_DTYPES[dtype], "PRECISION": "tf32"}  # tf32: the default
    return {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}


def _launch_config(kernel: str, device: torch.device, tensor_cores: bool, head_dim: int,
                   seq_q: int, seq_k: int, block_m: int | None, block_n: int | None) -> Tiles:
    """The tiles of ``kernel`` ("forward", "dq" or "dkdv"); block_m/block_n override the sizes.

    On a GPU, ATTENTION_TILES. In the interpreter each program instance and each loop step costs
    Python time while a tile op is one numpy call, so tiles are as large as the sequence, up to
    128. (Tests call this with a CUDA device to run the GPU's tiles in the interpreter.)
    """
    if device.type == "cuda":
        tiles = ATTENTION_TILES[(kernel, tensor_cores, head_dim <= 64)]
        return Tiles(block_m or tiles.block_m, block_n or tiles.block_n, tiles.num_warps,
                     tiles.num_stages)
    return Tiles(block_m or min(128, max(16, triton.next_power_of_2(seq_q))),
                 block_n or min(128, max(16, triton.next_power_of_2(seq_k))))

"""Softmax attention over ONE block of keys, with its log-sum-exp, and that block's backward.

Ring attention holds the queries of its chunk of the sequence and receives the keys one block at
a time. For each block ``attention_block_forward`` gives the output normalised over that block's
keys and their log-sum-exp; ``merge_attention_partials_`` folds those into the attention over all
keys. After the ring, ``attention_block_backward`` of each block, given the FINAL (merged) out and
lse, gives that block's exact share of the gradients: dq summed over the blocks, and dk/dv of
each block's keys, equal the gradients of attention over all keys at once.

Masks: positions are global: ``q_offset``/``k_offset`` are the sequence positions of the first
query and first key, and with ``causal`` key j is visible to query i iff ``k_offset + j <=
q_offset + i``. Any other mask in which each query sees one contiguous range of keys (packed
documents: ``attention_mask.document_ranges``) is passed as ``ranges`` instead. A query row with
no visible key in the block gets lse = -inf and out = 0, which the merge skips.

Both run as the Triton kernels of ``parallelkit.kernels.flash_attention`` when
``parallelkit.ops._backend.use_triton`` says so and the inputs are float32/bfloat16/float16, and
as the same math in torch otherwise (CPU, float64); the torch path materialises the scores of
windows of 256 query rows against the keys they see, in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from parallelkit.ops._backend import use_triton
from parallelkit.ops.attention_mask import KeyRanges, offset_ranges

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)


def attention_block_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
        q_offset: int = 0, k_offset: int = 0, scale: float | None = None,
        ranges: KeyRanges | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of the queries over this block of keys.

    Args:
        q: [B, H, Sq, D] float32/bfloat16/float16/float64.
        k, v: [B, Hkv, Sk, D], q's dtype and device, H % Hkv == 0 (GQA: query head h reads kv
            head h // (H // Hkv)).
        causal: mask key j from query i unless k_offset + j <= q_offset + i.
        q_offset, k_offset: global sequence positions of q[:, :, 0] and k[:, :, 0].
        scale: score multiplier, default D ** -0.5.
        ranges: the mask as the keys each query sees (``KeyRanges`` of [B or 1, Sq] and
            [B or 1, Sk]), instead of causal and the offsets.

    Returns:
        out: [B, H, Sq, D] float32 (float64 for float64 inputs), normalised over this block's
            visible keys; 0 in rows with none.
        lse: [B, H, Sq] out's dtype, log-sum-exp of the scaled visible scores; -inf in rows
            with none. Merge blocks with ``merge_attention_partials_`` (start: out 0, lse -inf).
    """
    check_inputs(q, k, v)
    ranges = _ranges(q, k, causal, q_offset, k_offset, ranges)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _kernels(q):
        from parallelkit.kernels.flash_attention import flash_attention_block_forward
        return flash_attention_block_forward(
            *map(_last_dim_contiguous, (q, k, v)), ranges.key_start, ranges.key_end, scale=scale)
    return _forward_torch(q, k, v, ranges, scale)


def attention_block_backward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
        lse: torch.Tensor, *, causal: bool = False, q_offset: int = 0, k_offset: int = 0,
        scale: float | None = None,
        ranges: KeyRanges | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of the attention gradients (flash-attention backward of one block).

    With P = exp(scale · q kᵀ - lse) (this block's slice of the full softmax, 0 where masked),
    delta = Σ_d dout ∘ out, dS = P ∘ (dout vᵀ - delta):
    dq = scale · dS k, dk = scale · dSᵀ q, dv = Pᵀ dout.

    Args:
        q, k, v, causal, q_offset, k_offset, scale, ranges: as for
            :func:`attention_block_forward`.
        out: [B, H, Sq, D] float, the FINAL output merged over all key blocks.
        dout: [B, H, Sq, D] float, d loss / d out.
        lse: [B, H, Sq] float, the FINAL log-sum-exp merged over all key blocks; rows of -inf
            contribute nothing.

    Returns:
        dq: [B, H, Sq, D]; dk, dv: [B, Hkv, Sk, D], summed over the query heads that share each
        kv head. float32 (float64 for float64 inputs), so a ring can sum them over blocks.
    """
    check_inputs(q, k, v)
    _check_grad_inputs(q, out, dout, lse)
    ranges = _ranges(q, k, causal, q_offset, k_offset, ranges)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _kernels(q) and dout.dtype in _KERNEL_DTYPES:
        from parallelkit.kernels.flash_attention import flash_attention_block_backward
        return flash_attention_block_backward(
            *map(_last_dim_contiguous, (q, k, v)), out, _last_dim_contiguous(dout), lse.float(),
            ranges.key_start, ranges.key_end, ranges.query_start, ranges.query_end, scale=scale)
    return _backward_torch(q, k, v, out, dout, lse, ranges, scale)


def _ranges(q: torch.Tensor, k: torch.Tensor, causal: bool, q_offset: int, k_offset: int,
            ranges: KeyRanges | None) -> KeyRanges:
    """The mask as key ranges: the one given, or the causal/offset block's."""
    if ranges is None:
        return offset_ranges(q.shape[2], k.shape[2], causal, q_offset, k_offset, q.device)
    if causal or q_offset or k_offset:
        raise ValueError("pass the mask either as causal/q_offset/k_offset or as ranges, not both")
    batch, seq_q, seq_k = q.shape[0], q.shape[2], k.shape[2]
    for name, t, seq in (("key_start", ranges.key_start, seq_q), ("key_end", ranges.key_end, seq_q),
                         ("query_start", ranges.query_start, seq_k),
                         ("query_end", ranges.query_end, seq_k)):
        if (t.dim() != 2 or t.shape[0] not in (1, batch) or t.shape[1] != seq
                or t.device != q.device):
            raise ValueError(f"ranges.{name} must be [{batch} or 1, {seq}] on {q.device} for q "
                             f"{list(q.shape)} and k {list(k.shape)}, got {list(t.shape)} on "
                             f"{t.device}")
    return ranges


def _kernels(q: torch.Tensor) -> bool:
    if not (q.dtype in _KERNEL_DTYPES and use_triton(q)):
        return False
    from parallelkit.kernels.flash_attention import MAX_HEAD_DIM
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} exceeds the Triton kernels' maximum "
                         f"{MAX_HEAD_DIM}; use a head dim <= {MAX_HEAD_DIM}, or the torch path "
                         f"(PARALLELKIT_TRITON=0), which materialises the scores")
    return True


def _grouped(x: torch.Tensor, n_kv_heads: int, acc: torch.dtype) -> torch.Tensor:
    """[B, H, Sq, D] -> [B, Hkv, G·Sq, D]: the G query heads of a kv head stacked along the rows,
    so one matmul with k [B, Hkv, Sk, D] serves them all (and dSᵀ q sums over them)."""
    b, h, s, d = x.shape
    return x.to(acc).reshape(b, n_kv_heads, (h // n_kv_heads) * s, d)


# Query rows per window of the torch path: each window's scores cover only the keys its rows
# see, so masked work is skipped about as the kernels' tiles skip it.
_ROWS = 256


def _windows(ranges: KeyRanges) -> list[tuple[slice, slice]]:
    """(query rows, keys) of each window of _ROWS rows that sees any key."""
    first, last = ranges.row_windows(_ROWS)
    return [(slice(i * _ROWS, (i + 1) * _ROWS), slice(a, b))
            for i, (a, b) in enumerate(zip(first.tolist(), last.tolist())) if b > a]


def _scores(q, k, hidden, scale, acc):
    """Scaled scores [B, Hkv, G·Sq, Sk] in acc, -inf where ``hidden`` [B or 1, Sq, Sk]."""
    n_kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    s = scale * (_grouped(q, n_kv_heads, acc) @ k.to(acc).transpose(-1, -2))
    return s.masked_fill(hidden.repeat(1, group, 1).unsqueeze(1), float("-inf"))


def _forward_torch(q, k, v, ranges, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    for rows, keys in _windows(ranges):
        q_w = q[:, :, rows]
        s = _scores(q_w, k[:, :, keys], ~ranges.visible(rows, keys), scale, acc)
        lse_w = torch.logsumexp(s, dim=-1)
        # A row with no visible key shifts by 0, so its probabilities are exp(-inf) = 0, not NaN.
        p = torch.exp(s - torch.where(lse_w == float("-inf"), 0.0, lse_w).unsqueeze(-1))
        out[:, :, rows] = (p @ v[:, :, keys].to(acc)).view(q_w.shape)
        lse[:, :, rows] = lse_w.view(q_w.shape[:3])
    return out, lse


def _backward_torch(q, k, v, out, dout, lse, ranges, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_kv_heads = k.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(k.shape, dtype=acc, device=q.device)
    for rows, keys in _windows(ranges):
        q_w, k_w, v_w = q[:, :, rows], k[:, :, keys].to(acc), v[:, :, keys].to(acc)
        s = _scores(q_w, k_w, ~ranges.visible(rows, keys), scale, acc)
        lse_w = _grouped(lse[:, :, rows].unsqueeze(-1), n_kv_heads, acc)  # [B, Hkv, G·Sq, 1]
        # lse = -inf (no visible key anywhere) becomes +inf, so that row's P is exp(-inf) = 0.
        p = torch.exp(s - torch.where(lse_w == float("-inf"), float("inf"), lse_w))
        dout_g = _grouped(dout[:, :, rows], n_kv_heads, acc)
        delta = (dout_g * _grouped(out[:, :, rows], n_kv_heads, acc)).sum(-1, keepdim=True)
        ds = p * (dout_g @ v_w.transpose(-1, -2) - delta)
        dq[:, :, rows] = (scale * (ds @ k_w)).view(q_w.shape)
        dk[:, :, keys] += scale * (ds.transpose(-1, -2) @ _grouped(q_w, n_kv_heads, acc))
        dv[:, :, keys] += p.transpose(-1, -2) @ dout_g
    return dq, dk, dv


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, S, D], got shape {list(t.shape)}; "
                             f"reshape [B, S, heads, D] inputs with .transpose(1, 2)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Sk, D], got "
                         f"{list(k.shape)} and {list(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, H, Sq, D] = {list(q.shape)} and k [B, Hkv, Sk, D] = "
                         f"{list(k.shape)} must agree in B and D")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads H = {q.shape[1]} must be a multiple of kv heads "
                         f"Hkv = {k.shape[1]} (GQA); pass k, v with a divisor of H heads")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of float32/bfloat16/float16/float64, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}; cast them with .to(q.dtype)")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}; move them with .to(q.device)")


def _check_grad_inputs(q: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                       lse: torch.Tensor) -> None:
    for name, t, shape in (("out", out, q.shape), ("dout", dout, q.shape),
                           ("lse", lse, q.shape[:3])):
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (from q), got "
                             f"{list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")

"""Attention with any key-range mask on one device: the block kernels behind autograd.

``document_attention(q, k, v, ranges)`` is softmax attention in which query i sees the keys
``ranges`` give it (``ops.attention_mask``): packed documents, causally or not, without ever
materialising the [S, S] mask. It is Ulysses context parallelism's local attention over packed
documents, and ``packed_attention`` is the same for a packed batch on one rank (cp = 1).
"""

from __future__ import annotations

import torch

from parallelkit.ops.attention_block import attention_block_backward, attention_block_forward
from parallelkit.ops.attention_mask import KeyRanges, document_ranges


class DocumentAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ranges, scale):
        out, lse = attention_block_forward(q, k, v, ranges=ranges, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ranges, ctx.scale = ranges, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_block_backward(q, k, v, out, dout, lse, ranges=ctx.ranges,
                                              scale=ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: KeyRanges,
                       scale: float | None = None) -> torch.Tensor:
    """q [B, H, Sq, D], k, v [B, Hkv, Sk, D] (GQA), ``ranges`` the keys each query sees; returns
    [B, H, Sq, D] in q's dtype (0 for a query that sees no key)."""
    return DocumentAttentionFunction.apply(q, k, v, ranges, scale)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, causal: bool = True,
                     scale: float | None = None) -> torch.Tensor:
    """Attention within each document of a packed sequence on one rank: q [B, H, S, D],
    k, v [B, Hkv, S, D], ``cu_seqlens`` [0, ..., S] the documents' boundaries (every batch row
    alike)."""
    bounds = torch.as_tensor(cu_seqlens, device=q.device)
    if bounds.dim() != 1 or bounds[0] != 0 or bounds[-1] != q.shape[2] or bool(
            (bounds.diff() <= 0).any()):
        raise ValueError(f"cu_seqlens must increase strictly from 0 to the sequence length "
                         f"{q.shape[2]}, got {bounds.tolist()}")
    positions = torch.arange(q.shape[2], device=q.device)
    documents = torch.searchsorted(bounds, positions, right=True) - 1
    ranges = document_ranges(positions, positions, causal, documents, documents, check=False)
    return document_attention(q, k, v, ranges, scale)

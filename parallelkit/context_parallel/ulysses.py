"""All-to-all (Ulysses) context parallelism: trade the sequence split for a head split.

An all-to-all turns this rank's ``[b, heads, s/cp, d]`` into ``[b, heads/cp, s, d]``: every token,
a 1/cp of the heads. Attention then runs locally over the whole sequence (SDPA, or the block
kernels within documents for a packed sequence), and a second all-to-all restores the sequence
split. Two all-to-alls of the activations per direction, against cp ring steps of K/V: cheaper
when heads divide by cp and the network's all-to-all is fast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelkit.distributed import comm, mappings
from parallelkit.ops.attention_mask import document_ranges
from parallelkit.ops.document_attention import document_attention
from parallelkit.ops.ring_attention import check_context_parallel_inputs, check_split


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cp_group: dist.ProcessGroup, causal: bool = False, layout: str = "zigzag",
                      scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``ring_attention`` (packed documents included): q ``[b, heads, s/cp,
    d]``, k/v ``[b, kv_heads, s/cp, d]`` in ``layout`` order → ``[b, heads, s/cp, d]``. Needs
    heads divisible by cp; K/V heads that do not divide by cp are repeated up to ``heads``
    first."""
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    heads, kv_heads = q.shape[1], k.shape[1]

    def local_checks():
        if heads % cp:
            raise ValueError(f"Ulysses attention splits the {heads} heads across cp={cp} ranks: "
                             f"heads must be divisible by cp; use ring attention instead")
        if heads % kv_heads:
            raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
        return check_split(cu_seqlens, cp, layout, q.shape[2], position_ids, rank, q.device)

    # Unequal shapes would abort the all-to-alls: every rank checks, and raises, together.
    packed = check_context_parallel_inputs("ulysses_attention", cp_group, q, k, v, causal,
                                           layout, scale, local_checks, cu_seqlens)
    if kv_heads % cp:
        k, v = (t.repeat_interleave(heads // kv_heads, 1) for t in (k, v))
    # After the all-to-all the sequence is every rank's tokens in rank order: gathered[i] is
    # packed token order[i]; natural order is gathered[argsort(order)].
    order = torch.cat([packed.token_index(r, q.device) for r in range(cp)])
    natural = torch.argsort(order)

    def to_heads(t):  # [b, h, s/cp, d] -> [b, h/cp, s, d] in packed order
        return mappings.all_to_all(t, 1, 2, cp_group).index_select(2, natural)

    with comm.entry_checked():
        q_h, k_h, v_h = to_heads(q), to_heads(k), to_heads(v)
        if cu_seqlens is None:
            out = F.scaled_dot_product_attention(q_h, k_h, v_h, is_causal=causal, scale=scale,
                                                 enable_gqa=k_h.shape[1] != q_h.shape[1])
        else:
            positions = torch.arange(packed.total, device=q.device)
            documents = torch.cat([packed.documents(r, q.device) for r in range(cp)])[natural]
            ranges = document_ranges(positions, positions, causal, documents, documents,
                                     check=False)
            out = document_attention(q_h, k_h, v_h, ranges, scale)
        return mappings.all_to_all(out.index_select(2, order), 2, 1, cp_group)

"""All-to-all (Ulysses) context parallelism: trade the sequence split for a head split.

An all-to-all turns this rank's ``[b, heads, s/cp, d]`` into ``[b, heads/cp, s, d]``: every token,
a 1/cp of the heads. Attention then runs locally over the whole sequence, and a second all-to-all
restores the sequence split. Two all-to-alls of the activations per direction, against cp ring
steps of K/V: cheaper when heads divide by cp and the network's all-to-all is fast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelkit.distributed.context_layout import check_sequence_length, chunk_ids, parts
from parallelkit.distributed import comm, mappings
from parallelkit.ops.ring_attention import check_context_parallel_inputs


def _natural_order(layout: str, cp: int) -> list[int]:
    """Chunk order after gathering each rank's chunks in rank order, as a permutation that
    puts them back in sequence order."""
    gathered = [c for rank in range(cp) for c in chunk_ids(layout, rank, cp)]
    return [gathered.index(c) for c in range(parts(layout, cp))]


def _reorder(x: torch.Tensor, order: list[int], dim: int) -> torch.Tensor:
    chunks = x.chunk(len(order), dim)
    return torch.cat([chunks[i] for i in order], dim)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cp_group: dist.ProcessGroup, causal: bool = False, layout: str = "zigzag",
                      scale: float | None = None) -> torch.Tensor:
    """Same contract as ``ring_attention``: q ``[b, heads, s/cp, d]``, k/v ``[b, kv_heads, s/cp,
    d]`` in ``layout`` order → ``[b, heads, s/cp, d]``. Needs heads divisible by cp; K/V heads
    that do not divide by cp are repeated up to ``heads`` first."""
    cp = dist.get_world_size(cp_group)
    heads, kv_heads = q.shape[1], k.shape[1]

    def local_checks():
        check_sequence_length(q.shape[2] * cp, layout, cp)
        if heads % cp:
            raise ValueError(f"Ulysses attention splits the {heads} heads across cp={cp} ranks: "
                             f"heads must be divisible by cp; use ring attention instead")
        if heads % kv_heads:
            raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")

    # Unequal shapes would abort the all-to-alls: every rank checks, and raises, together.
    check_context_parallel_inputs("ulysses_attention", cp_group, q, k, v, causal, layout, scale,
                                  local_checks)
    if kv_heads % cp:
        k, v = (t.repeat_interleave(heads // kv_heads, 1) for t in (k, v))
    order = _natural_order(layout, cp)
    inverse = sorted(range(len(order)), key=order.__getitem__)

    def to_heads(t):  # [b, h, s/cp, d] -> [b, h/cp, s, d] in sequence order
        return _reorder(mappings.all_to_all(t, 1, 2, cp_group), order, 2)

    with comm.entry_checked():
        q_h, k_h, v_h = to_heads(q), to_heads(k), to_heads(v)
        out = F.scaled_dot_product_attention(q_h, k_h, v_h, is_causal=causal, scale=scale,
                                             enable_gqa=k_h.shape[1] != q_h.shape[1])
        return mappings.all_to_all(_reorder(out, inverse, 2), 2, 1, cp_group)

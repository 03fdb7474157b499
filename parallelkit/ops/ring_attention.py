"""Ring attention: exact attention over a sequence split across the context-parallel group.

Each CP rank holds its queries and its keys/values (see ``distributed/context_layout.py`` for which
tokens). For cp steps it attends its queries to the K/V chunk in hand while that chunk travels on
to the next rank (a ring transport, see ``ring_transport.py``: gloo threads, an NCCL stream or
CUDA IPC peer copies move it while the block kernel runs), and folds each block's (out, lse) into a running result with the log-sum-exp
merge (``_C`` op ``merge_attention_partials_``). Blocks a causal mask hides entirely are skipped.

Backward rotates K/V the same way and passes dK/dV along with them, each rank adding its
contribution, so every chunk's gradient arrives back at its owner after one more hop. Running
outputs, lse, dQ and the travelling dK/dV are float32 whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallelkit.distributed import comm
from parallelkit.distributed.context_layout import check_sequence_length, chunk_ids
from parallelkit.ops.attention_block import (attention_block_backward, attention_block_forward,
                                             check_inputs)
from parallelkit.ops.attention_merge import merge_attention_partials_
from parallelkit.ops.ring_transport import for_group as ring_transport_for


@dataclass(frozen=True)
class Block:
    """One visible (query part, key part) pair of a ring step, with global positions."""

    q_part: int       # index into this rank's query parts
    k_part: int       # index into the travelling chunk's key parts
    q_offset: int
    k_offset: int
    causal: bool      # False when every key precedes every query: no mask needed


def ring_blocks(layout: str, causal: bool, rank: int, kv_rank: int, cp: int,
                part_len: int) -> list[Block]:
    """The blocks rank ``rank`` computes against the K/V of ``kv_rank``, masked ones dropped."""
    blocks = []
    for qi, q_chunk in enumerate(chunk_ids(layout, rank, cp)):
        for ki, k_chunk in enumerate(chunk_ids(layout, kv_rank, cp)):
            q_offset, k_offset = q_chunk * part_len, k_chunk * part_len
            if causal and k_offset > q_offset + part_len - 1:
                continue  # every key is in the future of every query
            needs_mask = causal and k_offset + part_len - 1 > q_offset
            blocks.append(Block(qi, ki, q_offset, k_offset, needs_mask))
    return blocks


def _parts(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [p.contiguous() for p in t.chunk(n, dim=2)]


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp_group, causal, layout, scale):
        cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
        held = len(chunk_ids(layout, rank, cp))
        part_len = q.shape[2] // held
        q_parts = _parts(q, held)
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        outs = [torch.zeros(p.shape, dtype=acc_dtype, device=q.device) for p in q_parts]
        lses = [torch.full(p.shape[:-1], float("-inf"), dtype=acc_dtype, device=q.device)
                for p in q_parts]

        kv = torch.stack([k, v]).contiguous()  # one message per step carries both
        incoming = torch.empty_like(kv)
        transport = ring_transport_for(cp_group, q.device, "ring_attention")
        for step in range(cp):
            pending = None
            if step + 1 < cp:  # pass the chunk on while we compute with it
                pending = transport.start(kv, incoming, step)
            kv_rank = (rank - step) % cp
            k_parts, v_parts = _parts(kv[0], held), _parts(kv[1], held)
            for b in ring_blocks(layout, causal, rank, kv_rank, cp, part_len):
                out, lse = attention_block_forward(
                    q_parts[b.q_part], k_parts[b.k_part], v_parts[b.k_part], causal=b.causal,
                    q_offset=b.q_offset, k_offset=b.k_offset, scale=scale)
                merge_attention_partials_(outs[b.q_part], lses[b.q_part], out, lse)
            if pending is not None:
                pending.wait()
                kv, incoming = incoming, kv

        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp_group, ctx.causal, ctx.layout, ctx.scale = cp_group, causal, layout, scale
        ctx.held, ctx.part_len = held, part_len
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cp_group, causal, layout, scale = ctx.cp_group, ctx.causal, ctx.layout, ctx.scale
        cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
        held, part_len = ctx.held, ctx.part_len
        q_parts, out_parts = _parts(q, held), _parts(out, held)
        dout_parts = _parts(dout.to(out.dtype), held)
        lse_parts = [p.contiguous() for p in lse.chunk(held, dim=2)]
        dq_parts = [torch.zeros_like(p, dtype=out.dtype) for p in q_parts]

        kv = torch.stack([k, v]).contiguous()
        kv_incoming = torch.empty_like(kv)
        dkv = torch.zeros(kv.shape, dtype=out.dtype, device=kv.device)  # travels with kv
        dkv_incoming = torch.empty_like(dkv)
        dkv_pending = None
        transport = ring_transport_for(cp_group, q.device, "ring_attention backward")
        for step in range(cp):
            kv_pending = None
            if step + 1 < cp:
                kv_pending = transport.start(kv, kv_incoming, 2 * step)
            kv_rank = (rank - step) % cp
            k_parts, v_parts = _parts(kv[0], held), _parts(kv[1], held)
            contribution = torch.zeros_like(dkv)
            dk_parts, dv_parts = contribution[0].chunk(held, dim=2), contribution[1].chunk(held, dim=2)
            for b in ring_blocks(layout, causal, rank, kv_rank, cp, part_len):
                dq, dk, dv = attention_block_backward(
                    q_parts[b.q_part], k_parts[b.k_part], v_parts[b.k_part], out_parts[b.q_part],
                    dout_parts[b.q_part], lse_parts[b.q_part], causal=b.causal,
                    q_offset=b.q_offset, k_offset=b.k_offset, scale=scale)
                dq_parts[b.q_part].add_(dq)
                dk_parts[b.k_part].add_(dk)  # views into contribution
                dv_parts[b.k_part].add_(dv)
            # The dK/dV of the chunk in hand: what the ranks before us added, plus our part.
            if dkv_pending is not None:
                dkv_pending.wait()
                contribution += dkv_incoming
            dkv, dkv_incoming = contribution, torch.empty_like(contribution)
            dkv_pending = transport.start(dkv, dkv_incoming, 2 * step + 1)
            if kv_pending is not None:
                kv_pending.wait()
                kv, kv_incoming = kv_incoming, kv
        dkv_pending.wait()  # after cp hops each chunk's gradient is back with its owner
        dq = torch.cat(dq_parts, dim=2)
        return (dq.to(q.dtype), dkv_incoming[0].to(k.dtype), dkv_incoming[1].to(v.dtype),
                None, None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: dist.ProcessGroup,
                   causal: bool = False, layout: str = "zigzag",
                   scale: float | None = None) -> torch.Tensor:
    """Attention of this rank's queries over the whole context-parallel sequence.

    q: ``[b, heads, s/cp, d]``; k, v: ``[b, kv_heads, s/cp, d]`` (GQA: heads % kv_heads == 0),
    this rank's tokens in ``layout`` order (see ``split_for_context_parallel``). Returns
    ``[b, heads, s/cp, d]`` in q's dtype, equal to full-sequence attention on these rows.
    """
    # Every check happens before the first message, and on every rank together: a rank that
    # raised mid-ring, or alone, would leave its peers blocked, and unequal chunks abort gloo.
    def local_checks():
        cp = dist.get_world_size(cp_group)
        check_sequence_length(q.shape[2] * cp, layout, cp)
        if k.shape != v.shape or k.shape[2] != q.shape[2] or k.shape[0] != q.shape[0]:
            raise ValueError(f"ring_attention expects q [b, h, s/cp, d] and k, v [b, kv_h, s/cp, "
                             f"d] with equal b and s/cp, got q {tuple(q.shape)}, k "
                             f"{tuple(k.shape)}, v {tuple(v.shape)}")
        check_inputs(q, k, v)

    check_context_parallel_inputs("ring_attention", cp_group, q, k, v, causal, layout, scale,
                                  local_checks)
    return RingAttentionFunction.apply(q, k, v, cp_group, causal, layout, scale)


def check_context_parallel_inputs(what: str, cp_group: dist.ProcessGroup, q, k, v, causal: bool,
                                  layout: str, scale: float | None, local_checks) -> None:
    """The CP ranks' agreement on everything both CP attentions exchange or assume equal (see
    ``comm.check_ranks_agree``), with ``local_checks`` run on every rank together."""
    comm.check_ranks_agree(
        cp_group, f"ContextParallelAttention ({what})", ranks="context-parallel",
        check=local_checks, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=q.dtype,
        causal=bool(causal), layout=layout, scale=scale,
        fix="every CP rank must pass q, k, v for its s/cp tokens of the same batch (same local "
            "sequence length, batch, heads and head dim), in one dtype, with the same options")

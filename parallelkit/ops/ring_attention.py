"""Ring attention: exact attention over a sequence split across the context-parallel group.

Each CP rank holds its queries and its keys/values (which tokens: ``distributed/packed_layout.py``,
one document or packed documents split per document). For cp steps it attends its queries to the
K/V chunk in hand while that chunk travels on to the next rank (a ring transport, see
``ring_transport.py``: gloo threads, an NCCL stream or CUDA IPC peer copies move it while the
block kernel runs), and folds each step's (out, lse) into a running result with the log-sum-exp
merge (``_C`` op ``merge_attention_partials_``). Each step is one block-attention call whose mask
(``ops.attention_mask.KeyRanges``: the keys of the query's document, up to its position under
``causal``) comes from the two ranks' token positions; steps a causal mask hides entirely are
skipped.

Backward rotates K/V the same way and passes dK/dV along with them, each rank adding its
contribution, so every chunk's gradient arrives back at its owner after one more hop. Running
outputs, lse, dQ and the travelling dK/dV are float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import hashlib

import torch
import torch.distributed as dist

from parallelkit.distributed import comm
from parallelkit.distributed.context_layout import check_sequence_length
from parallelkit.distributed.packed_layout import PackedLayout
from parallelkit.ops.attention_block import (attention_block_backward, attention_block_forward,
                                             check_inputs)
from parallelkit.ops.attention_mask import KeyRanges, document_ranges
from parallelkit.ops.attention_merge import merge_attention_partials_
from parallelkit.ops.ring_transport import for_group as ring_transport_for


@functools.lru_cache(maxsize=64)  # every layer of a model asks for the same ones
def ring_step_masks(layout: PackedLayout, rank: int, causal: bool,
                    device=None) -> list[KeyRanges | None]:
    """The mask of each ring step of rank ``rank``: its queries against the keys of rank
    (rank - step) % cp; None for a step in which no query sees any key."""
    q_pos, q_doc = layout.token_index(rank, device), layout.documents(rank, device)
    masks = []
    for step in range(layout.cp):
        kv_rank = (rank - step) % layout.cp
        if not layout.step_visible(rank, kv_rank, causal):
            masks.append(None)
            continue
        masks.append(document_ranges(q_pos, layout.token_index(kv_rank, device), causal, q_doc,
                                     layout.documents(kv_rank, device), check=False))
    return masks


@torch.library.custom_op("parallelkit::ring_attention_forward", mutates_args=())
def _ring_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: str,
                     causal: bool, cu_seqlens: list[int], layout: str,
                     scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of this rank's queries over the whole ring, in the accumulation dtype."""
    pg = comm.group_by_name(group)
    cp, rank = dist.get_world_size(pg), dist.get_rank(pg)
    masks = ring_step_masks(PackedLayout(tuple(cu_seqlens), cp, layout), rank, causal, q.device)
    out = torch.zeros(q.shape, dtype=_accumulation(q), device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=_accumulation(q), device=q.device)
    kv = torch.stack([k, v]).contiguous()  # one message per step carries both
    incoming = torch.empty_like(kv)
    transport = ring_transport_for(pg, q.device, "ring_attention")
    for step in range(cp):
        pending = None
        if step + 1 < cp:  # pass the chunk on while we compute with it
            pending = transport.start(kv, incoming, step)
        if masks[step] is not None:
            block_out, block_lse = attention_block_forward(q, kv[0], kv[1], ranges=masks[step],
                                                           scale=scale)
            merge_attention_partials_(out, lse, block_out, block_lse)
        if pending is not None:
            pending.wait()
            kv, incoming = incoming, kv
    return out, lse


@_ring_forward_op.register_fake
def _(q, k, v, group, causal, cu_seqlens, layout, scale):
    return (q.new_empty(q.shape, dtype=_accumulation(q)),
            q.new_empty(q.shape[:-1], dtype=_accumulation(q)))


@torch.library.custom_op("parallelkit::ring_attention_backward", mutates_args=())
def _ring_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, dout: torch.Tensor, group: str, causal: bool,
                      cu_seqlens: list[int], layout: str,
                      scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the accumulation dtype, dk/dv back with their owner after the ring."""
    pg = comm.group_by_name(group)
    cp, rank = dist.get_world_size(pg), dist.get_rank(pg)
    masks = ring_step_masks(PackedLayout(tuple(cu_seqlens), cp, layout), rank, causal, q.device)
    dout = dout.to(out.dtype).contiguous()
    dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)  # contiguous, as the fake says
    kv = torch.stack([k, v]).contiguous()
    kv_incoming = torch.empty_like(kv)
    dkv_incoming = torch.empty(kv.shape, dtype=out.dtype, device=kv.device)
    dkv_pending = None
    transport = ring_transport_for(pg, q.device, "ring_attention backward")
    for step in range(cp):
        kv_pending = None
        if step + 1 < cp:
            kv_pending = transport.start(kv, kv_incoming, 2 * step)
        if masks[step] is not None:
            block_dq, dk, dv = attention_block_backward(q, kv[0], kv[1], out, dout, lse,
                                                        ranges=masks[step], scale=scale)
            dq += block_dq
            contribution = torch.stack([dk, dv])
        else:
            contribution = torch.zeros_like(dkv_incoming)
        # The dK/dV of the chunk in hand: what the ranks before us added, plus our part.
        if dkv_pending is not None:
            dkv_pending.wait()
            contribution += dkv_incoming
        dkv_incoming = torch.empty_like(contribution)
        dkv_pending = transport.start(contribution, dkv_incoming, 2 * step + 1)
        if kv_pending is not None:
            kv_pending.wait()
            kv, kv_incoming = kv_incoming, kv
    dkv_pending.wait()  # after cp hops each chunk's gradient is back with its owner
    return dq, dkv_incoming[0].clone(), dkv_incoming[1].clone()


@_ring_backward_op.register_fake
def _(q, k, v, out, lse, dout, group, causal, cu_seqlens, layout, scale):
    return (q.new_empty(q.shape, dtype=out.dtype), k.new_empty(k.shape, dtype=out.dtype),
            v.new_empty(v.shape, dtype=out.dtype))


def _accumulation(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class RingAttentionFunction(torch.autograd.Function):
    """Ring attention's autograd around its two custom ops (``torch.compile`` keeps them whole
    in its graph: the ring's transport and its masks stay opaque)."""

    @staticmethod
    def forward(ctx, q, k, v, cp_group, causal, layout, scale):
        args = (comm.group_name(cp_group), bool(causal), list(layout.cu_seqlens),
                layout.layout, scale)
        out, lse = _ring_forward_op(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward_op(q, k, v, out, lse, dout, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: dist.ProcessGroup,
                   causal: bool = False, layout: str = "zigzag", scale: float | None = None,
                   cu_seqlens: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of this rank's queries over the whole context-parallel sequence.

    q: ``[b, heads, s/cp, d]``; k, v: ``[b, kv_heads, s/cp, d]`` (GQA: heads % kv_heads == 0),
    this rank's tokens in ``layout`` order (``split_for_context_parallel``). Returns
    ``[b, heads, s/cp, d]`` in q's dtype, equal to full-sequence attention on these rows.

    Packed documents: ``cu_seqlens`` (1-D, [0, ..., s], the same on every rank and for every
    batch row) are the document boundaries of the whole packed sequence, each document split
    per document (``split_packed``; each a multiple of 2·cp tokens for zigzag, cp for
    contiguous); queries see only keys of their own document. ``position_ids`` ([s/cp] or
    [b, s/cp]), if given, are what the caller fed this rank's tokens (rotary embeddings), checked
    against the split: global positions, or positions within each document when packed.
    """
    cp = dist.get_world_size(cp_group)

    def local_checks():
        if k.shape != v.shape or k.shape[2] != q.shape[2] or k.shape[0] != q.shape[0]:
            raise ValueError(f"ring_attention expects q [b, h, s/cp, d] and k, v [b, kv_h, s/cp, "
                             f"d] with equal b and s/cp, got q {tuple(q.shape)}, k "
                             f"{tuple(k.shape)}, v {tuple(v.shape)}")
        check_inputs(q, k, v)
        return check_split(cu_seqlens, cp, layout, q.shape[2], position_ids,
                           dist.get_rank(cp_group), q.device)

    # Every check happens before the first message, and on every rank together: a rank that
    # raised mid-ring, or alone, would leave its peers blocked, and unequal chunks abort gloo.
    packed = check_context_parallel_inputs("ring_attention", cp_group, q, k, v, causal, layout,
                                           scale, local_checks, cu_seqlens)
    return RingAttentionFunction.apply(q, k, v, cp_group, causal, packed, scale)


def check_split(cu_seqlens, cp: int, layout: str, local_len: int,
                position_ids: torch.Tensor | None, rank: int, device) -> PackedLayout:
    """The layout of ``cu_seqlens`` (None: one sequence) over cp ranks, checked against this
    rank's ``local_len`` tokens and, if given, their ``position_ids``."""
    if cu_seqlens is None:
        check_sequence_length(local_len * cp, layout, cp)
        cu_seqlens = [0, local_len * cp]
    packed = PackedLayout.build(cu_seqlens, cp, layout)
    if packed.total != local_len * cp:
        raise ValueError(f"cu_seqlens end at {packed.total} tokens but the cp={cp} ranks hold "
                         f"{local_len} each ({local_len * cp} in all); cu_seqlens must describe "
                         "the whole packed sequence")
    if position_ids is not None:
        expected = packed.positions(rank, device)
        given = position_ids.reshape(-1, position_ids.shape[-1])
        fix = ("split packed batches with split_packed and pass their cu_seqlens, and unpacked "
               "ones with split_for_context_parallel / context_parallel_positions")
        if given.shape[-1] != local_len:
            raise ValueError(f"position_ids hold {given.shape[-1]} positions per row for "
                             f"{local_len} tokens on this rank; {fix}")
        if comm.compiling():  # no data-dependent branch in a compiled graph: fail the step
            torch._assert_async((given == expected).all(), "position_ids do not match this "
                                f"rank's tokens under the {layout!r} split; {fix}")
        elif not bool((given == expected).all()):
            what = "global positions" if len(packed.cu_seqlens) == 2 else (
                "positions within each document (cu_seqlens)")
            raise ValueError(f"position_ids do not match this rank's tokens under the "
                             f"{layout!r} split: expected the {what} {_head(expected)}, got "
                             f"{_head(given[0])}; {fix}")
    return packed


def _head(t: torch.Tensor) -> str:
    values = t.tolist()
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...]"


def check_context_parallel_inputs(what: str, cp_group: dist.ProcessGroup, q, k, v, causal: bool,
                                  layout: str, scale: float | None, local_checks,
                                  cu_seqlens: torch.Tensor | None = None):
    """The CP ranks' agreement on everything both CP attentions exchange or assume equal (see
    ``comm.check_ranks_agree``), with ``local_checks`` run on every rank together; returns what
    ``local_checks`` returned."""
    result = []
    comm.check_ranks_agree(
        cp_group, f"ContextParallelAttention ({what})", ranks="context-parallel",
        check=lambda: result.append(local_checks()), q_shape=q.shape, k_shape=k.shape,
        v_shape=v.shape, dtype=q.dtype, causal=bool(causal), layout=layout, scale=scale,
        cu_seqlens=_digest(cu_seqlens),
        fix="every CP rank must pass q, k, v for its s/cp tokens of the same batch (same local "
            "sequence length, batch, heads and head dim), in one dtype, with the same options "
            "and the same cu_seqlens")
    return result[0]


def _digest(cu_seqlens) -> str | None:
    """A short, comparable description of the document boundaries."""
    if cu_seqlens is None:
        return None
    values = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    tag = hashlib.blake2b(repr(values).encode(), digest_size=4).hexdigest()
    return f"{len(values) - 1} documents ending at {values[-1] if values else None} ({tag})"

"""Moving routed tokens to the ranks that hold their experts, and back (the all-to-all dispatcher).

Expert e of E lives on expert-parallel rank e // (E / ep). A rank's T × k assignments are
sorted by expert, the number going to each expert is exchanged first (an all-to-all of E
counts), then the tokens themselves go in one all-to-all with uneven split sizes. The rows a
rank receives come grouped by source rank; they are regrouped by local expert, so each local
expert's tokens are contiguous (what a grouped GEMM takes). With expert tensor parallelism
(etp > 1) the etp ranks that share the local experts each received their own tokens: they
all-gather them (each rank's block padded to the longest), each computes its shard of every
expert on all of them, and a reduce-scatter returns to each rank the summed outputs of its own.
The return path reverses each step and sums the outputs into their tokens with the routing
weights.

Every rank tells the others, inside the count exchanges, whether its router logits were finite,
so a NaN on one rank raises on every rank of the exchange instead of leaving them waiting in
the next collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelkit.distributed import comm, mappings


class _AllToAllUneven(torch.autograd.Function):
    """Rows [sum(send), ...] → [sum(receive), ...]; backward the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, send, receive, group):
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return _exchange(x, send, receive, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], receive: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(receive), *x.shape[1:]))
    comm.record_traffic("all_to_all", x.numel() * x.element_size(), group)
    dist.all_to_all_single(out, x, output_split_sizes=receive, input_split_sizes=send,
                           group=group)
    return out


@dataclass
class Dispatch:
    """What the return path needs."""

    tokens: torch.Tensor         # [N] token of each kept assignment, in expert order
    weights: torch.Tensor        # [N] its routing weight
    send: list[int]              # rows sent to each EP rank
    receive: list[int]           # rows received from each EP rank
    regroup: torch.Tensor        # received rows -> grouped by local expert
    ep_group: dist.ProcessGroup
    etp: tuple | None = None     # (group, order of the gathered rows, padded length, own rows)


def dispatch(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, n_experts: int,
             ep_group: dist.ProcessGroup, etp_group: dist.ProcessGroup | None, finite: bool,
             what: str) -> tuple[torch.Tensor, torch.Tensor, Dispatch]:
    """Send this rank's tokens to their experts.

    Args:
        x: [T, H] tokens; index, weight: [T, k] routing (index E: dropped).
        ep_group, etp_group: the expert-parallel and expert-tensor-parallel groups.
        finite: whether this rank's router logits were finite.

    Returns:
        rows: [M, H] the tokens of this rank's local experts, grouped by local expert (with
            etp > 1, those of every rank of the ETP group);
        counts: [E / ep] rows per local expert; and the :class:`Dispatch` to return them with.
    """
    ep = dist.get_world_size(ep_group)
    local_experts = n_experts // ep
    top_k = index.shape[1]
    flat = index.reshape(-1)
    kept = (flat < n_experts).nonzero().flatten()
    order = kept[torch.argsort(flat[kept], stable=True)]
    tokens = torch.div(order, top_k, rounding_mode="floor")
    counts = torch.bincount(flat[order], minlength=n_experts).view(ep, local_experts)
    received, bad = _exchange_counts(counts, finite, ep_group, all_to_all=True)
    send, receive = counts.sum(1).tolist(), received.sum(1).tolist()
    rows = _AllToAllUneven.apply(x.index_select(0, tokens), send, receive, ep_group)
    regroup = _grouping(received, _block_starts(received))
    rows = rows.index_select(0, regroup)
    expert_counts = received.sum(0)
    state = Dispatch(tokens, weight.reshape(-1)[order], send, receive, regroup, ep_group)
    if etp_group is not None and dist.get_world_size(etp_group) > 1:
        rows, expert_counts, state.etp, bad = _gather_over_etp(rows, expert_counts, bad,
                                                               etp_group)
    if bad is not None:
        raise FloatingPointError(
            f"{what}: router logits are NaN or infinite on global rank {bad}; the tokens "
            "cannot be routed (check the learning rate, the loss scale and that step's inputs)")
    return rows, expert_counts, state


def combine(y: torch.Tensor, state: Dispatch, n_tokens: int) -> torch.Tensor:
    """The experts' outputs [M, H] (grouped as :func:`dispatch` returned the rows) back to
    their tokens: [T, H], each the weighted sum of its experts' outputs (0 if all dropped)."""
    if state.etp is not None:
        group, order, padded, own = state.etp
        blocks = y.new_zeros((padded * dist.get_world_size(group), y.shape[1]))
        y = mappings.reduce_scatter_to_sp_region(blocks.index_copy(0, order, y), group)[:own]
    y = y.index_select(0, torch.argsort(state.regroup))  # back to the received order
    y = _AllToAllUneven.apply(y, state.receive, state.send, state.ep_group)
    weighted = y * state.weights.to(y.dtype)[:, None]
    return y.new_zeros((n_tokens, y.shape[1])).index_add(0, state.tokens, weighted)


def _exchange_counts(counts: torch.Tensor, finite: bool, group: dist.ProcessGroup,
                     all_to_all: bool, bad: int | None = None):
    """Counts [p, c] of this rank for each member (``all_to_all``) or one row [1, c] for all
    (all-gather) → [p, c] from each member. Each row also carries the global rank of a rank
    whose router logits were not finite (``bad``: one known already, passed on), so that every
    member learns of it; returns (counts, that rank or None)."""
    if not finite and bad is None:
        bad = dist.get_rank()
    flag = torch.full((counts.shape[0], 1), -1 if bad is None else bad, dtype=counts.dtype,
                      device=counts.device)
    sent = torch.cat([counts, flag], 1).contiguous()
    p = dist.get_world_size(group)
    if p == 1:
        return counts, bad
    if all_to_all:
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent, group=group)
    else:
        pieces = [torch.empty_like(sent) for _ in range(p)]
        dist.all_gather(pieces, sent, group=group)
        received = torch.cat(pieces)
    flags = received[:, -1]
    if bad is None and bool((flags >= 0).any()):
        bad = int(flags[flags >= 0][0])
    return received[:, :-1], bad


def _gather_over_etp(rows, expert_counts, bad, group):
    """All-gather the rows of every ETP rank, regrouped by local expert."""
    counts, bad = _exchange_counts(expert_counts[None], True, group, all_to_all=False, bad=bad)
    padded = max(counts.sum(1).tolist())
    blocks = F.pad(rows, (0, 0, 0, padded - rows.shape[0]))
    gathered = mappings.gather_from_sp_region(blocks, group)  # backward: reduce-scatter
    # Rank r's rows start at r * padded, grouped by expert within.
    ranks = torch.arange(counts.shape[0], device=counts.device)[:, None]
    order = _grouping(counts, torch.cumsum(counts, 1) - counts + padded * ranks)
    return (gathered.index_select(0, order), counts.sum(0),
            (group, order, padded, rows.shape[0]), bad)


def _block_starts(counts: torch.Tensor) -> torch.Tensor:
    """Start row of each (source, expert) block when the blocks lie in (source, expert) order."""
    flat = counts.reshape(-1)
    return (torch.cumsum(flat, 0) - flat).view(counts.shape)


def _grouping(counts: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The rows of the (source, expert) blocks in (expert, source) order: each expert's rows
    contiguous. counts, starts: [sources, experts]."""
    lengths, firsts = counts.t().reshape(-1), starts.t().reshape(-1)
    block = torch.repeat_interleave(torch.arange(lengths.numel(), device=counts.device), lengths)
    within = torch.arange(block.numel(), device=counts.device) - (
        torch.cumsum(lengths, 0) - lengths)[block]
    return firsts[block] + within

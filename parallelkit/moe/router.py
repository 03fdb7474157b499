"""Top-k routing of tokens to experts: which experts each token goes to, with what weight.

Two score functions, as the mixture-of-experts models that use them:

    softmax   probs = softmax(logits); the top k by probability; weights renormalised to sum to 1
              when ``normalize`` (Mixtral, Qwen3-MoE) or kept (Qwen2-MoE)
    sigmoid   scores = sigmoid(logits); the top k of scores + ``expert_bias`` (DeepSeek-V3's
              auxiliary-loss-free balancing: the bias steers the choice and is not trained by
              gradients, :func:`update_expert_bias` moves it); weights are the chosen scores
              without the bias, normalised, times ``scale``

``capacity_factor`` limits each expert to ceil(factor · T · k / E) assignments of this rank's T
tokens; an expert's lowest-weight assignments beyond that are dropped (index E, weight 0), as
Megatron's "probs" drop policy does. None: dropless.

The load-balancing loss is Switch Transformer's, E · Σ_e f_e · P_e with f_e the fraction of
assignments that went to expert e and P_e the mean routing probability of e: 1 when balanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallelkit.distributed import mappings

SCORES = ("softmax", "sigmoid")


@dataclass
class Routing:
    """The routing of T tokens to top k of E experts.

    index: [T, k] int64 expert of each assignment; E marks a dropped one.
    weight: [T, k] weight of each assignment (0 where dropped); differentiable.
    probs: [T, E] routing probabilities (for the load-balancing loss).
    Both float32, or float64 for float64 logits.
    """

    index: torch.Tensor
    weight: torch.Tensor
    probs: torch.Tensor


def route(logits: torch.Tensor, top_k: int, score: str = "softmax", normalize: bool = True,
          expert_bias: torch.Tensor | None = None, scale: float = 1.0,
          capacity_factor: float | None = None) -> Routing:
    """Route tokens from their router ``logits`` [T, E] (see the module docstring)."""
    n_tokens, n_experts = logits.shape
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the {n_experts} experts")
    if score not in SCORES:
        raise ValueError(f"score={score!r} must be one of {SCORES}")
    if logits.dtype != torch.float64:  # routing decisions in float32 for 16-bit models
        logits = logits.float()
    if score == "softmax":
        probs = torch.softmax(logits, dim=-1)
        weight, index = torch.topk(probs, top_k, dim=-1)
        if normalize:
            weight = weight / weight.sum(-1, keepdim=True)
    else:
        scores = torch.sigmoid(logits)
        choice = scores if expert_bias is None else scores + expert_bias.float()
        index = torch.topk(choice, top_k, dim=-1).indices
        weight = scores.gather(-1, index)
        if normalize:
            weight = weight / weight.sum(-1, keepdim=True)
        probs = scores / scores.sum(-1, keepdim=True)
    weight = weight * scale
    if capacity_factor is not None:
        index, weight = _drop_over_capacity(index, weight, n_experts, capacity_factor)
    return Routing(index, weight, probs)


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Assignments each expert takes from ``n_tokens`` tokens."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def _drop_over_capacity(index, weight, n_experts, capacity_factor):
    """Keep each expert's ``capacity`` highest-weight assignments; the rest get index E."""
    n_tokens, top_k = index.shape
    limit = capacity(n_tokens, top_k, n_experts, capacity_factor)
    flat_index, flat_weight = index.reshape(-1), weight.detach().reshape(-1)
    # By expert, and within an expert by weight, highest first (stable: ties keep token order).
    by_weight = torch.argsort(flat_weight, descending=True, stable=True)
    order = by_weight[torch.argsort(flat_index[by_weight], stable=True)]
    counts = torch.bincount(flat_index, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.empty_like(order)
    rank_in_expert[order] = torch.arange(order.numel(), device=index.device) - starts[
        flat_index[order]]
    kept = (rank_in_expert < limit).view(n_tokens, top_k)
    return torch.where(kept, index, n_experts), weight * kept


def load_balancing_loss(routing: Routing, n_experts: int,
                        group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss E · Σ_e f_e · P_e over these tokens (1: balanced), or
    over the tokens of every rank of ``group`` (the TP group under sequence parallelism, where a
    sequence's tokens are split over it); dropped assignments count where they were routed."""
    top_k = routing.index.shape[1]
    chosen = routing.index.clamp(max=n_experts - 1).reshape(-1)  # a dropped one was chosen too
    counts = torch.bincount(chosen, minlength=n_experts).to(routing.probs.dtype)
    prob_sums = routing.probs.sum(0)
    n_tokens = torch.tensor(float(routing.index.shape[0]), device=counts.device)
    if group is not None and dist.get_world_size(group) > 1:
        counts = mappings.reduce_from_tp_region(counts, group).detach()
        n_tokens = mappings.reduce_from_tp_region(n_tokens, group).detach()
        prob_sums = mappings.reduce_from_tp_region(prob_sums, group)  # backward: identity
    n_tokens = n_tokens.clamp(min=1)
    fraction = counts / (n_tokens * top_k)
    return n_experts * (fraction * prob_sums / n_tokens).sum()


def update_expert_bias(expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor,
                       rate: float = 1e-3) -> None:
    """DeepSeek-V3's bias update, in place: raise the bias of under-loaded experts and lower the
    over-loaded ones' by ``rate`` (``tokens_per_expert`` summed over the batch, and over the
    data-parallel ranks by the caller for one bias everywhere)."""
    load = tokens_per_expert.float()
    expert_bias.add_(rate * torch.sign(load.mean() - load))


def tokens_per_expert(routing: Routing, n_experts: int) -> torch.Tensor:
    """[E] assignments kept per expert."""
    return torch.bincount(routing.index.reshape(-1), minlength=n_experts + 1)[:n_experts]


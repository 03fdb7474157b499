"""Reference mixture-of-experts: every expert in one process, token by token, in float64.

What the expert-parallel layer (``parallelkit.moe``) must equal: routing, capacity dropping and
the gated experts written out plainly. Differentiable, so tests take every gradient from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def route_reference(logits: torch.Tensor, top_k: int, score: str = "softmax",
                    normalize: bool = True, expert_bias: torch.Tensor | None = None,
                    scale: float = 1.0, capacity_factor: float | None = None):
    """[T, E] logits → (index [T, k] with E for dropped, weight [T, k], probs [T, E])."""
    n_tokens, n_experts = logits.shape
    logits = logits.double()
    if score == "softmax":
        probs = logits.softmax(-1)
        weight, index = probs.topk(top_k, -1)
    else:
        scores = logits.sigmoid()
        bias = 0 if expert_bias is None else expert_bias.double()
        index = (scores + bias).topk(top_k, -1).indices
        weight = scores.gather(-1, index)
        probs = scores / scores.sum(-1, keepdim=True)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True)
    weight = weight * scale
    if capacity_factor is None:
        return index, weight, probs
    limit = math.ceil(capacity_factor * n_tokens * top_k / n_experts)
    keep = torch.ones_like(index, dtype=torch.bool)
    for e in range(n_experts):
        # This expert's assignments, highest weight first, ties in token order.
        mine = [(-weight[t, j].item(), t * top_k + j) for t in range(n_tokens)
                for j in range(top_k) if index[t, j] == e]
        for _, flat in sorted(mine)[limit:]:
            keep[flat // top_k, flat % top_k] = False
    return torch.where(keep, index, n_experts), weight * keep, probs


def experts_reference(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                      gate_up: torch.Tensor, down: torch.Tensor,
                      activation: str = "silu") -> torch.Tensor:
    """Σ_j weight[t, j] · expert_{index[t, j]}(x_t) for every token t, dropped ones skipped.
    gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I]."""
    n_experts, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    rows = []
    for t in range(x.shape[0]):
        total = torch.zeros_like(x[t], dtype=torch.float64)
        for j in range(index.shape[1]):
            e = int(index[t, j])
            if e == n_experts:
                continue
            h = gate_up[e].double() @ x[t].double()
            hidden = ACT[activation](h[:intermediate]) * h[intermediate:]
            total = total + weight[t, j].double() * (down[e].double() @ hidden)
        rows.append(total)
    return torch.stack(rows) if rows else x.new_zeros((0, x.shape[1]), dtype=torch.float64)


def load_balancing_reference(index: torch.Tensor, probs: torch.Tensor,
                             n_experts: int) -> torch.Tensor:
    """E · Σ_e (share of assignments routed to e) · (mean probability of e)."""
    chosen = index.clamp(max=n_experts - 1)
    share = torch.stack([(chosen == e).double().mean() for e in range(n_experts)])
    return n_experts * (share * probs.double().mean(0)).sum()

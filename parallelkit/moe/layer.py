"""``MoELayer``: a mixture-of-experts MLP with its experts spread over the expert-parallel group.

    router (replicated) → top-k routing → ExpertParallelExperts (all-to-all dispatch, local
    experts, all-to-all back) [+ a shared expert, dense, on every token] → [..., H]

The router's load-balancing loss joins the gradients without changing the output (Megatron's
``MoEAuxLossAutoScaler``): backward adds ``aux_loss_coeff`` × its gradient, so the layer is a
drop-in for an MLP and the training loop need not collect it; ``last_aux_loss`` holds its value
for logging. Its statistics can span an ``aux_loss_group`` (the TP group under sequence
parallelism, where a sequence's tokens are split over it), so that it is the loss over the
whole sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.moe.experts import ACTIVATIONS, ExpertParallelExperts
from parallelkit.moe.router import SCORES, Routing, load_balancing_loss, route
from parallelkit.tensor_parallel.sequence_parallel import mark_sequence_parallel


class _AuxLossInGradient(torch.autograd.Function):
    """Identity on ``out``; backward also gives ``aux_loss`` the gradient ``coeff``."""

    @staticmethod
    def forward(ctx, out, aux_loss, coeff):
        ctx.coeff = coeff
        ctx.save_for_backward(aux_loss)
        return out

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.coeff), None


class MoELayer(nn.Module):
    """Mixture of ``n_experts`` gated MLPs (``intermediate`` wide), ``top_k`` per token.

    Args:
        score: "softmax" (Mixtral, Qwen-MoE) or "sigmoid" with a per-expert bias buffer
            (DeepSeek-V3); normalize: renormalise the chosen weights; scale: times the weights.
        capacity_factor: None for dropless, else each expert takes at most
            ceil(factor · T · k / E) of this rank's assignments (lowest weights dropped).
        aux_loss_coeff: weight of the load-balancing loss in the gradients (0: off).
        aux_loss_group: group over which the loss's statistics are summed (or None).
        shared_intermediate: width of a shared expert applied to every token (None: none),
            gated by sigmoid(a linear of the token) when ``shared_gate`` (Qwen2-MoE).
        sequence_parallel: the layer runs on this TP rank's tokens (sequence parallelism): the
            router's and shared expert's gradients are then partial sums over TP, marked for
            the sequence-parallel gradient sum (``register_sequence_parallel_grad_hooks``).
        ep_group, etp_group: default the MPU's.
    """

    def __init__(self, hidden: int, intermediate: int, n_experts: int, top_k: int, *,
                 score: str = "softmax", normalize: bool = True, scale: float = 1.0,
                 capacity_factor: float | None = None, aux_loss_coeff: float = 0.0,
                 aux_loss_group: dist.ProcessGroup | None = None,
                 shared_intermediate: int | None = None, shared_gate: bool = False,
                 activation: str = "silu", sequence_parallel: bool = False,
                 ep_group: dist.ProcessGroup | None = None,
                 etp_group: dist.ProcessGroup | None = None, device=None, dtype=None):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score={score!r} must be one of {SCORES}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0, or None (dropless)")
        self.top_k, self.score, self.normalize, self.scale = top_k, score, normalize, scale
        self.capacity_factor, self.aux_loss_coeff = capacity_factor, aux_loss_coeff
        self.aux_loss_group = aux_loss_group
        self.router = nn.Linear(hidden, n_experts, bias=False, device=device, dtype=dtype)
        if score == "sigmoid":
            self.register_buffer("expert_bias", torch.zeros(n_experts, device=device))
        else:
            self.expert_bias = None
        self.experts = ExpertParallelExperts(n_experts, hidden, intermediate, ep_group=ep_group,
                                             etp_group=etp_group, activation=activation,
                                             device=device, dtype=dtype)
        self.shared = None
        if shared_intermediate is not None:
            self.shared = nn.ModuleDict({
                "gate_up": nn.Linear(hidden, 2 * shared_intermediate, bias=False, device=device,
                                     dtype=dtype),
                "down": nn.Linear(shared_intermediate, hidden, bias=False, device=device,
                                  dtype=dtype)})
            if shared_gate:
                self.shared["gate"] = nn.Linear(hidden, 1, bias=False, device=device,
                                                dtype=dtype)
        if sequence_parallel:
            replicated = [p for name, p in self.named_parameters()
                          if not name.startswith("experts.")]
            mark_sequence_parallel(*replicated)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] → [..., H]."""
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens)
        routing = route(logits, self.top_k, self.score, self.normalize, self.expert_bias,
                        self.scale, self.capacity_factor)
        out = self.experts(tokens, routing.index, routing.weight)
        if self.shared is not None:
            out = out + self._shared(tokens)
        self.last_routing = routing
        if self.aux_loss_coeff and torch.is_grad_enabled():
            aux = self.load_balancing_loss(routing)
            self.last_aux_loss = aux.detach()
            out = _AuxLossInGradient.apply(out, aux, self.aux_loss_coeff)
        return out.view(x.shape)

    def load_balancing_loss(self, routing: Routing) -> torch.Tensor:
        """Switch's E · Σ_e f_e · P_e over this rank's tokens, or over ``aux_loss_group``'s."""
        return load_balancing_loss(routing, self.experts.n_experts, self.aux_loss_group)

    def _shared(self, tokens: torch.Tensor) -> torch.Tensor:
        gate, up = self.shared["gate_up"](tokens).chunk(2, dim=-1)
        out = self.shared["down"](ACTIVATIONS[self.experts.activation](gate) * up)
        if "gate" in self.shared:
            out = torch.sigmoid(self.shared["gate"](tokens)) * out
        return out

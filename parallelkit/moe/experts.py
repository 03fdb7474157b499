"""This rank's experts of a mixture-of-experts layer, with their tokens dispatched to them.

``ExpertParallelExperts`` holds E / ep experts (expert parallelism), each a gated MLP
``down(act(gate(x)) * up(x))`` whose intermediate dim is split across the etp ranks that share
the experts (expert tensor parallelism: gate/up by output rows, down by input columns, so the
shards' outputs sum to the expert's). Weights are stored as transformers stores them:
``gate_up_proj`` [E/ep, 2·I/etp, H] (gate rows, then up rows) and ``down_proj`` [E/ep, H, I/etp].

``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` is transformers'
experts call: it dispatches (``moe.dispatch``), runs the local experts on their contiguous rows
as one grouped GEMM (``torch._grouped_mm``) or an expert-by-expert loop where that does not
apply, and combines. Expert parameters are marked ``expert_parallel`` (their gradients are
averaged over the expert-data-parallel group, not the dense one).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallelkit.distributed import comm
from parallelkit.distributed.groups import resolve_group
from parallelkit.moe.dispatch import combine, dispatch

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class ExpertParallelExperts(nn.Module):
    """E experts over the expert-parallel group, each split over the expert-tensor group.

    Args:
        n_experts: E, divisible by the EP size; hidden: H; intermediate: I, divisible by etp.
        ep_group, etp_group: default the MPU's expert-parallel and expert-tensor groups.
        activation: "silu" (Mixtral, Qwen-MoE), "gelu" or "gelu_tanh".
        grouped_gemm: None: ``torch._grouped_mm`` on CUDA where it runs (see
            :func:`grouped_gemm_ok`), the loop on CPU, where torch's grouped GEMM measured
            slower (benchmarks/bench_moe.py); True: grouped wherever it runs; False: the loop.
    """

    def __init__(self, n_experts: int, hidden: int, intermediate: int, *,
                 ep_group: dist.ProcessGroup | None = None,
                 etp_group: dist.ProcessGroup | None = None, activation: str = "silu",
                 grouped_gemm: bool | None = None, device=None, dtype=None):
        super().__init__()
        self.ep_group = resolve_group(ep_group, "ep")
        self.etp_group = resolve_group(etp_group, "expert_tp")
        self.ep, self.etp = (dist.get_world_size(g) for g in (self.ep_group, self.etp_group))
        if n_experts % self.ep:
            raise ValueError(f"{n_experts} experts cannot be split over ep={self.ep} ranks: "
                             f"choose ep dividing the number of experts")
        if intermediate % self.etp:
            raise ValueError(f"the experts' intermediate size {intermediate} is not divisible "
                             f"by etp={self.etp}; choose etp dividing it")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(ACTIVATIONS)}")
        self.n_experts, self.hidden, self.intermediate = n_experts, hidden, intermediate
        self.local_experts = n_experts // self.ep
        self.first_expert = dist.get_rank(self.ep_group) * self.local_experts
        self.activation, self.grouped_gemm = activation, grouped_gemm
        shard = intermediate // self.etp
        self.gate_up_proj = nn.Parameter(torch.empty(self.local_experts, 2 * shard, hidden,
                                                     device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(self.local_experts, hidden, shard,
                                                  device=device, dtype=dtype))
        for p in self.parameters():
            p.expert_parallel = True
        self.calls_by_path: set[str] = set()

    @classmethod
    def from_dense(cls, experts: nn.Module, **kwargs) -> "ExpertParallelExperts":
        """This rank's shard of transformers' experts module (``gate_up_proj`` [E, 2I, H],
        ``down_proj`` [E, H, I], ``act_fn``)."""
        n_experts, two_i, hidden = experts.gate_up_proj.shape
        activation = kwargs.pop("activation", _activation_name(experts))
        layer = cls(n_experts, hidden, two_i // 2, activation=activation,
                    device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype,
                    **kwargs)
        layer.load_dense(experts.gate_up_proj.detach(), experts.down_proj.detach())
        return layer

    def load_dense(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Keep this rank's experts and their intermediate shard of the dense weights."""
        mine = slice(self.first_expert, self.first_expert + self.local_experts)
        rank, shard = dist.get_rank(self.etp_group), self.intermediate // self.etp
        cols = slice(rank * shard, (rank + 1) * shard)
        gate, up = gate_up[mine].split(self.intermediate, dim=1)
        with torch.no_grad():
            self.gate_up_proj.copy_(torch.cat([gate[:, cols], up[:, cols]], dim=1))
            self.down_proj.copy_(down[mine][:, :, cols])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H]; top_k_index, top_k_weights [T, k] (index E: dropped) →
        [T, H], each token's weighted sum over its experts."""
        x = hidden_states
        self._check(x, top_k_index, top_k_weights)
        finite = bool(torch.isfinite(top_k_weights).all())
        with comm.entry_checked():
            rows, counts, state = dispatch(x, top_k_index, top_k_weights, self.n_experts,
                                           self.ep_group, self.etp_group, finite,
                                           type(self).__name__)
            y = self.compute(rows, counts)
            return combine(y, state, x.shape[0]).to(x.dtype)

    def compute(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts on their rows [M, H] (grouped by expert, ``counts`` [E/ep] rows
        each) → [M, H] (partial sums over the etp ranks)."""
        act = ACTIVATIONS[self.activation]
        if self._use_grouped_gemm(rows):
            self.calls_by_path.add("grouped_gemm")
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            h = grouped_matmul(rows, self.gate_up_proj.transpose(1, 2), offsets)
            gate, up = h.chunk(2, dim=-1)
            return grouped_matmul(act(gate) * up, self.down_proj.transpose(1, 2), offsets)
        self.calls_by_path.add("expert_loop")
        outputs = []
        for e, part in enumerate(rows.split(counts.tolist(), 0)):
            gate, up = F.linear(part, self.gate_up_proj[e]).chunk(2, dim=-1)
            outputs.append(F.linear(act(gate) * up, self.down_proj[e]))
        return torch.cat(outputs) if outputs else rows.new_zeros((0, self.hidden))

    def _use_grouped_gemm(self, rows: torch.Tensor) -> bool:
        if self.grouped_gemm is False or (self.grouped_gemm is None and not rows.is_cuda):
            return False
        return grouped_gemm_ok(rows, self.gate_up_proj, self.down_proj)

    def _check(self, x, index, weights):
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"{type(self).__name__} takes tokens [T, {self.hidden}], got "
                             f"{list(x.shape)}; flatten [b, s, h] with .view(-1, h)")
        if index.shape != weights.shape or index.dim() != 2 or index.shape[0] != x.shape[0]:
            raise ValueError(f"top_k_index and top_k_weights must both be [T={x.shape[0]}, k], "
                             f"got {list(index.shape)} and {list(weights.shape)}")

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts} (local {self.local_experts}), hidden={self.hidden}, "
                f"intermediate={self.intermediate}, ep={self.ep}, etp={self.etp}")


def grouped_gemm_ok(rows: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these: float32/bfloat16/float16 with rows 16-byte
    aligned; on CUDA from compute capability 9.0."""
    if not hasattr(torch, "_grouped_mm") or rows.dtype not in (torch.float32, torch.bfloat16,
                                                                 torch.float16):
        return False
    if rows.is_cuda and torch.cuda.get_device_capability(rows.device) < (9, 0):
        return False
    return all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16
               == 0 for w in weights)


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """rows [M, K] in groups ending at ``offsets`` [G], each times its weights[g] [K, N]."""
    out = torch._grouped_mm(rows.contiguous(), weights, offs=offsets)
    if out.requires_grad:  # its backward wants a dense gradient
        out.register_hook(lambda grad: grad.contiguous())
    return out


def _activation_name(experts: nn.Module) -> str:
    act = getattr(experts, "act_fn", None)
    name = type(act).__name__.lower()
    if "silu" in name:
        return "silu"
    if "tanh" in name or "new" in name:
        return "gelu_tanh"
    if "gelu" in name:
        return "gelu"
    raise ValueError(f"{type(experts).__name__}'s activation {type(act).__name__} is not one of "
                     f"{sorted(ACTIVATIONS)}")

"""Expert parallelism: the MoE layer on ep 2 and 4 ranks (with tp = 2, etp 1 and 2, and
pipeline stages) against the same MoE in one process with every expert local, in float64:
output, input gradient and every parameter's gradient; routing, capacity dropping and the
load-balancing loss against their plain references; the bad inputs."""

import pytest
import torch
import torch.distributed as dist

from parallelkit import mpu
from parallelkit.distributed import comm
from parallelkit.moe import MoELayer, load_balancing_loss, route
from parallelkit.moe.experts import ExpertParallelExperts
from parallelkit.reference.moe import (experts_reference, load_balancing_reference,
                                       route_reference)
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close

E, H, I, SHARED = 8, 16, 8, 12
AUX = 0.1  # the load-balancing loss's weight where a test turns it on


def dense_weights():
    g = torch.Generator().manual_seed(0)
    return {"router": torch.randn(E, H, generator=g, dtype=torch.float64),
            "gate_up": torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64) / 4,
            "down": torch.randn(E, H, I, generator=g, dtype=torch.float64) / 3,
            "shared_gate_up": torch.randn(2 * SHARED, H, generator=g, dtype=torch.float64) / 4,
            "shared_down": torch.randn(H, SHARED, generator=g, dtype=torch.float64) / 4,
            "shared_gate": torch.randn(1, H, generator=g, dtype=torch.float64) / 4}


def shared_reference(x, params):
    """Qwen2-MoE's shared expert: sigmoid(gate · x) · down(silu(gate_proj x) · up_proj x)."""
    gate, up = (x @ params["shared_gate_up"].t()).chunk(2, dim=-1)
    out = (torch.nn.functional.silu(gate) * up) @ params["shared_down"].t()
    return torch.sigmoid(x @ params["shared_gate"].t()) * out


def tokens_of(rank, n=None):
    """Rank ``rank``'s tokens and output gradient; ranks hold different numbers of tokens."""
    g = torch.Generator().manual_seed(100 + rank)
    n = n or 10 + 3 * rank
    return (torch.randn(n, H, generator=g, dtype=torch.float64),
            torch.randn(n, H, generator=g, dtype=torch.float64))


def reference(ranks, top_k, capacity_factor, score, weights, shared=False, aux=0.0):
    """The outputs and input gradients of ``ranks``' tokens and the gradients of the weights
    over all of them, computed in this process; each rank's load-balancing loss (over its own
    tokens) joins the loss with weight ``aux``."""
    params = {k: v.clone().requires_grad_() for k, v in weights.items()}
    outs, xs = {}, {}
    for r in ranks:
        x, dout = tokens_of(r)
        x = x.requires_grad_()
        index, weight, probs = route_reference(x @ params["router"].t(), top_k, score,
                                               capacity_factor=capacity_factor)
        out = experts_reference(x, index, weight, params["gate_up"], params["down"])
        if shared:
            out = out + shared_reference(x, params)
        loss = (out * dout).sum() + aux * load_balancing_reference(index, probs, E)
        loss.backward()
        outs[r], xs[r] = out.detach(), x.grad
    return outs, xs, {k: v.grad for k, v in params.items()}


def _ep_layer(tp, pp, ep, etp, top_k, capacity_factor, score="softmax", shared=False,
              aux=0.0, dtype=torch.float64):
    state = mpu.initialize(tp=tp, pp=pp, ep=ep, etp=etp)
    world, rank = dist.get_world_size(), dist.get_rank()
    weights = dense_weights()
    layer = MoELayer(H, I, E, top_k, score=score, capacity_factor=capacity_factor,
                     aux_loss_coeff=aux, shared_intermediate=SHARED if shared else None,
                     shared_gate=shared, dtype=dtype)
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        if shared:
            layer.shared["gate_up"].weight.copy_(weights["shared_gate_up"])
            layer.shared["down"].weight.copy_(weights["shared_down"])
            layer.shared["gate"].weight.copy_(weights["shared_gate"])
    layer.experts.load_dense(weights["gate_up"], weights["down"])
    layer.experts.grouped_gemm = True  # where it runs: float32 (float64 takes the loop)
    x, dout = (t.to(dtype) for t in tokens_of(rank))
    x.requires_grad_()
    out = layer(x)
    out.backward(dout)

    # The MoE layer of this pipeline stage sees the tokens of the ranks of this stage.
    stage = [r for r, p in enumerate(comm.all_gather_ints(dist.group.WORLD, state.pp.rank))
             if p == state.pp.rank]
    outs, xs, grads = reference(stage, top_k, capacity_factor, score, weights, shared, aux)
    terms = H + I + SHARED + top_k
    assert_close(out.detach(), outs[rank], name="out", terms=terms)
    assert_close(x.grad, xs[rank], name="x grad", terms=terms)
    # The router and the shared expert are replicated: each rank's gradient is from its own
    # tokens; summed over the stage's ranks they are the whole gradient.
    replicated = {"router": layer.router.weight}
    if shared:
        replicated.update({f"shared_{k}": layer.shared[k].weight for k in layer.shared})
    for name, param in replicated.items():
        every = [torch.empty_like(param.grad) for _ in range(world)]
        dist.all_gather(every, param.grad)
        assert_close(sum(every[r] for r in stage), grads[name], name=f"{name} grad",
                     terms=terms * world)
    # An expert sees the tokens of its EP group (and ETP group); summed over the expert-DP
    # replicas it has seen every token: the dense gradient's slice of this rank's experts.
    experts = layer.experts
    mine = slice(experts.first_expert, experts.first_expert + experts.local_experts)
    shard = I // etp
    cols = slice(dist.get_rank(state.expert_tp.group) * shard,
                 (dist.get_rank(state.expert_tp.group) + 1) * shard)
    gate, up = grads["gate_up"][mine].split(I, dim=1)
    expected = {"gate_up_proj": torch.cat([gate[:, cols], up[:, cols]], 1),
                "down_proj": grads["down"][mine][:, :, cols]}
    for name, want in expected.items():
        grad = comm.all_reduce(getattr(experts, name).grad, state.expert_dp.group)
        assert_close(grad, want, name=name, terms=terms * world)
    return sorted(experts.calls_by_path)


@pytest.mark.parametrize("ep,etp", [(2, 1), (2, 2), (4, 1)], ids=["ep2-etp1", "ep2-etp2",
                                                                   "ep4-etp1"])
@pytest.mark.parametrize("top_k", [1, 2], ids=["top1", "top2"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75], ids=["dropless", "dropping"])
def test_expert_parallel_layer_equals_one_process(ep, etp, top_k, capacity_factor):
    run_on_ranks(_ep_layer, 4, 2, 1, ep, etp, top_k, capacity_factor)


def test_expert_parallel_with_pipeline_stages():
    # tp 2 x pp 2 on 8 ranks: each stage's MoE layer exchanges tokens within its stage only.
    run_on_ranks(_ep_layer, 8, 2, 2, 2, 1, 2, None, timeout=180)


def test_sigmoid_router_with_bias():
    run_on_ranks(_ep_layer, 4, 2, 1, 2, 2, 2, None, "sigmoid")


def test_shared_expert_and_load_balancing_loss_in_the_gradients():
    run_on_ranks(_ep_layer, 4, 2, 1, 2, 2, 2, 1.0, "softmax", True, AUX)


def test_float32_takes_the_grouped_gemm():
    # torch._grouped_mm on CPU for float32 (asked for: by default CPU takes the loop); float64
    # (above) takes the expert loop.
    paths = run_on_ranks(_ep_layer, 4, 2, 1, 2, 1, 2, None, "softmax", False, 0.0,
                         torch.float32)
    assert all(p == ["grouped_gemm"] for p in paths), paths


def test_routing_and_load_balancing_against_references():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, E, generator=g, dtype=torch.float64)
    bias = torch.randn(E, generator=g, dtype=torch.float64) / 10
    for score, capacity_factor, normalize in [("softmax", None, True), ("softmax", 0.5, False),
                                              ("sigmoid", 1.0, True)]:
        routing = route(logits, 2, score, normalize, bias if score == "sigmoid" else None,
                        capacity_factor=capacity_factor)
        index, weight, probs = route_reference(logits, 2, score, normalize,
                                               bias if score == "sigmoid" else None,
                                               capacity_factor=capacity_factor)
        assert torch.equal(routing.index, index), score
        torch.testing.assert_close(routing.weight.double(), weight, rtol=1e-6, atol=1e-7)
        if capacity_factor is not None:  # no expert over its capacity, and some dropped
            kept = routing.index[routing.index < E]
            assert torch.bincount(kept, minlength=E).max() <= int(capacity_factor * 40 * 2 / E + 1)
            assert (routing.index == E).any()
        torch.testing.assert_close(load_balancing_loss(routing, E).double(),
                                   load_balancing_reference(index, probs, E), rtol=1e-6,
                                   atol=0)


def _bad_inputs():
    state = mpu.initialize(tp=2, ep=2)
    with pytest.raises(ValueError, match=r"5 experts cannot be split over ep=2 ranks"):
        ExpertParallelExperts(5, H, I)
    with pytest.raises(ValueError, match=r"intermediate size 7 is not divisible by etp=2"):
        ExpertParallelExperts(E, H, 7, etp_group=state.tp.group)
    layer = MoELayer(H, I, E, 2, dtype=torch.float64)
    x, _ = tokens_of(0)
    if dist.get_rank() == 3:  # one rank's router logits turn NaN: every rank raises
        x[2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"router logits are NaN or infinite on global "
                                                 r"rank 3"):
        layer(x)
    with pytest.raises(ValueError, match=r"takes tokens \[T, 16\]"):
        layer.experts(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.long),
                      torch.zeros(4, 2, dtype=torch.float64))


def test_bad_inputs_are_clear_errors():
    run_on_ranks(_bad_inputs, 4)


def _load_balancing_over_a_group():
    # Under sequence parallelism a sequence's tokens are split over TP: the loss over the
    # group equals the loss over all its ranks' tokens at once, and so does its gradient.
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7)
    every = [torch.randn(6 + 2 * r, E, generator=g, dtype=torch.float64) for r in range(2)]
    logits = every[rank].clone().requires_grad_()
    loss = load_balancing_loss(route(logits, 2), E, dist.group.WORLD)
    loss.backward()
    full = torch.cat(every).requires_grad_()
    index, _, probs = route_reference(full, 2)
    expected = load_balancing_reference(index, probs, E)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=0)
    mine = full.grad.split([6, 8])[rank]
    torch.testing.assert_close(logits.grad, mine, rtol=1e-10, atol=1e-14)


def test_load_balancing_loss_over_a_group():
    run_on_ranks(_load_balancing_over_a_group, 2)

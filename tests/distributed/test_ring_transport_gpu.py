"""The ring ops through the cuda_ipc transport, with 2 and 4 processes sharing cuda:0 (NCCL refuses
two ranks on one GPU): gloo carries the metadata (checks, the IPC handles), the chunks move by
peer copies between the processes' GPU slots. Each result is checked against float64 on the CPU.
The workers are forked before any CUDA call (conftest keeps pytest's process CUDA-free)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelkit import mpu
from parallelkit.context_parallel import (ContextParallelAttention, gather_from_context_parallel,
                                          split_for_context_parallel)
from parallelkit.ops import ring_transport
from parallelkit.ops.overlap import all_gather_matmul, matmul_reduce_scatter
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def seeded(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # float32


def _fused_ops(tp, chunks):
    """y of all_gather_matmul, and y, grad x, grad weight of matmul_reduce_scatter (whose
    backward is an all_gather_matmul: every collective is a ring op), on cuda:0 in float32."""
    torch.cuda.set_device(0)
    group = mpu.initialize(tp=tp).tp.group
    rank = dist.get_rank(group)
    s, b, k, n = 16, 2, 32, 24
    x_shard = seeded((s, b, k), 1).chunk(tp)[rank]
    x_full, weight = seeded((s, b, k), 2 + rank), seeded((n, k), 5 + rank)
    dy = seeded((s // tp, b, n), 9 + rank)
    with ring_transport.count_transports() as used:
        y_ag = all_gather_matmul(x_shard.cuda(), weight.cuda(), group, chunks)
        xi, wi = x_full.cuda().requires_grad_(), weight.cuda().requires_grad_()
        y_rs = matmul_reduce_scatter(xi, wi, group, chunks)
        y_rs.backward(dy.cuda())
    torch.cuda.synchronize()
    assert {kind for _, kind in used} == {"cuda_ipc"}, used

    # float64 references from every rank's inputs, regenerated here: no collective to trust
    everyone = [seeded((s, b, k), 2 + r).double() for r in range(tp)]
    weights = [seeded((n, k), 5 + r).double() for r in range(tp)]
    assert_close(y_ag.cpu(), seeded((s, b, k), 1).double() @ weights[rank].t(), name="y (ag)",
                 terms=k)
    y64 = sum(e @ w.t() for e, w in zip(everyone, weights)).chunk(tp)[rank]
    # Every rank's dy reaches every rank's x: grad x = cat(dy) W, grad W = cat(dy)^T x.
    dys = torch.cat([seeded((s // tp, b, n), 9 + r).double() for r in range(tp)])
    grad_x = dys @ weights[rank]
    grad_w = torch.einsum("sbn,sbk->nk", dys, everyone[rank])
    assert_close(y_rs.detach().cpu(), y64, name="y (rs)", terms=k * tp)
    assert_close(xi.grad.cpu(), grad_x, name="grad x", terms=n)
    assert_close(wi.grad.cpu(), grad_w, name="grad weight", terms=s * b)
    return torch.cuda.get_device_name()


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("tp", [2, 4])
def test_fused_ops_through_cuda_ipc_on_one_gpu(tp, chunks):
    run_on_ranks(_fused_ops, tp, tp, chunks, timeout=300)


def _ring_attention(cp, causal):
    torch.cuda.set_device(0)
    group = mpu.initialize(cp=cp).cp.group
    rank = dist.get_rank(group)
    heads, kv_heads, s, d = 4, 2, 16 * cp, 64
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(2, heads, s, d, generator=g) for _ in range(2))
    k, v = (torch.randn(2, kv_heads, s, d, generator=g) for _ in range(2))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(ref[0], ref[1].repeat_interleave(2, 1),
                                              ref[2].repeat_interleave(2, 1), is_causal=causal)
    expected.backward(dout.double())

    local = [split_for_context_parallel(t, rank, cp, dim=2).cuda().requires_grad_()
             for t in (q, k, v)]
    with ring_transport.count_transports() as used:
        out = ContextParallelAttention(group)(*local, is_causal=causal)
        out.backward(split_for_context_parallel(dout, rank, cp, dim=2).cuda())
    torch.cuda.synchronize()
    assert {kind for _, kind in used} == {"cuda_ipc"}, used
    terms = d + s + 2 * s
    for name, got, want in [("out", out, expected), ("dq", local[0].grad, ref[0].grad),
                            ("dk", local[1].grad, ref[1].grad), ("dv", local[2].grad, ref[2].grad)]:
        full = gather_from_context_parallel(got.detach().cpu(), group, dim=2)
        assert_close(full, want, name=name, terms=terms)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_through_cuda_ipc_on_one_gpu(cp, causal):
    run_on_ranks(_ring_attention, cp, cp, causal, timeout=300)

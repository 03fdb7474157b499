"""Sharded ops on one GPU: two ranks in two processes share cuda:0, joined by gloo on CUDA tensors
(NCCL refuses two ranks on one GPU), so the compiled Triton kernels run with the collectives
between them. Each rank's loss, output and gradient slice are checked against float64 autograd
on the full tensors. Only ops whose collectives are all-reduces (gloo's CUDA support) run on two
ranks; the norm layers at tp=1 (one fused kernel each way) run on a world of one.

The ranks are forked from pytest's process, which must not hold a CUDA context by then: the
``forks`` mark has tests/conftest.py run these before every GPU test that creates one there.
"""

import pytest
import torch
import torch.nn.functional as F

from parallelkit import mpu
from parallelkit.ops._backend import use_triton
from parallelkit.ops.cross_entropy import vocab_parallel_cross_entropy
from parallelkit.ops.norms import parallel_rms_norm
from parallelkit.reference import norms as reference
from parallelkit.tensor_parallel.norms import ParallelLayerNorm, ParallelRMSNorm
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.forks,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TP = 2
SAYS = (f"multi-rank on one GPU: {TP} processes share cuda:0, joined by gloo on CUDA tensors "
        "(NCCL refuses two ranks on one GPU)")


def _cross_entropy(tp):
    state = mpu.initialize(tp=tp)
    g = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(64, 1000, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 1000, (64,), generator=g)
    expected = F.cross_entropy(full, targets)
    expected.backward()
    shard = full.detach().chunk(tp, -1)[state.tp.rank].float().cuda().requires_grad_()
    assert use_triton(shard)
    loss = vocab_parallel_cross_entropy(shard, targets.cuda(), state.tp.group)
    loss.backward()
    terms = 1000 + 64  # the softmax over the vocabulary, the mean over the tokens
    assert_close(loss.cpu(), expected.detach(), name="loss", terms=terms)
    assert_close(shard.grad.cpu(), full.grad.chunk(tp, -1)[state.tp.rank], name="grad",
                 terms=terms)
    return torch.cuda.get_device_name()


def _rms_norm(tp, dtype):
    state = mpu.initialize(tp=tp)
    g = torch.Generator().manual_seed(1)

    def rounded(t):  # what the ranks will see, so that the reference starts from the same values
        return t.to(dtype).double()

    full = rounded(torch.randn(48, 512, generator=g, dtype=torch.float64)).requires_grad_()
    weight = rounded(1 + 0.25 * torch.randn(512, generator=g, dtype=torch.float64)).requires_grad_()
    dy = rounded(torch.randn(48, 512, generator=g, dtype=torch.float64))
    expected = full * torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    expected.backward(dy)

    def local(t):
        return t.detach().chunk(tp, -1)[state.tp.rank].to(dtype).cuda().requires_grad_()

    x, w = local(full), local(weight)
    y = parallel_rms_norm(x, w, 1e-6, state.tp.group)
    y.backward(local(dy).detach())
    rank = state.tp.rank
    terms = 512 + 48  # the statistics and dx over the hidden dim, dweight over the rows
    assert_close(y.cpu(), expected.detach().chunk(tp, -1)[rank], name="y", terms=terms)
    assert_close(x.grad.cpu(), full.grad.chunk(tp, -1)[rank], name="dx", terms=terms)
    assert_close(w.grad.cpu(), weight.grad.chunk(tp, -1)[rank], name="dweight", terms=terms)
    return torch.cuda.get_device_name()


def _norm_layer_tp1(rms, dtype):
    """ParallelLayerNorm / ParallelRMSNorm at tp=1 with the fused residual add: y, the new
    residual stream and every gradient against float64 autograd."""
    mpu.initialize(tp=1)
    rows, hidden, eps = 512, 3072, 1e-5
    g = torch.Generator().manual_seed(2)

    def rounded(*shape):  # what the layer will see, so that the reference starts from the same
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).double()

    x, residual, dy, ds = (rounded(rows, hidden) for _ in range(4))
    weight, bias = 1 + 0.25 * rounded(hidden), None if rms else rounded(hidden)
    layer = (ParallelRMSNorm(hidden, eps) if rms else ParallelLayerNorm(hidden, eps)).to("cuda",
                                                                                       dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if not rms:
            layer.bias.copy_(bias)
    x_c, residual_c = (t.to("cuda", dtype).requires_grad_() for t in (x, residual))
    assert use_triton(x_c)
    y, s = layer(x_c, residual_c)
    torch.autograd.backward([y, s], [dy.to("cuda", dtype), ds.to("cuda", dtype)])

    x64, r64, w64 = (t.clone().requires_grad_() for t in (x, residual, weight))
    b64 = None if rms else bias.clone().requires_grad_()
    if rms:
        y_ref, s_ref = reference.rms_norm(x64, w64, eps, residual=r64)
    else:
        y_ref, s_ref = reference.layer_norm(x64, w64, b64, eps, residual=r64)
    torch.autograd.backward([y_ref, s_ref], [dy, ds])
    assert_close(y.cpu(), y_ref.detach(), name="y", terms=hidden)
    assert_close(s.cpu(), s_ref.detach(), name="s", terms=1)
    assert_close(x_c.grad.cpu(), x64.grad, name="dx", terms=hidden)
    assert_close(residual_c.grad.cpu(), r64.grad, name="d residual", terms=hidden)
    # dweight, dbias: sums over the rows of products each computed through the hidden dim
    assert_close(layer.weight.grad.cpu(), w64.grad, name="dweight", terms=rows + hidden)
    if not rms:
        assert_close(layer.bias.grad.cpu(), b64.grad, name="dbias", terms=rows)
    return torch.cuda.get_device_name()


def test_vocab_parallel_cross_entropy_on_two_ranks_of_one_gpu():
    print(SAYS)
    assert len(run_on_ranks(_cross_entropy, TP, TP, timeout=120)) == TP


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parallel_rms_norm_on_two_ranks_of_one_gpu(dtype):
    print(SAYS)
    run_on_ranks(_rms_norm, TP, TP, dtype, timeout=120)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_norm_layers_at_tp1_run_the_fused_kernels(rms, dtype):
    run_on_ranks(_norm_layer_tp1, 1, rms, dtype, timeout=120)
